"""Shards on another host: the broker here, the shards in a network namespace of their own.

The two "hosts" are joined by a veth pair, so broker-shard traffic crosses a
real network boundary (tcp between two interfaces, CurveZMQ keys), without
leaving this machine.  Needs root and iproute2, as CI has; skipped with the
reason otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import epics
import numpy as np
import pytest
import zmq

from carelay.common.messages import Put
from carelay.common.protocol import encode_batch
from carelay.common.sharding import shard_for
from tests.system.clients import Context
from tests.system.conftest import CARELAY, Relay, wait_for

PORTS = (5701, 5702)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)


class Hosts:
    """A namespace ``shardhost`` joined to this one by a veth pair."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = f"crl{tag}"
        self.here, self.there = f"crl{tag}a", f"crl{tag}b"
        net = 16 + secrets.randbelow(200)
        self.here_ip, self.there_ip = f"10.213.{net}.1", f"10.213.{net}.2"

    def up(self) -> str | None:
        """Make the namespace; the reason it cannot be made, or None."""
        if shutil.which("ip") is None:
            return "iproute2 (ip) is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        steps = [
            ("ip", "netns", "add", self.ns),
            ("ip", "link", "add", self.here, "type", "veth", "peer", "name", self.there),
            ("ip", "link", "set", self.there, "netns", self.ns),
            ("ip", "addr", "add", f"{self.here_ip}/24", "dev", self.here),
            ("ip", "link", "set", self.here, "up"),
            ("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.there_ip}/24",
             "dev", self.there),
            ("ip", "netns", "exec", self.ns, "ip", "link", "set", self.there, "up"),
            ("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"),
        ]  # fmt: skip
        for step in steps:
            r = _run(*step)
            if r.returncode != 0:
                self.down()
                return f"`{' '.join(step)}` failed: {r.stderr.strip()}"
        return None

    def link(self, up: bool) -> None:
        r = _run("ip", "link", "set", self.here, "up" if up else "down")
        assert r.returncode == 0, r.stderr

    def down(self) -> None:
        _run("ip", "netns", "del", self.ns)
        _run("ip", "link", "del", self.here)


class Proc:
    """One carelay process with its own log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k != "EPICS_CA_MAX_ARRAY_BYTES"}
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, start: int = 0, timeout: float = 30) -> None:
        wait_for(lambda: text in self.log()[start:], timeout, 0.05, f"{text!r} in {self.log_path}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def hosts():
    h = Hosts()
    why = h.up()
    if why is not None:
        print(f"skipping: {why}", file=sys.stderr)
        pytest.skip(why)
    yield h
    h.down()


@pytest.fixture
def site(hosts, tmp_path, request):
    """Keys, a configuration naming tcp endpoints on the shard host, and the processes."""
    # No other relay may hold the session's CA port.
    Relay.give_way()
    keys = tmp_path / "keys"
    r = subprocess.run([*CARELAY, "keys", str(keys)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    prefix = f"M{uuid.uuid4().hex[:8]}:"
    config = tmp_path / "carelay.toml"
    endpoints = ", ".join(f'"tcp://{hosts.there_ip}:{p}"' for p in PORTS)
    config.write_text(
        f'prefix = "{prefix}"\nshards = 2\nendpoints = [{endpoints}]\nkeys_dir = "{keys}"\n'
        "autosave_period = 0.2\n"
    )
    procs: dict[str, Proc] = {}

    def shard(k: int) -> Proc:
        argv = ["ip", "netns", "exec", hosts.ns, *CARELAY, "shard", "--config", str(config),
                "--index", str(k), "--data-dir", str(tmp_path / "shardhost")]  # fmt: skip
        procs[f"shard {k}"] = p = Proc(argv, tmp_path / f"shard{k}.log")
        p.wait_log(f"shard {k}: started")
        return p

    for k in range(2):
        shard(k)
    broker = Proc(
        [*CARELAY, "broker", "--config", str(config), "--data-dir", str(tmp_path / "brokerhost")],
        tmp_path / "broker.log",
    )
    procs["broker"] = broker
    broker.wait_log("ready:")
    ns = {"prefix": prefix, "broker": broker, "shard": shard, "procs": procs, "hosts": hosts}
    yield ns
    for p in procs.values():
        p.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for name, p in procs.items():
            sys.stderr.write(f"\n----- {name} log -----\n{p.log()}\n")


def name_on(prefix: str, shard: int, stem: str) -> str:
    while True:
        name = f"{prefix}{stem}{uuid.uuid4().hex[:6]}_f1"
        if shard_for(name, 2) == shard:
            return name


def test_create_put_read_monitor_restart_and_broken_link(site):
    prefix, broker = site["prefix"], site["broker"]
    a, b = name_on(prefix, 0, "a"), name_on(prefix, 1, "b")
    events = []
    monitor = epics.PV(a, callback=lambda value, **kw: events.append(value))
    assert monitor.wait_for_connection(timeout=10)
    assert epics.caput(a, 1.5, wait=True, timeout=5) == 1
    assert epics.caput(b, 2.5, wait=True, timeout=5) == 1
    assert epics.caget(a, use_monitor=False) == 1.5
    assert epics.caget(b, use_monitor=False) == 2.5
    wait_for(lambda: 1.5 in events, what="the monitor to see the first put")

    # A shard restarts on its host: the broker resyncs, the value is still there.
    mark = len(broker.log())
    site["procs"]["shard 0"].stop(signal.SIGKILL)
    broker.wait_log("shard 0 unreachable", start=mark)
    site["shard"](0)
    broker.wait_log("shard 0 in sync", start=mark)
    assert epics.caget(a, use_monitor=False) == 1.5
    assert epics.caput(a, 3.5, wait=True, timeout=5) == 1
    wait_for(lambda: 3.5 in events, what="the monitor to go on after the restart")

    # The link breaks: puts to both shards fail, then everything comes back.
    ctx = Context()
    try:
        (pv_b,) = ctx.get_pvs(b, timeout=5)
        pv_b.wait_for_connection(timeout=5)
        mark = len(broker.log())
        site["hosts"].link(False)
        # Both links cross the broken one: wait until the broker saw each go.
        broker.wait_log("shard 0 unreachable", start=mark, timeout=15)
        broker.wait_log("shard 1 unreachable", start=mark, timeout=15)
        assert not pv_b.write([9.0], wait=True, timeout=10).status.success
        reading = pv_b.read(data_type="time")
        assert reading.data[0] == 2.5 and reading.metadata.severity == 3  # INVALID
        site["hosts"].link(True)
        broker.wait_log("shard 0 in sync", start=mark, timeout=30)
        broker.wait_log("shard 1 in sync", start=mark, timeout=30)
        wait_for(
            lambda: pv_b.write([4.5], wait=True, timeout=5).status.success,
            timeout=15,
            what="a put across the mended link",
        )
        assert pv_b.read().data[0] == 4.5
        # caproto, not pyepics: pyepics reports a failed put with callback as done.
        (pv_a,) = ctx.get_pvs(a, timeout=5)
        assert pv_a.write([5.5], wait=True, timeout=5).status.success
    finally:
        ctx.disconnect()
    wait_for(lambda: 5.5 in events, what="the monitor to go on after the link came back")
    monitor.disconnect()


def test_a_peer_without_the_keys_is_refused(site):
    prefix, broker = site["prefix"], site["broker"]
    name = name_on(prefix, 0, "intruder")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        # Right protocol, no keys: the CurveZMQ handshake never completes.
        sock.connect(f"tcp://{site['hosts'].there_ip}:{PORTS[0]}")
        sock.send_multipart(encode_batch([Put(name, 1, 0.0, np.array([1.0]))]))
        assert not sock.poll(2000), "a peer without keys got an answer"
    finally:
        sock.close()
        ctx.term()
    listed = epics.caget(prefix + "pvlist", as_string=True, use_monitor=False)
    assert name not in (listed or "")
    assert "ready:" in broker.log()


def test_open_tcp_endpoint_without_keys_refuses_to_start(tmp_path):
    config = tmp_path / "open.toml"
    config.write_text('endpoints = ["tcp://0.0.0.0:5701", "tcp://0.0.0.0:5702"]\n')
    r = subprocess.run(
        [*CARELAY, "up", "--config", str(config), "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "keys_dir" in lines[0] and "0.0.0.0" in lines[0], r.stderr
    assert not (tmp_path / "d").exists()
