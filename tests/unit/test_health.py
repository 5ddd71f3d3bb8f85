"""The pcaspy-free pieces of the relay's health: errors ring, rates, shard states,
histograms, process figures, and the /metrics collector."""

from __future__ import annotations

import collections
import os
import time
import types

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from carelay.broker import health
from carelay.broker.clock import ShardClock
from carelay.broker.errorlog import ErrorLog, error_line
from carelay.broker.health import (
    Health,
    RateMeter,
    ShardView,
    shard_state,
    uptime_text,
)
from carelay.broker.metrics import HealthCollector
from carelay.common.config import ERROR_LINE_MAX, ERRORS_KEPT, SHARD_FAILING_RESTARTS
from carelay.common.histogram import Histogram
from carelay.common.messages import Pong
from carelay.common.naming import InvalidPvName, parse_pv_name


def test_errors_keep_the_last_ones_newest_last():
    log = ErrorLog()
    for i in range(ERRORS_KEPT + 5):
        log.add(f"line {i}")
    assert len(log.lines) == ERRORS_KEPT
    assert log.last == f"line {ERRORS_KEPT + 4}"
    assert log.text().splitlines()[0] == "line 5"
    assert log.changes == ERRORS_KEPT + 5


def test_an_error_line_says_when_who_what_and_why():
    line = error_line("refused put: text", "P:x_f1", 1, "host1", "alice", when=0.0)
    assert line == "1970-01-01 00:00:00Z client alice@host1 pv P:x_f1 shard 1: refused put: text"
    assert error_line("reason").endswith(": reason")
    assert len(error_line("x" * 1000)) == ERROR_LINE_MAX
    assert "\n" not in error_line("two\nlines")


def test_lines_of_names_that_are_not_ascii_fit_the_error_pvs_whole():
    """Each line is cut to ERROR_LINE_MAX bytes on a character, so ERRORS (sized for
    ERRORS_KEPT such lines) holds the newest in full, and LAST_ERROR its whole line."""
    name = "P:" + "温度" * 100 + "_f1"
    line = error_line("refused name: not ASCII", name, host="10.0.0.1")
    assert len(line.encode()) <= ERROR_LINE_MAX
    assert "温度" in line and "\ufffd" not in line
    assert error_line("bad", "P:\udcff_f1").endswith("_f1: bad")  # bytes no UTF-8 says
    log = ErrorLog()
    for k in range(ERRORS_KEPT + 3):
        log.add(error_line(f"refused {k}", name))
    pv_bytes = ERRORS_KEPT * (ERROR_LINE_MAX + 1) - 1  # the ERRORS PV, its terminator aside
    assert len(log.text().encode()) <= pv_bytes
    assert log.text().splitlines()[-1] == log.last


def test_rates_over_one_and_ten_seconds():
    meter = RateMeter()
    assert meter.sample(0.0, 0) == (0.0, 0.0)
    for t in range(1, 11):
        one, ten = meter.sample(float(t), t * 5 if t < 10 else 45 + 20)
    assert one == 20.0
    assert ten == pytest.approx(6.5)


def _pong(pid: int, puts: int) -> Pong:
    return Pong(1, 2, 3, "", pid, puts, 1.0, {}, 4096)


def _put_rates(h: Health, broker, pongs, start: int = 0) -> list[float]:
    """The shard 0 put rate of each second from ``start``, a PONG (or none) before each
    sample."""
    rates = []
    for t, pong in enumerate(pongs, start):
        if pong is not None:
            h.shards[0].update(pong, now=100.0 + t)
        h.sample(broker, 100.0 + t)
        rates.append(h.snapshot["shards"][0]["put_rate"])
    return rates


def test_a_restarted_shard_counting_from_zero_makes_no_negative_rate():
    h, broker = Health(2, "9.9"), _Broker()
    rates = _put_rates(h, broker, [_pong(7, 100_000), _pong(7, 100_100), _pong(8, 10)])
    assert rates[1] == 100.0
    assert rates[2] == 0.0  # a new process: its rate starts afresh
    assert _put_rates(h, broker, [_pong(8, 60)], start=3) == [50.0]


def test_a_shards_put_rate_is_steady_between_pongs_and_samples():
    """PONGs come every 0.45 s and the figures are taken every second: a steady 1,000
    puts a second reads 1,000 each second, not 900 or 1,350 as a count taken at the
    sample's time made it (two or three PONGs a second), and 0 once they stop."""
    h, broker = Health(2, "9.9"), _Broker()
    rates, pong_at = [], 100.0
    for second in range(1, 13):
        now = 100.0 + second
        while pong_at <= now:
            h.shards[0].update(_pong(7, round(1000 * (pong_at - 100.0))), now=pong_at)
            pong_at += 0.45
        h.sample(broker, now)
        rates.append(h.snapshot["shards"][0]["put_rate"])
    assert all(r == pytest.approx(1000.0) for r in rates[1:])
    h.sample(broker, 100.0 + 16)  # no PONG for 3.5 s
    assert h.snapshot["shards"][0]["put_rate"] == 0.0


def test_a_restarted_broker_makes_no_rate_of_a_shards_lifetime_puts():
    """Before the shard's first PONG the broker knows no count: the lifetime count that
    PONG brings is no put rate."""
    h, broker = Health(2, "9.9"), _Broker()
    rates = _put_rates(h, broker, [None, _pong(7, 5_000_000), _pong(7, 5_000_200)])
    assert rates == [0.0, 0.0, 200.0]


def test_a_counter_that_goes_down_starts_the_rate_afresh():
    meter = RateMeter()
    meter.sample(0.0, 1000)
    meter.sample(1.0, 1100)
    assert meter.sample(2.0, 5) == (0.0, 0.0)
    assert meter.sample(3.0, 25) == (20.0, 20.0)


def _view(live=True, synced=True, error="", restarts=(), failing=False):
    return ShardView(live, synced, error, collections.deque(restarts), failing)


@pytest.mark.parametrize(
    ("view", "young", "expected"),
    [
        (_view(), False, "OK"),
        (_view(error="disk full"), False, "STORE_FAILED"),
        (_view(live=False, synced=False), True, "CONNECTING"),
        (_view(live=False, synced=False), False, "NOT_ANSWERING"),
        (_view(live=False, restarts=[99.0]), True, "NOT_ANSWERING"),
        (_view(live=False, restarts=[99.0] * SHARD_FAILING_RESTARTS), False, "FAILING"),
        (_view(live=False, restarts=[0.0] * SHARD_FAILING_RESTARTS), False, "NOT_ANSWERING"),
        # Dying before it ever answers: the supervisor's word.
        (_view(live=False, synced=False, failing=True), True, "FAILING"),
        (_view(live=True, failing=True), False, "OK"),
    ],
)
def test_shard_states(view, young, expected):
    assert shard_state(view, 100.0, young) == expected
    assert expected in health.SHARD_SEVERITY


def test_a_histogram_travels_as_plain_data():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    again = Histogram.from_dict(h.as_dict())
    assert again.cumulative() == [("0.1", 1), ("1.0", 3), ("+Inf", 4)]
    assert again.total == pytest.approx(4.05)
    assert Histogram.from_dict({"buckets": [1], "counts": [1]}) is None
    assert Histogram.from_dict("junk") is None


def test_uptime_as_iocstats_writes_it():
    assert uptime_text(5) == "00:00:05"
    assert uptime_text(86400 + 3661) == "1 day, 01:01:01"
    assert uptime_text(3 * 86400) == "3 days, 00:00:00"


def test_process_figures_of_this_process():
    nfds, circuits = health.descriptors([])
    assert nfds > 0 and circuits == 0
    assert 0 < health.fd_limit() <= health.FD_SETSIZE


def test_health_names_break_the_naming_rule():
    """They can never be taken for (or collide with) user PVs."""
    from carelay.broker.healthpvs import relay_metas

    for part in relay_metas(4, 1.0):
        with pytest.raises(InvalidPvName):
            parse_pv_name(f"P:relay:{part}", "P:", 1000, 128)


class _Link:
    local = True
    endpoint = "ipc:///tmp/shard.sock"

    def __init__(self, live):
        self.live = live
        self.ever_synced = True
        self.pvs = 3


class _Broker:
    ready = True
    ca_ports = []
    circuits = None  # not watched: health walks the descriptors itself
    startup_grace = 10.0
    byte_limit = 1000
    n_bytes = 850
    n_real = 3
    pvs = {"a": 1, "b": 2, "c": 3, "d": 4}
    links = [_Link(True), _Link(False)]
    store_errors = ["", ""]

    def __init__(self):
        self.requests = types.SimpleNamespace(clocks=[ShardClock(), ShardClock()])

    def attached_count(self):
        return 2


def test_uptime_is_not_moved_by_a_step_of_the_wall_clock(monkeypatch):
    h = Health(2, "9.9")
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600.0)  # stepped an hour ahead
    h.sample(_Broker(), h.started_mono + 90.0)
    assert h.snapshot["uptime"] == pytest.approx(90.0)
    assert health.uptime_text(h.snapshot["uptime"]) == "00:01:30"


def test_a_flush_age_is_read_on_the_shards_clock():
    """A shard's last flush is a time of its own clock: 30 s ahead of ours, a flush 2 s
    ago is 2 s old, not -28 (or, behind, 32: an alarm)."""
    for skew in (30.0, -30.0):
        h, broker = Health(2, "9.9"), _Broker()
        now = time.time()
        broker.requests.clocks[0].sample(now - 0.01, now + skew - 0.005, now)
        h.shards[0].update(Pong(1, 2, 3, "", 1, 5, now + skew - 2.0, {}, 4096))
        h.sample(broker, 100.0)
        age = h.snapshot["shards"][0]["flush_age"]
        assert 1.9 < age < 2.5, (skew, age)
        assert h.snapshot["shards"][0]["clock_offset"] == pytest.approx(skew, abs=0.01)


def test_the_collector_says_what_the_snapshot_holds():
    h = Health(2, "9.9")
    h.puts, h.creations = 7, 3
    h.refused("limit", "max_pvs reached", "P:x_f1")
    h.put_callback.observe(0.002)
    h.shards[0].update(Pong(1, 2, 3, "", os.getpid(), 5, 1.0, {"bad": 1}, 4096))
    h.shard_restarted(1)
    broker = _Broker()
    broker.requests.clocks[1].sample(1000.0, 997.5, 1000.0)  # shard 1 runs 2.5 s behind
    h.sample(broker, 100.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(h))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("carelay_puts_total", ())] == 7
    assert samples[("carelay_refusals_total", (("reason", "limit"),))] == 1
    assert samples[("carelay_max_bytes_used_percent", ())] == 85.0
    assert samples[("carelay_provisional_pvs", ())] == 1
    assert samples[("carelay_put_callback_seconds_count", ())] == 1
    assert samples[("carelay_shard_store_bytes", (("shard", "0"),))] == 4096
    assert samples[("carelay_shard_puts_total", (("shard", "0"),))] == 5
    assert samples[("carelay_shard_restarts_total", (("shard", "0"),))] == 0
    assert samples[("carelay_shard_restarts_total", (("shard", "1"),))] == 1
    assert samples[("carelay_shard_clock_offset_seconds", (("shard", "0"),))] == 0.0
    assert samples[("carelay_shard_clock_offset_seconds", (("shard", "1"),))] == -2.5
    ok = (("carelay_shard_state", "OK"), ("shard", "0"))
    down = (("carelay_shard_state", "NOT_ANSWERING"), ("shard", "1"))
    assert samples[("carelay_shard_state", ok)] == 1
    assert samples[("carelay_shard_state", down)] == 1
    assert "max_pvs reached" in h.errors.last


def test_a_collector_before_the_first_sample_says_nothing():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(Health(1, "1")))
    assert generate_latest(registry) == b""


def test_circuits_are_the_connected_tcp_sockets_on_the_ca_port():
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.create_connection(("127.0.0.1", port)) as client,
        ):
            udp.bind(("127.0.0.1", port))
            accepted, _ = listener.accept()
            with accepted:
                assert health.descriptors([port])[1] == 1  # not the listener, UDP or client
                accepted.sendall(b"x")
                assert client.recv(1) == b"x"  # its descriptor is still open


def test_a_shard_the_supervisor_says_is_failing_is_failing(tmp_path):
    """A shard that dies at every start never answers a broker, so no restart of it is
    seen from the links: the supervisor of `carelay up` says it is failing."""
    import json

    from carelay.broker.peers import PeerBrokers

    processes = [
        {"name": "shard 0", "state": "running", "failing": False},
        {"name": "shard 1", "state": "failing"},
        # Started again after it kept dying: failing until in sync (shard_state).
        {"name": "shard 2", "state": "running", "failing": True},
        {"name": "broker", "state": "failing"},
    ]
    (tmp_path / "supervisor.json").write_text(
        json.dumps({"pid": os.getpid(), "processes": processes})
    )
    assert PeerBrokers(tmp_path, 1, 0).failing_shards() == {1, 2}
    assert PeerBrokers(tmp_path, 1, 0, all_here=False).failing_shards() == set()
    h, broker = Health(2, "9.9"), _Broker()
    h.peers = PeerBrokers(tmp_path, 1, 0)
    h.sample(broker, 100.0)
    assert [s["state"] for s in h.snapshot["shards"]] == ["OK", "FAILING"]
    dead = {"pid": 2**22 + 1, "processes": processes}  # no such process: no word
    (tmp_path / "supervisor.json").write_text(json.dumps(dead))
    assert PeerBrokers(tmp_path, 1, 0).failing_shards() == set()


def test_clients_refusals_never_push_the_relays_own_failures_out_of_errors():
    log = ErrorLog(keep=6)
    log.add("shard 1 unreachable", own=True)
    for k in range(20):
        log.add(f"refused name {k}")
    assert log.lines == ["shard 1 unreachable", *(f"refused name {k}" for k in range(15, 20))]
    assert log.last == "refused name 19"
    # The newest lines are the newest lines, whoever they are.
    for k in range(5):
        log.add(f"shard 0 down {k}", own=True)
    assert log.lines == ["refused name 19", *(f"shard 0 down {k}" for k in range(5))]
    # Refusals after them push out the older failures, never the newest half of the lines.
    for k in range(20, 25):
        log.add(f"refused name {k}")
    assert log.lines == [
        "shard 0 down 2",
        "shard 0 down 3",
        "shard 0 down 4",
        "refused name 22",
        "refused name 23",
        "refused name 24",
    ]
    assert log.last == "refused name 24"
    assert log.text() == "\n".join(log.lines)


def test_every_ca_brokers_buffers_count_against_max_bytes(tmp_path):
    """Each CA broker says in its status file what CA buffers its PCAS holds; the others
    (and the PVA front-end, which holds none) count them against max_bytes too."""
    import json

    from carelay.broker.peers import PeerBrokers, ca_buffer_bytes
    from carelay.common.lifecycle import broker_role, status_path

    def status(k: int, held, ready=True, pid=None):
        pid = os.getpid() if pid is None else pid
        door = {"index": k, "ca_buffer_bytes": held}
        own = {"pid": pid, "ready": ready, "door": door}
        status_path(tmp_path, broker_role(k)).write_text(json.dumps(own))

    status(0, 100)
    status(1, 250)
    status(2, 400, ready=False)  # not serving: not counted
    status(3, "many")  # not a count: none
    assert ca_buffer_bytes(tmp_path, 4) == 350
    peers = PeerBrokers(tmp_path, 4, 0)
    h, broker = Health(2, "9.9"), _Broker()
    h.peers = peers
    h.sample(broker, 100.0)
    assert peers.others_buffer_bytes == 250  # broker 1's: not its own status file
    assert h.snapshot["bytes_used"] == broker.n_bytes + 250
    assert h.snapshot["ca_buffer_bytes"] == 0  # its own, which its door says
    assert peers.door(h.snapshot)["ca_buffer_bytes"] == 0
    status(1, 0, pid=2**22 + 1)  # gone
    assert ca_buffer_bytes(tmp_path, 4) == 100


def test_the_pva_front_ends_refusals_join_each_brokers_errors_and_counts():
    class Peers:
        pids: list = []
        others_buffer_bytes = 0
        status: dict = {}

        def sample(self, *args):
            return []

        def failing_shards(self):
            return set()

        def pva(self):
            return {"known": True, "up": True, **self.status}

    h, broker, peers = Health(2, "9.9"), _Broker(), Peers()
    h.peers = peers
    h.refused("name", "refused PV name: bad", "P:x")
    peers.status = {
        "pid": 11,
        "started": 1.0,
        "errors": [[1, "t pv P:a_f3: 4 elements for a PV of 3", False], [2, "t: down", True]],
        "refusals": {"convert": 3, "shard_down": 1},
    }
    h.sample(broker, 100.0)
    h.sample(broker, 101.0)  # the same status again: nothing taken twice
    assert h.errors.lines[-2:] == ["t pv P:a_f3: 4 elements for a PV of 3", "t: down"]
    assert len(h.errors.lines) == 3
    # What it counted before this broker first looked is not counted: no false rate.
    assert h.refusals["convert"] == 0 and h.refusals["shard_down"] == 0
    assert h.snapshot["pva"] == {"known": True, "up": True}
    errors = [[2, "t: down", True], [3, "x\nfake", False]]
    peers.status = {"pid": 11, "started": 1.0, "errors": errors}
    peers.status["refusals"] = {"convert": 5, "shard_down": 1}
    h.sample(broker, 102.0)
    assert h.errors.last == "x fake"  # one line, as every ERRORS line
    assert h.refusals["convert"] == 2
    # A new PVA process (the same pid again, started anew) counts from 0: all its own.
    peers.status = {"pid": 11, "started": 2.0, "errors": [[1, "new", False]]}
    peers.status["refusals"] = {"convert": 1}
    h.sample(broker, 103.0)
    assert h.errors.last == "new" and h.refusals["convert"] == 3


def test_a_broker_that_starts_beside_a_busy_pva_front_end_shows_no_false_rate():
    class Peers:
        pids: list = []
        others_buffer_bytes = 0

        def sample(self, *args):
            return []

        def failing_shards(self):
            return set()

        def pva(self):
            return {"known": True, "up": True, "pid": 7, "started": 1.0, "errors": [],
                    "refusals": {"convert": 50_000}}  # fmt: skip

    h, broker = Health(2, "9.9"), _Broker()
    h.peers = Peers()
    for t in range(4):
        h.sample(broker, 100.0 + t)
    assert h.snapshot["refuse_rate"] == (0.0, 0.0)
