"""Two CA brokers (``[[ca]]``) over the same shards: what one serves, the other serves.

One ``carelay up`` with two brokers on two loopback ports: broker 0 on the session's
CA port (the in-process caproto context of ``ca`` talks to it), broker 1 on a second
free port, reached by caproto's command-line tools pointed at that port.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.creation_race import create_at_once
from bench.servers import free_port
from carelay.common.lifecycle import read_status, status_path
from tests.system.clients import get, name_on_shard, role_pid
from tests.system.conftest import (
    CA_PORT,
    CARELAY,
    REPEATER_PORT,
    Relay,
    caproto_cli,
    using_shared,
    wait_for,
)

PORT_B = free_port({CA_PORT, REPEATER_PORT})


def _config(path: Path, head: str = "") -> Path:
    """Two [[ca]] brokers on loopback, after the settings in ``head``."""
    path.write_text(
        head + f'[[ca]]\ninterfaces = ["127.0.0.1"]\nport = {CA_PORT}\n\n'
        f'[[ca]]\ninterfaces = ["127.0.0.1"]\nport = {PORT_B}\n'
    )
    return path


class _TwoBrokers(Relay):
    def wait_ready(self, start: int = 0) -> None:
        # Each broker says it is ready, in either order: a test that went on at the first
        # line could search broker 0 before its shards are in sync, and caproto's
        # search back-off can then outlast the test's patience.
        self.wait_log(" broker: ready:", start=start)
        self.wait_log(" broker 1: ready:", start=start)


@pytest.fixture(scope="module")
def two_brokers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    relay = _TwoBrokers(tmp, shards=2, extra=["--config", str(_config(tmp / "carelay.toml"))])
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture
def relay(two_brokers, request):
    yield from using_shared(two_brokers, request)


def _on_b(tool: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """caproto's ``tool`` against broker 1 only."""
    env = {**os.environ, "EPICS_CA_SERVER_PORT": str(PORT_B), "EPICS_CA_ADDR_LIST": "127.0.0.1"}
    return caproto_cli(tool, *args, timeout=timeout, env=env)


def _monitor_on_b(*args: str) -> subprocess.Popen:
    """caproto's monitor against broker 1, its lines on ``stdout``: a client of broker 1
    that holds a channel until it is killed."""
    env = {**os.environ, "EPICS_CA_SERVER_PORT": str(PORT_B)}
    return subprocess.Popen(
        [sys.executable, "-m", "caproto.commandline.monitor", "--no-repeater", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _get_b(name: str) -> str | None:
    out = _on_b("get", "--terse", name)
    return out.stdout.strip() if out.returncode == 0 else None


def _get_a(ca, name: str) -> float | None:
    """``name`` through broker 0; None while it cannot be reached (a restart)."""
    (pv,) = ca.get_pvs(name, timeout=5)
    try:
        return float(pv.read(timeout=5).data[0])
    except TimeoutError:
        return None


def _broker_pid(relay: Relay, index: int) -> int:
    for pid in relay.children():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"broker" not in cmd or (b"--index" in cmd) != bool(index):
            continue
        if not index or cmd[cmd.index(b"--index") + 1] == str(index).encode():
            return pid
    raise AssertionError(f"no broker {index} of {relay.prefix} runs")


def test_a_put_through_one_broker_is_read_and_monitored_through_the_other(relay, ca):
    name = relay.name("across", "f1")
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.write([1.5], wait=True, timeout=5)  # through broker 0: creates it
    wait_for(lambda: _get_b(name) == "1.5", what=f"{name} = 1.5 through broker 1")
    env = {**os.environ, "EPICS_CA_SERVER_PORT": str(PORT_B)}
    monitor = subprocess.Popen(
        [sys.executable, "-m", "caproto.commandline.monitor", "--no-repeater"]
        + ["--maximum", "2", "--format", "{response.data[0]}", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert monitor.stdout.readline().strip() == "1.5"  # subscribed through broker 1
        pv.write([2.5], wait=True, timeout=5)
        out, _ = monitor.communicate(timeout=20)
    finally:
        monitor.kill()
    assert out.strip() == "2.5"


def test_a_put_from_one_then_from_the_other_ends_with_the_second_on_both(relay, ca):
    name = relay.name("last", "f1")
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.write([1.0], wait=True, timeout=5)
    wait_for(lambda: _get_b(name) == "1", what=f"{name} created on broker 1")
    for value in (2.0, 3.0):
        pv.write([value], wait=False)  # through broker 0, no callback: the write-through
        done = _on_b("put", "-c", name, str(value + 10))
        assert done.returncode == 0, done.stderr
        wait_for(lambda v=value: _get_a(ca, name) == v + 10, what=f"broker 0 shows {value + 10}")
        assert _get_b(name) == str(int(value + 10))


def test_a_broker_killed_leaves_the_other_serving(relay, ca):
    name = relay.name("survivor", "f1")
    os.kill(_broker_pid(relay, 1), signal.SIGKILL)
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.write([4.0], wait=True, timeout=5)  # broker 0 serves on, and creates it
    assert _get_a(ca, name) == 4.0
    # Broker 1 comes back (restarted by the supervisor) with what was done meanwhile.
    wait_for(lambda: _get_b(name) == "4", timeout=30, what=f"{name} through broker 1 again")
    # And the other way round.
    os.kill(_broker_pid(relay, 0), signal.SIGKILL)
    done = _on_b("put", "-c", name, "5")
    assert done.returncode == 0, done.stderr
    assert _get_b(name) == "5"
    wait_for(lambda: _get_a(ca, name) == 5.0, timeout=30, what=f"{name} through broker 0 again")
    assert relay.alive


def test_status_shows_each_broker(relay):
    out = relay.status().stdout
    rows = {" ".join(line.split()[:2]): line for line in out.splitlines()}
    assert "running" in rows["broker " + str(_broker_pid(relay, 0))], out
    assert "running" in rows["broker 1"], out


@pytest.mark.parametrize("given", ["the relay's flags", "the data directory alone"])
def test_reload_acf_asks_every_broker(relay, given):
    """``carelay reload-acf`` signals each broker, not only the first: each reads its
    access security anew (here none is configured, and each says so).  The brokers are
    those of the running relay: ``--data-dir`` alone names no ``[[ca]]``."""
    start = len(relay.log())
    argv = relay.argv("reload-acf")
    if given == "the data directory alone":
        argv = [*CARELAY, "reload-acf", "--data-dir", str(relay.data_dir)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "asked the broker (pid" in r.stdout and "asked the broker 1 (pid" in r.stdout
    for role in ("broker", "broker 1"):
        relay.wait_log(f" {role}: access security not reloaded", start=start, timeout=10)


# -- following: a broker is sent another's puts only to what its clients hold ----------


def _floats_b(name: str) -> list[float] | None:
    """The elements of ``name`` read through broker 1 on a channel of its own."""
    out = _on_b("get", "--format", "{response.data}", name)
    if out.returncode != 0:
        return None
    return [float(x) for x in re.findall(r"[-+0-9.e]+", out.stdout.strip().strip("[]"))]


def _followed(relay: Relay, by_broker: int) -> int:
    """How many PVs the shards' status files say are followed, read once broker 1's says
    it follows ``by_broker`` and every shard's was written after that (the shards count
    broker 0's follows too, and their files may lag broker 1's by a second)."""
    run = relay.data_dir / "run"
    broker = status_path(run, "broker 1")
    shards = [status_path(run, f"shard {k}") for k in range(relay.shards)]
    wait_for(
        lambda: (read_status(broker) or {}).get("followed") == by_broker,
        timeout=15,
        what=f"broker 1 to follow {by_broker} PVs",
    )
    since = time.time()

    def written() -> tuple[int] | None:
        with contextlib.suppress(FileNotFoundError):
            if all(path.stat().st_mtime > since for path in shards):
                return (sum((read_status(path) or {}).get("followed", 0) for path in shards),)
        return None

    return wait_for(written, timeout=15, what="the shards' status files")[0]


def test_a_new_channel_through_the_other_broker_reads_what_its_shard_holds(relay, ca):
    """Broker 1 holds no channel of these PVs between reads, so its shards send it none
    of broker 0's puts to them: each read opens a channel, which reads each PV as its
    shard holds it, a buffer whole."""
    scalar, buffer = relay.name("fresh", "f1"), relay.name("freshbuf", "F8")
    pv, buf = ca.get_pvs(scalar, buffer, timeout=5)
    buf.write([1.0, 2.0], wait=True, timeout=5)
    appended = [1.0, 2.0]
    for k in range(4):
        pv.write([k + 0.5], wait=True, timeout=5)
        buf.write([k + 10.0], wait=True, timeout=5)
        appended.append(k + 10.0)
        assert _get_b(scalar) == str(k + 0.5)
        assert _floats_b(buffer) == appended


def test_a_broker_follows_a_pv_while_a_client_of_it_holds_a_channel(relay):
    name = relay.name("held", "f1")
    done = _on_b("put", name, "1.5")  # made through broker 1, whose channel then goes
    assert done.returncode == 0, done.stderr
    shards = _followed(relay, 0)
    monitor = _monitor_on_b(name)
    try:
        assert "1.5" in monitor.stdout.readline()
        assert _followed(relay, 1) == shards + 1
    finally:
        monitor.kill()
        monitor.wait(timeout=10)
    assert _followed(relay, 0) == shards


def test_a_monitor_on_the_other_broker_sees_puts_after_its_shard_restarts(relay, ca):
    """Broker 1 follows the PV its monitor holds: after a kill -9 of the PV's shard, it
    tells the new process so with its HELLO, and the monitor sees broker 0's puts."""
    name = name_on_shard(relay, 1, "restart")
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.write([1.0], wait=True, timeout=5)
    monitor = _monitor_on_b("--format", "{response.data[0]}", name)
    try:
        assert monitor.stdout.readline().strip() == "1.0"
        old = role_pid(relay, "shard 1")
        mark = len(relay.log())
        os.kill(old, signal.SIGKILL)
        relay.wait_log("broker 1: shard 1 in sync", start=mark, timeout=30)
        relay.wait_log("broker: shard 1 in sync", start=mark, timeout=30)

        def put_seen() -> bool:
            with contextlib.suppress(TimeoutError, OSError):
                pv.write([7.0], wait=True, timeout=2)
                return True
            return False

        wait_for(put_seen, timeout=30, what="a put through broker 0 after the restart")
        seen: list[str] = []
        reader = threading.Thread(
            target=lambda: seen.extend(line.strip() for line in monitor.stdout), daemon=True
        )
        reader.start()
        wait_for(lambda: "7.0" in seen, timeout=20, what=f"7.0 among the monitor's {seen}")
    finally:
        monitor.kill()
        monitor.wait(timeout=10)


def test_a_put_completes_once_the_broker_whose_client_holds_the_pv_has_it(relay, ca):
    """A put with callback through broker 0 to a PV a client of broker 1 holds completes
    once broker 1 has the change (the shard's read gate), so a read there right after
    it gives the new value, whatever the change's way between the processes.  A broker
    that hangs delays such puts once, by SHOWN_WAIT, and is waited for again once it
    has caught up."""
    name = relay.name("gated", "f1")
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.write([1.5], wait=True, timeout=5)
    monitor = _monitor_on_b(name)
    pid = _broker_pid(relay, 1)
    try:
        assert "1.5" in monitor.stdout.readline()
        _followed(relay, 1)  # broker 1 follows it, and watches it
        offset = len(relay.log())
        os.kill(pid, signal.SIGSTOP)
        try:
            for v in (2.0, 3.0):  # each completes: the first after SHOWN_WAIT
                assert pv.write([v], wait=True, timeout=5).status.success
            relay.wait_log("did not show a change within", start=offset)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: _get_b(name) == "3", what="broker 1 to catch up")
        pv.write([4.0], wait=True, timeout=5)
        relay.wait_log("a front-end caught up", start=offset)
    finally:
        monitor.kill()
        monitor.wait(timeout=10)


def test_two_brokers_creating_at_once_keep_to_max_pvs(make_relay, tmp_path):
    """Each front-end checks max_pvs against the PVs it has seen; creations another one
    has on their way are not among them.  Two clients creating 60 PVs each through the
    two brokers at once, with max_pvs 40, made 74 PVs.  Now each front-end keeps its
    creations in flight to its share of what is left: together they pass max_pvs by a
    few at most (one creation each with none in flight, and what another front-end
    made that it has not seen yet), and each stored PV holds the value put."""
    relay = make_relay(
        kind=_TwoBrokers, extra=["--config", str(_config(tmp_path / "c.toml", "max_pvs = 40\n"))]
    )
    create_at_once(relay.prefix, [CA_PORT, PORT_B], 60)
    relay.wait_log("max_pvs (40)")

    names = get(relay.prefix + "pvlist", as_string=True).split(",")
    assert 20 <= len(names) <= 45, f"{len(names)} PVs stored, max_pvs 40"
    for name in names:
        assert get(name) == 1.0, name
