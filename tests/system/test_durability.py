"""Durability under faults: processes killed while clients put, and what survives.

Each test starts its own relay and drives it with caproto (pyepics does not
report a failed put callback).  Loader threads put with callback continuously,
creating new PVs as they go and updating the ones they created, and record
every attempt: when it was sent, when it was answered and whether the relay
acknowledged it.  After the fault the tests read everything back and check the
failure model of the design:

- an acknowledged creation is never lost (creations are durable before their ack);
- a value acknowledged at least ``AUTOSAVE + MARGIN`` before a crash is the
  value read back, unless a later put (acknowledged or not) replaced it;
- when only the broker dies, every acknowledged value is kept exactly;
- while a shard is down, puts to its PVs wait for its restart (a short grace) or
  fail, and are never acknowledged before the new process serves.

Times are taken on CLOCK_BOOTTIME, the clock of a process's start time in
/proc/PID/stat.  A restarted shard cannot serve before its new process bound
its socket (it logs "started" right after); the socket file's time, or else the
process's start, is a sound lower bound for that moment, so a put sent to it
between the kill and then and acknowledged is a false success.  (The log's
own timestamps have one-second resolution.)
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus, CaprotoError

from carelay.common.config import Config
from carelay.common.sharding import shard_for
from tests.system.clients import Context, close, name_on_shard, role_pid
from tests.system.conftest import wait_for

#: Autosave period of the relays here (seconds), and the margin the tests allow on top.
AUTOSAVE = 0.2
MARGIN = 0.5
FAST = ["--autosave-period", str(AUTOSAVE)]
#: How long one put with callback of a loader may take before it counts as failed.
PUT_TIMEOUT = 2.0
#: The bound the failure model states for a killed shard to serve again (not a benchmark).
SERVE_AGAIN_BOUND = 15.0

STATUS_ROW = re.compile(
    r"^(?P<name>shard \d+|broker)\s+(?P<pid>\d+|-)\s+(?P<state>not answering|store failing|\S+)"
    r"\s+(?P<uptime>-|\d+ s|\d+ min \d+ s|\d+ h \d+ min|\d+ d \d+ h)"
    r"\s+(?P<restarts>\d+)\s+(?P<pvs>\d+|-)"
    r"(?:\s+(?P<flush>never|-|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"
    r"\s+(?P<store>-|[\d.]+ (?:B|KiB|MiB|GiB)))?"
    r"\s*$"
)
#: What a caproto put or read raises when it gets no answer.  KeyError: caproto's
#: threading client (1.1) wakes a put whose circuit died without a response to return.
CLIENT_ERRORS = (CaprotoError, TimeoutError, KeyError)
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


# -- helpers ---------------------------------------------------------------------------


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_started(pid: int) -> float:
    """When process ``pid`` started, on the now() clock (to the clock tick, 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def shard_bound(relay, shard: int) -> float | None:
    """When shard ``shard`` bound its ipc socket, on the now() clock; None if unknown.

    The shard logs "started" right after it binds: nothing can reach it before.
    A file's time comes from the kernel's coarse clock, never later than the event.
    """
    endpoint = Config(prefix=relay.prefix, shards=relay.shards, data_dir=relay.data_dir)
    endpoint = endpoint.shard_endpoint(shard)
    if not endpoint.startswith("ipc://"):
        return None
    try:
        made = os.stat(endpoint[len("ipc://") :]).st_mtime_ns / 1e9
    except OSError:
        return None
    return made - (time.time() - now())


def status_rows(relay) -> tuple[int, dict[str, dict]]:
    """``carelay status``: its exit status and {"shard 0": {"pid": ..., "state": ...}, ...};
    asserts that it shows a row for every process."""
    r = relay.status()
    rows = {}
    for line in r.stdout.splitlines():
        m = STATUS_ROW.match(line)
        if m:
            row = m.groupdict()
            for key in ("pid", "restarts", "pvs"):
                row[key] = None if row[key] == "-" else int(row[key])
            rows[row.pop("name")] = row
    expected = {f"shard {k}" for k in range(relay.shards)} | {"broker"}
    assert set(rows) == expected, f"status exited {r.returncode}: {r.stdout}{r.stderr}"
    return r.returncode, rows


def status_when(relay, what: str, ok, timeout: float = 10.0) -> dict[str, dict]:
    """The status rows once ``ok(rows)`` holds (status files are rewritten every second)."""
    return wait_for(
        lambda: (lambda rows: rows if ok(rows) else None)(status_rows(relay)[1]),
        timeout=timeout,
        interval=0.2,
        what=what,
    )


def connect(ca: Context, *names: str, timeout: float = 5.0) -> list:
    pvs = ca.get_pvs(*names, timeout=timeout)
    for pv in pvs:
        pv.wait_for_connection(timeout=timeout)
    return pvs


def put_ok(pv, value, timeout: float = PUT_TIMEOUT) -> bool:
    """A put with callback through caproto; True only if the relay acknowledged it."""
    try:
        return bool(pv.write(value, wait=True, timeout=timeout).status.success)
    except CLIENT_ERRORS:
        return False


def read_time(pv, timeout: float = 5.0):
    """(data, severity, status) of a DBR_TIME read at the PV's current length."""
    r = pv.read(data_type="time", data_count=0, timeout=timeout)
    return list(r.data), r.metadata.severity, r.metadata.status


def pvlist(ca: Context, relay) -> set[str]:
    (pv,) = connect(ca, relay.prefix + "pvlist")
    text = bytes(pv.read(data_count=0, timeout=10).data).split(b"\0", 1)[0].decode()
    return set(text.split(",")) if text else set()


def put_then_read(pv, value: float) -> bool:
    """A put with callback acknowledged and its value read back: the PV is served."""
    if not put_ok(pv, [value]):
        return False
    try:
        data, severity, _ = read_time(pv, timeout=2)
    except CLIENT_ERRORS:
        return False
    return data[0] == value and severity == AlarmSeverity.NO_ALARM


class Monitor:
    """A caproto DBR_TIME subscription that keeps (value, severity, status) of each event."""

    def __init__(self, pv) -> None:
        self.events: list[tuple[float, int, int]] = []
        self.sub = pv.subscribe(data_type="time")
        self.sub.add_callback(self._on)  # caproto keeps a weak reference: self keeps it alive

    def _on(self, sub, response) -> None:
        md = response.metadata
        self.events.append((float(response.data[0]), int(md.severity), int(md.status)))

    def saw(self, value: float, severity: int = AlarmSeverity.NO_ALARM, after: int = 0) -> bool:
        return any(v == value and s == severity for v, s, _ in self.events[after:])


# -- loaders: clients that put while processes die ---------------------------------------


@dataclass(slots=True)
class Attempt:
    name: str
    value: float
    sent: float
    answered: float
    ok: bool
    creation: bool


class Loader(threading.Thread):
    """Puts with callback, one at a time, to PVs on one shard: every ``every``-th put
    creates a new PV (``burstN...``), the others update the PVs created so far, in turn."""

    def __init__(self, relay, shard: int, every: int = 4) -> None:
        super().__init__(daemon=True, name=f"loader-shard-{shard}")
        self.relay = relay
        self.shard = shard
        self.every = every
        self.attempts: list[Attempt] = []
        self.created: list[str] = []  # names whose creating put was acknowledged
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._ctx = Context()

    def acked(self, after: float = 0.0) -> int:
        return sum(1 for a in list(self.attempts) if a.ok and a.sent >= after)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by finish()
            self.error = e

    def _run(self) -> None:
        pvs = {}
        n = 0
        turn = 0
        while not self._halt.is_set():
            n += 1
            value = self.shard * 1_000_000.0 + n
            creation = not self.created or n % self.every == 1
            if creation:
                name = name_on_shard(self.relay, self.shard, f"burst{n}x")
            else:
                name = self.created[turn % len(self.created)]
                turn += 1
            sent = now()
            ok = False
            try:
                pv = pvs.get(name)
                if pv is None:
                    (pv,) = self._ctx.get_pvs(name, timeout=PUT_TIMEOUT)
                    pvs[name] = pv
                ok = bool(pv.write([value], wait=True, timeout=PUT_TIMEOUT).status.success)
            except CLIENT_ERRORS:
                pass
            self.attempts.append(Attempt(name, value, sent, now(), ok, creation))
            if ok and creation:
                self.created.append(name)
            if not ok:
                self._halt.wait(0.02)  # no busy loop against a dead process

    def finish(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), "a loader did not stop"
        close(self._ctx)
        if self.error is not None:
            raise self.error


def start_loaders(relay) -> list[Loader]:
    loaders = [Loader(relay, k) for k in range(relay.shards)]
    for loader in loaders:
        loader.start()
    return loaders


def wait_loaded(loaders, creations: int = 25, seconds: float = 1.5) -> None:
    """Until every loader has had ``creations`` PVs acknowledged over at least ``seconds``."""
    t0 = now()
    wait_for(
        lambda: now() - t0 >= seconds and all(len(lo.created) >= creations for lo in loaders),
        timeout=30,
        interval=0.05,
        what=f"{creations} acknowledged creations on every shard",
    )


def check_survivors(ca: Context, relay, loader: Loader, cutoff: float | None) -> int:
    """Every acknowledged creation of ``loader`` exists (in pvlist and readable), and each
    PV holds the value of its last put acknowledged by ``cutoff`` (any time when None)
    or the value of a later attempt.  Returns how many PVs had such a put to check."""
    listed = pvlist(ca, relay)
    missing = [name for name in loader.created if name not in listed]
    assert not missing, f"{len(missing)} acknowledged creations lost, e.g. {missing[:3]}"
    tries: dict[str, list[Attempt]] = defaultdict(list)
    for a in loader.attempts:
        tries[a.name].append(a)
    pvs = connect(ca, *loader.created, timeout=10)
    wrong = []
    checked = 0
    for pv in pvs:
        data, severity, _ = read_time(pv)
        got = float(data[0])
        if severity != AlarmSeverity.NO_ALARM:
            wrong.append(f"{pv.name}: severity {severity}")
        held = [i for i, a in enumerate(tries[pv.name]) if a.value == got]
        must = [
            i
            for i, a in enumerate(tries[pv.name])
            if a.ok and (cutoff is None or a.answered <= cutoff)
        ]
        if not held:
            wrong.append(f"{pv.name} holds {got}, which was never put to it")
        elif must:
            checked += 1
            if held[0] < must[-1]:
                a = tries[pv.name][must[-1]]
                before = "" if cutoff is None else f" {cutoff - a.answered:.2f} s before the cutoff"
                wrong.append(f"{pv.name} holds {got}, older than {a.value} acknowledged{before}")
    assert not wrong, f"{len(wrong)} PVs wrong: {wrong[:5]}"
    return checked


def crash(relay) -> float:
    """SIGKILL the whole process tree at once (no clean stop anywhere); returns when.

    The relay runs in the test's own session, so there is no process group to
    kill: the supervisor is stopped first so that it restarts nobody, then every
    child is killed, then the supervisor."""
    sup = relay.proc.pid
    os.kill(sup, signal.SIGSTOP)
    children = [pid for pid in relay.children() if pid != sup]
    assert len(children) == relay.shards + 1, children
    t = now()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    os.kill(sup, signal.SIGKILL)
    relay.proc.wait(10)
    wait_for(lambda: not relay.children(), timeout=5, what="every relay process gone")
    relay.stop()  # closes the log; the relay can start again on the same data
    return t


@pytest.fixture
def contexts():
    """Make caproto client contexts; each is closed at the end of the test.

    A context whose PVs were connected before a whole relay restart takes a few
    seconds to find them again (caproto backs off its searches); checks read
    through a fresh one, and only the subscriptions show the old one reconnect.
    """
    made = []

    def make() -> Context:
        made.append(Context())
        return made[-1]

    yield make
    for ctx in made:
        close(ctx)


@pytest.fixture
def ca(contexts):
    return contexts()


# -- typed PVs: every kind of value survives ------------------------------------------------


def typed_values(relay, shard: int) -> dict[str, tuple[list, object]]:
    """PV name -> (puts in order, expected read-back) for one PV of each kind on ``shard``."""

    def name(type_count):
        return name_on_shard(relay, shard, "kind", type_count)

    return {
        name("f1"): ([[1.5], [2.25]], [2.25]),
        name("i1"): ([[7], [-42]], [-42]),
        name("s1"): ([["first"], ["second text"]], [b"second text"]),
        name("f4"): ([[1.0, 2.0, 3.0, 4.0], [9.5, 8.5]], [9.5, 8.5]),
        name("F5"): ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [2.0, 3.0, 4.0, 5.0, 6.0]),
        name("c20"): ([np.frombuffer(b"hello", np.uint8)], list(b"hello")),
        name("I3"): ([[1], [2], [3], [4]], [2, 3, 4]),
    }


def put_typed(ca, table) -> None:
    pvs = connect(ca, *table)
    for pv in pvs:
        for value in table[pv.name][0]:
            assert put_ok(pv, value, timeout=5), f"put {value!r} to {pv.name} failed"


def check_typed(ca, table) -> None:
    for pv in connect(ca, *table, timeout=10):
        data, severity, _ = read_time(pv)
        assert list(data) == table[pv.name][1], pv.name
        assert severity == AlarmSeverity.NO_ALARM, pv.name


# -- 1. shard SIGKILL under load --------------------------------------------------------


def test_shard_sigkill_under_load_loses_no_acknowledged_put(make_relay, ca):
    relay = make_relay(shards=2, extra=FAST)
    steady, probe = connect(ca, name_on_shard(relay, 0, "steady"), name_on_shard(relay, 0, "probe"))
    assert put_ok(steady, [42.5]) and put_ok(probe, [0.5])
    monitor = Monitor(steady)
    wait_for(lambda: monitor.saw(42.5), what="the monitor's first event")

    loaders = start_loaders(relay)
    try:
        wait_loaded(loaders)
        old_pid = role_pid(relay, "shard 0")
        mark = len(relay.log())
        killed = now()
        os.kill(old_pid, signal.SIGKILL)
        after_kill = now()

        # The outage: a read gives the last value with severity INVALID, status COMM...
        def invalid_read():
            data, severity, status = read_time(steady, timeout=2)
            return (data, status) if severity == AlarmSeverity.INVALID_ALARM else None

        data, status = wait_for(
            invalid_read, timeout=5, interval=0.01, what="a shard-0 PV read as INVALID"
        )
        assert data == [42.5] and status == AlarmStatus.COMM
        # ... and a put with callback waits for the restart (PUT_RECONNECT_GRACE) or fails:
        # never acknowledged before the new process serves (judged below).
        probe_sent = now()
        probe_ok = put_ok(probe, [1.5])
        probe_answered = now()

        wait_for(lambda: put_then_read(probe, 2.5), timeout=SERVE_AGAIN_BOUND, what="shard 0 back")
        relay.wait_log("shard 0: started", start=mark)
        new_pid = role_pid(relay, "shard 0")
        assert new_pid not in (None, old_pid)
        restarted = process_started(new_pid)
        # The new process cannot serve before it listens (a bound a few 100 ms later).
        serving = max(restarted, shard_bound(relay, 0) or restarted)
        wait_for(lambda: loaders[0].acked(after=restarted) >= 5, what="the loader served again")
    finally:
        for loader in loaders:
            loader.finish()

    # Never a false success: no put sent to shard 0 after the kill and before its new
    # process listened was acknowledged before then; and such puts were made.
    window = [a for a in loaders[0].attempts if after_kill <= a.sent < serving]
    if after_kill <= probe_sent < serving:
        window.append(Attempt(probe.name, 1.5, probe_sent, probe_answered, probe_ok, False))
    false = [a for a in window if a.ok and a.answered < serving]
    assert not false, f"{len(false)} puts acknowledged while shard 0 was down: {false[:3]}"
    # Each such put waits for the restart (PUT_RECONNECT_GRACE), so a loader makes at most
    # one in the outage, and none when its put in flight was sent just before the kill: the
    # probe, sent once a read showed the outage, is what the check is sure to have.
    assert window, "no put was made to shard 0 while it was down: the check saw nothing"
    print(
        f"\nshard 0: new process {restarted - killed:.2f} s after the SIGKILL, listening "
        f"{serving - killed:.2f} s after it; {len(window)} puts were sent to it meanwhile"
    )
    # A monitor saw the outage (INVALID/COMM, same value) and then the PV back.
    outage = (42.5, AlarmSeverity.INVALID_ALARM, AlarmStatus.COMM)
    assert outage in monitor.events, monitor.events
    after = monitor.events.index(outage) + 1
    wait_for(lambda: monitor.saw(42.5, after=after), what="the monitor to see the PV back")

    # Shard 0 lost no acknowledged creation and no value acknowledged an autosave
    # period (plus a margin) before the kill; shard 1 lost nothing at all.
    checked = check_survivors(ca, relay, loaders[0], cutoff=killed - AUTOSAVE - MARGIN)
    assert checked >= 10, f"only {checked} shard-0 PVs had a put old enough to check"
    assert check_survivors(ca, relay, loaders[1], cutoff=None) >= 10
    attempted = {a.name for lo in loaders for a in lo.attempts} | {steady.name, probe.name}
    assert pvlist(ca, relay) <= attempted, "pvlist holds names nobody created"
    assert read_time(steady)[:2] == ([42.5], AlarmSeverity.NO_ALARM)


# -- 2. a killed shard serves all its PVs again ---------------------------------------------


def test_killed_shard_serves_every_pv_again_with_flushed_values(make_relay, ca):
    relay = make_relay(shards=2, extra=FAST)
    table = typed_values(relay, 0)
    scalars = {name_on_shard(relay, 0, "many"): float(k) for k in range(40)}
    put_typed(ca, table)
    pvs = connect(ca, *scalars)
    for pv in pvs:
        assert put_ok(pv, [scalars[pv.name]])
    for pv in pvs:  # updates, not creations: these reach the disk by the autosave only
        scalars[pv.name] += 0.5
        assert put_ok(pv, [scalars[pv.name]])
    (probe,) = connect(ca, name_on_shard(relay, 0, "probe"))
    assert put_ok(probe, [1.0])
    time.sleep(AUTOSAVE + MARGIN)  # the point: let an autosave period pass

    old_pid = role_pid(relay, "shard 0")
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: put_then_read(probe, 2.0), timeout=SERVE_AGAIN_BOUND, what="shard 0 back")
    serving = time.monotonic() - killed

    def all_back():
        return all(read_time(pv)[:2] == ([scalars[pv.name]], AlarmSeverity.NO_ALARM) for pv in pvs)

    wait_for(all_back, timeout=SERVE_AGAIN_BOUND, interval=0.05, what="every PV back")
    everything = time.monotonic() - killed
    print(
        f"\nshard SIGKILL to a put+read served: {serving:.2f} s; "
        f"to all {len(pvs)} PVs read back: {everything:.2f} s"
    )
    assert everything < SERVE_AGAIN_BOUND
    check_typed(ca, table)
    assert set(table) | set(scalars) <= pvlist(ca, relay)
    rows = status_when(
        relay,
        "status to show the new shard 0",
        lambda rows: rows["shard 0"]["pid"] not in (None, old_pid),
    )
    assert rows["shard 0"]["restarts"] == 1 and rows["shard 0"]["state"] == "running"


# -- 3. broker SIGKILL under load ------------------------------------------------------


def test_broker_sigkill_under_load_keeps_every_acknowledged_value(make_relay, ca, contexts):
    relay = make_relay(shards=2, extra=FAST)
    (steady,) = connect(ca, name_on_shard(relay, 1, "steady"))
    assert put_ok(steady, [3.25])
    monitor = Monitor(steady)
    wait_for(lambda: monitor.saw(3.25), what="the monitor's first event")
    table = typed_values(relay, 0) | typed_values(relay, 1)
    put_typed(ca, table)

    loaders = start_loaders(relay)
    try:
        wait_loaded(loaders, creations=15, seconds=1.0)
        old_pid = role_pid(relay, "broker")
        mark = len(relay.log())
        os.kill(old_pid, signal.SIGKILL)
        relay.wait_log("broker died (killed by SIGKILL)", start=mark)
        relay.wait_ready(start=mark)
        restarted = process_started(role_pid(relay, "broker"))
        # The loaders' channels reconnect by themselves and their puts work again.
        wait_for(
            lambda: all(lo.acked(after=restarted) >= 5 for lo in loaders),
            timeout=30,
            what="every loader to put again",
        )
    finally:
        for loader in loaders:
            loader.finish()

    # The shards never went down: every acknowledged value is there exactly.
    fresh = contexts()
    for loader in loaders:
        assert check_survivors(fresh, relay, loader, cutoff=None) >= 10
    check_typed(fresh, table)
    rows = status_when(relay, "the broker restart in status", lambda r: r["broker"]["restarts"])
    assert rows["broker"]["restarts"] == 1 and rows["broker"]["state"] == "running"
    # The subscription made before the kill gets updates again.
    (other,) = connect(fresh, steady.name)
    n = len(monitor.events)
    assert put_ok(other, [4.75])
    wait_for(lambda: monitor.saw(4.75, after=n), timeout=30, what="the monitor to resume")


# -- 4. carelay up again on the same data directory ---------------------------------------


def test_clean_stop_and_start_bring_back_every_pv_and_value(make_relay, ca, contexts):
    relay = make_relay(shards=2)  # the default autosave period: a clean stop flushes
    table = typed_values(relay, 0) | typed_values(relay, 1)
    put_typed(ca, table)
    scalar = next(name for name in table if name.endswith("_f1"))
    (pv,) = connect(ca, scalar)
    monitor = Monitor(pv)
    wait_for(lambda: monitor.saw(2.25), what="the monitor's first event")

    assert relay.stop() == 0
    relay.start()
    fresh = contexts()
    check_typed(fresh, table)
    assert set(table) <= pvlist(fresh, relay)
    (other,) = connect(fresh, scalar)
    n = len(monitor.events)
    assert put_ok(other, [6.5])
    wait_for(lambda: monitor.saw(6.5, after=n), timeout=30, what="the monitor to resume")


def test_a_clean_stop_keeps_the_plain_puts_the_broker_took(make_relay, ca, contexts):
    """Plain puts are applied to the broker's mirror at once and go to the shards in
    batches: a stop in the middle of a stream of them keeps every put that a read through
    the broker already showed (the queued batch is sent, and the shards take it)."""
    relay = make_relay(shards=2)
    names = [name_on_shard(relay, k, "plain") for k in (0, 1)]
    pvs = connect(ca, *names)
    for pv in pvs:
        assert put_ok(pv, [0.0])
    halt = threading.Event()

    def stream(pv) -> None:
        k = 0.0
        while not halt.is_set():
            k += 1
            try:
                pv.write([k], wait=False)
            except (*CLIENT_ERRORS, OSError):  # the relay went away under the stream
                halt.wait(0.01)
            if k % 50 == 0:
                time.sleep(0.001)  # a steady stream, not a flood of the client's queue

    writers = [threading.Thread(target=stream, args=(pv,), daemon=True) for pv in pvs]
    for w in writers:
        w.start()
    try:
        wait_for(lambda: all(read_time(pv)[0][0] > 200 for pv in pvs), what="the stream")
        seen = [read_time(pv)[0][0] for pv in pvs]
        assert relay.stop() == 0
    finally:
        halt.set()
        for w in writers:
            w.join(timeout=10)
    relay.start()
    fresh = contexts()
    kept = [read_time(pv)[0][0] for pv in connect(fresh, *names)]
    assert all(k >= s for k, s in zip(kept, seen, strict=True)), (kept, seen)


def test_crash_of_the_whole_tree_keeps_creations_and_autosaved_values(make_relay, ca, contexts):
    relay = make_relay(shards=2, extra=FAST)
    table = typed_values(relay, 0) | typed_values(relay, 1)
    put_typed(ca, table)
    (steady,) = connect(ca, name_on_shard(relay, 1, "steady"))
    assert put_ok(steady, [5.5])
    monitor = Monitor(steady)
    wait_for(lambda: monitor.saw(5.5), what="the monitor's first event")

    loaders = start_loaders(relay)
    try:
        wait_loaded(loaders)
        mark = len(relay.log())
        killed = crash(relay)
    finally:
        for loader in loaders:
            loader.finish()
    assert "every value saved" not in relay.log()[mark:], "a process had a clean stop"

    relay.start()
    fresh = contexts()
    for loader in loaders:
        checked = check_survivors(fresh, relay, loader, cutoff=killed - AUTOSAVE - MARGIN)
        assert checked >= 10, f"only {checked} PVs had a put old enough to check"
    check_typed(fresh, table)
    (other,) = connect(fresh, steady.name)
    n = len(monitor.events)
    assert put_ok(other, [6.5])
    wait_for(lambda: monitor.saw(6.5, after=n), timeout=30, what="the monitor to resume")


# -- 5. the supervisor killed ------------------------------------------------------------------


def test_supervisor_sigkill_leaves_no_child_and_the_relay_starts_again(make_relay, ca, contexts):
    relay = make_relay(shards=2)
    table = typed_values(relay, 0) | typed_values(relay, 1)
    put_typed(ca, table)
    assert len(relay.children()) == 4

    os.kill(relay.proc.pid, signal.SIGKILL)
    wait_for(lambda: not relay.children(), timeout=5, what="every child to exit")
    assert relay.stop() == -signal.SIGKILL
    # The children stopped on their parent-death signal (SIGTERM), with a final flush.
    assert relay.log().count("stopped, every value saved") == 2

    relay.start()
    fresh = contexts()
    check_typed(fresh, table)
    (pv,) = connect(fresh, next(iter(table)))
    assert put_then_read(pv, 11.5)


# -- 6, 7. damaged and truncated stores ----------------------------------------------------


def good_copy_with_pvs(relay, ca, n: int = 4) -> dict[str, float]:
    """PVs on both shards, in the store and in its good copy (made when a shard opens its
    store): create, stop, start, stop."""
    names = {name_on_shard(relay, k % 2, "kept"): 10.0 + k for k in range(2 * n)}
    for pv in connect(ca, *names):
        assert put_ok(pv, [names[pv.name]], timeout=5)
    assert relay.stop() == 0
    relay.start()
    assert relay.stop() == 0
    return names


def store(relay, shard: int = 0) -> Path:
    return relay.data_dir / f"shard-{shard}.sqlite"


def damage(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xff" * 100)


def truncate(path: Path) -> None:
    os.truncate(path, 1000)


def store_bytes(row) -> float:
    size, unit = row["store"].split()
    return float(size) * UNITS[unit]


def check_values(ca, names: dict[str, float]) -> None:
    for pv in connect(ca, *names, timeout=10):
        assert read_time(pv)[:2] == ([names[pv.name]], AlarmSeverity.NO_ALARM), pv.name


@pytest.mark.parametrize(
    "harm", [damage, truncate], ids=["first-100-bytes-overwritten", "truncated-to-1000-bytes"]
)
def test_damaged_store_is_restored_from_the_good_copy(make_relay, ca, contexts, harm):
    relay = make_relay(shards=2)
    names = good_copy_with_pvs(relay, ca)
    harm(store(relay))
    mark = len(relay.log())
    relay.start()
    log = relay.log()[mark:]
    lines = [line for line in log.splitlines() if "restored the last good copy" in line]
    assert len(lines) == 1 and "shard 0" in lines[0] and str(store(relay)) in lines[0], lines
    assert "with 4 PVs" in lines[0], lines  # not an empty store
    assert any(p.name.startswith("shard-0.sqlite.damaged-") for p in relay.data_dir.iterdir())
    fresh = contexts()
    check_values(fresh, names)
    assert set(names) <= pvlist(fresh, relay)


@pytest.mark.parametrize("harm_copy", [Path.unlink, damage], ids=["copy-removed", "copy-damaged"])
def test_damaged_store_without_a_sound_copy_refuses_and_shard_1_serves(
    make_relay, ca, contexts, harm_copy
):
    relay = make_relay(shards=2)
    names = good_copy_with_pvs(relay, ca)
    damage(store(relay))
    damaged = store(relay).read_bytes()
    harm_copy(store(relay).with_name("shard-0.sqlite.good"))

    # Not "ready:": the broker says it only once every shard is in sync.
    mark = len(relay.log())
    relay.wait_ready = lambda start=0: relay.wait_log("shard 1 in sync", start=start)
    relay.start()
    relay.wait_log("shard 0 died (exit status 3)", timeout=10, start=mark)
    refusals = [line for line in relay.log()[mark:].splitlines() if "cannot start" in line]
    assert refusals and str(store(relay)) in refusals[0], refusals

    # Shard 1 serves its PVs.
    fresh = contexts()
    on_1 = {name: v for name, v in names.items() if shard_for(name, 2) == 1}
    check_values(fresh, on_1)
    (pv,) = connect(fresh, next(iter(on_1)))
    assert put_then_read(pv, 99.5)

    # Shard 0 is shown failing and restarted again and again; it never comes up empty.
    rows = status_when(
        relay,
        "shard 0 shown failing",
        lambda rows: rows["shard 0"]["state"] == "failing" and rows["shard 0"]["restarts"] >= 2,
    )
    assert rows["shard 1"]["state"] == "running"
    restarts = rows["shard 0"]["restarts"]
    status_when(
        relay, "shard 0 restarted again", lambda rows: rows["shard 0"]["restarts"] > restarts
    )
    code, rows = status_rows(relay)
    assert code == 3 or rows["shard 0"]["state"] == "running", (code, rows)
    log = relay.log()[mark:]
    assert "shard 0: started" not in log, "shard 0 came up without its PVs"
    assert log.count("shard 0: cannot start") >= 3
    # The damaged store is kept, byte for byte, for a person to look at.
    kept = [
        p
        for p in relay.data_dir.iterdir()
        if p.name.startswith("shard-0.sqlite") and p.read_bytes() == damaged
    ]
    assert kept, "the damaged store is gone"


# -- 8. status: PV count, last flush and store size per shard -------------------------------


def test_status_shows_pvs_last_flush_and_store_size_per_shard(make_relay, ca):
    relay = make_relay(shards=2, extra=FAST)
    counts = {0: 3, 1: 5}
    names = {
        name_on_shard(relay, k, "counted"): float(k) for k, n in counts.items() for _ in range(n)
    }
    pvs = connect(ca, *names)
    for pv in pvs:
        assert put_ok(pv, [names[pv.name]])
    (wide,) = connect(ca, name_on_shard(relay, 0, "wide", "f200000"))
    assert put_ok(wide, np.arange(200_000.0), timeout=10)
    counts[0] += 1
    t0 = time.time()
    for pv in pvs:  # changed values: flushed within an autosave period
        assert put_ok(pv, [names[pv.name] + 0.5])

    header = relay.status().stdout.splitlines()[1]
    assert header.split()[:6] == ["PROCESS", "PID", "STATE", "UPTIME", "RESTARTS", "PVS"]
    assert "LAST FLUSH" in header and header.split()[-1] == "STORE", header

    def shown(rows):
        # Each process writes its own status file, on its own clock.
        return rows["broker"]["pvs"] == sum(counts.values()) and all(
            rows[f"shard {k}"]["pvs"] == n
            and rows[f"shard {k}"]["flush"] not in (None, "never")
            and time.mktime(time.strptime(rows[f"shard {k}"]["flush"], "%Y-%m-%d %H:%M:%S"))
            >= int(t0)
            for k, n in counts.items()
        )

    rows = status_when(relay, "status to show the counts and a flush of the updates", shown)
    for k in counts:
        flushed = time.mktime(time.strptime(rows[f"shard {k}"]["flush"], "%Y-%m-%d %H:%M:%S"))
        assert flushed <= time.time() + 1, rows
    # 200000 doubles live on shard 0 only: 1.6 MB in its store (and WAL), not in shard 1's.
    size = {k: store_bytes(rows[f"shard {k}"]) for k in counts}
    assert size[0] >= 1.6e6 and 0 < size[1] < 1e6, rows
    assert rows["broker"]["flush"] is None  # the broker has no store
