"""Health of each CA broker (``[[ca]]``): ``carelay status``, the health PVs, /metrics.

Two brokers on two loopback ports over the same shards, as in test_two_brokers.py:
each says which broker it is and how many of them serve, status shows each one's door
and clients, and broker 0's /metrics carries broker 1's figures.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid

import pytest

from bench.servers import free_port
from tests.system.clients import read_sevr
from tests.system.conftest import CA_PORT, REPEATER_PORT, using_shared, wait_for
from tests.system.test_metrics import scrape, value
from tests.system.test_two_brokers import PORT_B, _broker_pid, _config, _get_b, _TwoBrokers

METRICS_PORT = free_port({CA_PORT, REPEATER_PORT, PORT_B})


@pytest.fixture(scope="module")
def two_brokers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("health2")
    config = _config(tmp / "carelay.toml", f"metrics_port = {METRICS_PORT}\n\n")
    relay = _TwoBrokers(tmp, shards=2, extra=["--config", str(config)])
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture
def relay(two_brokers, request):
    yield from using_shared(two_brokers, request)


def _row(out: str, name: str) -> list[str]:
    for line in out.splitlines():
        words = line.split()
        if " ".join(words[: len(name.split())]) == name and len(words) > 3:
            return words
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_status_shows_each_broker_with_its_door_and_clients(relay, ca):
    (pv,) = ca.get_pvs(relay.prefix + "relay:HEARTBEAT", timeout=5)
    pv.wait_for_connection(timeout=5)  # one CA circuit to broker 0

    def shown():
        out = relay.status().stdout
        row = _row(out, "broker")
        return out if f"127.0.0.1:{CA_PORT}" in row and row[-1] != "0" else None

    out = wait_for(shown, what="broker 0's door and a client in status")
    header = out.splitlines()[0]
    assert f"CA ports {CA_PORT}, {PORT_B}" in header, header
    assert "2 of 2 brokers ready" in header, header
    assert "CLIENTS" in out.splitlines()[1]
    row = _row(out, "broker 1")
    assert row[3] == "running" and f"127.0.0.1:{PORT_B}" in row, row


def test_health_pvs_say_which_broker_and_how_many_serve(relay, ca):
    base = relay.prefix + "relay:"
    assert read_sevr(ca, base + "BROKER") == (0.0, 0)
    assert _get_b(base + "BROKER") == "1"
    assert read_sevr(ca, base + "BROKER_CNT") == (2.0, 0)
    wait_for(lambda: read_sevr(ca, base + "BROKER_UP_CNT") == (2.0, 0), what="2 brokers up")
    assert _get_b(base + "BROKER_UP_CNT") == "2"
    # Broker 1 alive but silent: not counted, and broker 0 raises a MINOR alarm.
    pid = _broker_pid(relay, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: read_sevr(ca, base + "BROKER_UP_CNT") == (1.0, 1),
            timeout=20,
            what="broker 0 counting 1 broker up",
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(
        lambda: read_sevr(ca, base + "BROKER_UP_CNT") == (2.0, 0),
        what="2 brokers up again",
    )


def test_metrics_of_broker_0_carry_broker_1(relay):
    def both_up():
        samples = scrape(METRICS_PORT)
        up = [value(samples, "carelay_broker_up", broker=str(k)) for k in (0, 1)]
        return samples if up == [1.0, 1.0] else None

    samples = wait_for(both_up, what="both brokers up in /metrics")
    assert value(samples, "carelay_brokers") == 2.0
    assert value(samples, "carelay_broker_ca_circuits", broker="1") is not None
    assert value(samples, "carelay_broker_put_rate_hertz", broker="1") is not None


def _broker_pid_or_none(relay, index: int) -> int | None:
    try:
        return _broker_pid(relay, index)
    except AssertionError:
        return None


def test_systemd_is_told_ready_once_every_broker_is(make_relay, monkeypatch, tmp_path):
    address = f"@carelay-test-{uuid.uuid4().hex}"
    config = _config(tmp_path / "two.toml")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + address[1:])
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        relay = make_relay(shards=2, extra=["--config", str(config)], start=False)
        relay.wait_ready = lambda start=0: None
        relay.start()

        def told_ready() -> bool:
            try:
                return b"READY=1" in sock.recv(4096).split(b"\n")
            except BlockingIOError:
                return False

        # Broker 1 is held back from its start: broker 0 gets ready alone.
        pid = wait_for(lambda: _broker_pid_or_none(relay, 1), interval=0.001, what="broker 1")
        os.kill(pid, signal.SIGSTOP)
        try:
            relay.wait_log(" broker: ready:")
            # The supervisor looks every 0.1 s: a READY=1 for broker 0 alone comes at once.
            with pytest.raises(AssertionError, match="timed out"):
                wait_for(told_ready, timeout=3, what="no READY=1 while broker 1 is not ready")
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(told_ready, timeout=30, what="READY=1 once broker 1 is ready too")
    assert " broker 1: ready:" in relay.log()
    assert f"all 2 CA brokers ready, CA ports {CA_PORT}, {PORT_B}" in relay.log()
