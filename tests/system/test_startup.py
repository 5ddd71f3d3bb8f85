"""Start-up and restart: the relay answers a name only once its shard is in sync.

A client that connects the moment the relay is reachable, a broker restarted
while a shard does not answer, a put made while a shard is being restarted,
the ready line and its CA port, and the readiness that systemd is told.
Puts that must succeed or fail go through caproto (pyepics does not report a
failed put callback).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import uuid
from pathlib import Path

import psutil
import pytest
from caproto import AlarmSeverity, AlarmStatus

from bench.servers import free_port
from tests.system.clients import Context, close, name_on_shard, role_pid
from tests.system.conftest import CA_PORT, wait_for


@pytest.fixture
def ca():
    ctx = Context()
    yield ctx
    close(ctx)


def started_unready(relay):
    """Start ``relay`` without waiting for its ready line."""
    relay.wait_ready = lambda start=0: None
    return relay.start()


def port_reachable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True


def connected(ctx: Context, name: str, timeout: float = 15.0):
    (pv,) = ctx.get_pvs(name, timeout=timeout)
    pv.wait_for_connection(timeout=timeout)
    return pv


def read_time(pv):
    r = pv.read(data_type="time", timeout=5)
    return r.data.tolist(), r.metadata.severity, r.metadata.status


def listening_ports(pid: int) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_a_put_the_moment_the_port_is_reachable_succeeds(make_relay, ca):
    relay = make_relay(shards=2, start=False)
    name = name_on_shard(relay, 0, "early")
    started_unready(relay)
    # Shard 0 is slow to come up (a large store, a busy host): stopped from its start
    # until the client below has tried it.
    shard0 = wait_for(lambda: role_pid(relay, "shard 0"), interval=0.001, what="shard 0")
    os.kill(shard0, signal.SIGSTOP)
    done: dict = {}

    def client():
        try:
            pv = connected(ca, name)
            done["put"] = pv.write([1.5], wait=True, timeout=10).status.success
            egu = connected(ca, name + ".EGU")
            done["egu"] = egu.write(b"K", wait=True, timeout=10).status.success
            done["read"] = egu.read(timeout=5).data[0], read_time(pv)[:2]
        except Exception as e:  # reported below
            done["error"] = e

    try:
        wait_for(lambda: port_reachable(CA_PORT), timeout=30, interval=0.005, what="the port")
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        # Until the client has put, or its search went unanswered.
        wait_for(
            lambda: not thread.is_alive() or "shard 0 not in sync" in relay.log(),
            timeout=30,
            what="the client's first try",
        )
    finally:
        os.kill(shard0, signal.SIGCONT)
    thread.join(timeout=60)
    assert "error" not in done, done
    assert done["put"] and done["egu"], done
    assert done["read"] == (b"K", ([1.5], AlarmSeverity.NO_ALARM)), done


@pytest.mark.slow
def test_a_restarted_broker_does_not_serve_the_pvs_of_a_shard_not_in_sync(make_relay, ca):
    relay = make_relay(shards=2)
    kept, other = name_on_shard(relay, 0, "kept"), name_on_shard(relay, 1, "other")
    assert connected(ca, kept).write([5.5], wait=True, timeout=5).status.success
    assert connected(ca, other).write([6.5], wait=True, timeout=5).status.success
    shard0 = role_pid(relay, "shard 0")
    mark = len(relay.log())
    os.kill(shard0, signal.SIGSTOP)
    fresh = Context()
    try:
        os.kill(role_pid(relay, "broker"), signal.SIGKILL)
        relay.wait_log("restarted broker", start=mark)
        relay.wait_log("shard 1 in sync", start=mark)
        # The broker serves shard 1; shard 0's stored PV gets no search answer at all,
        # rather than being served as a new, undefined one.
        assert read_time(connected(fresh, other))[:2] == ([6.5], AlarmSeverity.NO_ALARM)
        (pv,) = fresh.get_pvs(kept, timeout=3)
        with pytest.raises(TimeoutError):
            pv.wait_for_connection(timeout=3)
    finally:
        os.kill(shard0, signal.SIGCONT)
    try:
        pv.wait_for_connection(timeout=20)
        assert read_time(pv) == ([5.5], AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)
    finally:
        close(fresh)


def test_a_put_during_a_short_shard_restart_waits_for_it(make_relay, ca):
    relay = make_relay(shards=2)
    pv = connected(ca, name_on_shard(relay, 0, "grace"))
    assert pv.write([1.5], wait=True, timeout=5).status.success
    mark = len(relay.log())
    os.kill(role_pid(relay, "shard 0"), signal.SIGKILL)
    # The broker saw the shard go (COMM alarm): the put below arrives during the restart.
    wait_for(lambda: read_time(pv)[2] == AlarmStatus.COMM, interval=0.01, what="the COMM alarm")
    # Puts without callback wait too, and go in the order they came.
    pv.write([2.0], wait=False)
    pv.write([2.25], wait=False)
    assert pv.write([2.5], wait=True, timeout=10).status.success
    relay.wait_log("shard 0 in sync", start=mark)
    assert read_time(pv) == ([2.5], AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)
    assert "put to " not in relay.log()[mark:], "a put failed"


@pytest.mark.slow
def test_a_put_fails_once_the_grace_is_over_and_is_never_applied(make_relay, ca):
    relay = make_relay(shards=2)
    pv = connected(ca, name_on_shard(relay, 0, "late"))
    assert pv.write([1.5], wait=True, timeout=5).status.success
    shard0 = role_pid(relay, "shard 0")
    mark = len(relay.log())
    os.kill(shard0, signal.SIGSTOP)  # alive but silent: the link goes down, nothing restarts
    try:
        wait_for(lambda: read_time(pv)[2] == AlarmStatus.COMM, what="the COMM alarm")
        assert not pv.write([2.5], wait=True, timeout=10).status.success
        relay.wait_log(f"put to {pv.name} failed: shard 0 unreachable", start=mark)
    finally:
        os.kill(shard0, signal.SIGCONT)
    relay.wait_log("shard 0 in sync", start=mark)
    assert read_time(pv) == ([1.5], AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)


def test_the_ready_line_names_the_real_tcp_port(make_relay, monkeypatch):
    port = free_port({CA_PORT})
    relay = make_relay(shards=1, start=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        # This relay alone listens on its own port: the session's stays free for others.
        monkeypatch.setenv("EPICS_CAS_SERVER_PORT", str(port))
        monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
        try:
            relay.start()
            broker = role_pid(relay, "broker")
            real = listening_ports(broker)
            status = json.loads((relay.data_dir / "run" / "broker.json").read_text())
        finally:
            relay.stop()
    assert port not in real and len(real) == 1, real
    (real,) = real
    ready = [line for line in relay.log().splitlines() if "ready:" in line]
    assert len(ready) == 1 and ready[0].endswith(f"CA port {real}"), ready
    assert status["ready"] is True and status["ca_port"] == real, status


def test_a_udp_port_held_by_another_program_is_said_and_served_once_free(make_relay, monkeypatch):
    """CA servers share their UDP port; one held by a program that does not share it
    made PCAS abort the broker (SIGABRT) again and again.  The broker now says why and
    exits; the supervisor retries, and serves once the port is free."""
    port = free_port({CA_PORT})
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", str(port))
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
    relay = make_relay(shards=1, start=False)
    relay.wait_ready = lambda start=0: relay.wait_log("broker died (exit status 3)", start=start)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", port))
        relay.start()
        said = f"broker cannot serve CA: UDP port {port} on 127.0.0.1 is held by a program"
        assert said in relay.log(), relay.log()

        def shown():
            r = relay.status()
            return r if "broker: last error" in r.stdout else None

        r = wait_for(shown, what="the broker's last error in carelay status")
        assert r.returncode == 3 and said in r.stdout, r.stdout
    mark = len(relay.log())
    relay.wait_log(" broker: ready:", start=mark)
    assert "SIGABRT" not in relay.log()


def test_systemd_is_told_ready_after_the_ready_line(make_relay, monkeypatch):
    address = f"@carelay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + address[1:])
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        relay = make_relay(shards=2, start=False)
        started_unready(relay)
        got: list[tuple[bytes, bool]] = []

        def received():
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return False
            got.append((data, "ready:" in relay.log()))
            return b"READY=1" in data.split(b"\n")

        wait_for(received, timeout=30, what="READY=1 on NOTIFY_SOCKET")
    assert all(seen for _, seen in got), got
    status = json.loads((relay.data_dir / "run" / "broker.json").read_text())
    assert status["ready"] is True and status["ca_port"] == CA_PORT, status
    # The children do not inherit the socket: only the supervisor speaks for the unit.
    for pid in relay.children():
        if pid != relay.proc.pid:
            assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{pid}/environ").read_bytes()
