"""One relay per data directory, and a shard serves only the broker of its own relay."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import zmq

from bench.servers import free_port
from carelay.common.config import load_config
from carelay.common.messages import Delete, Hello, Put, Reject, Write
from carelay.common.protocol import decode_batch, encode_batch
from tests.system.conftest import CA_PORT, CARELAY, caproto_cli, wait_for

#: A second relay gets a CA port of its own: if it started, it must not split the
#: searches of the first one (which would be a second failure, not this test's).
SECOND_PORT = free_port({CA_PORT})


def _second(relay, role: str, *extra: str) -> subprocess.CompletedProcess:
    argv = relay.argv(role)
    if role == "shard":
        argv.insert(argv.index("shard") + 1, "0")
    env = {
        **os.environ,
        "EPICS_CAS_SERVER_PORT": str(SECOND_PORT),
        "EPICS_CA_SERVER_PORT": str(SECOND_PORT),
    }
    proc = subprocess.Popen(
        [*argv, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"a second `carelay {role}` kept running:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_line_naming(r: subprocess.CompletedProcess, pid: int) -> None:
    lines = [line for line in (r.stderr + r.stdout).splitlines() if line.strip()]
    assert r.returncode == 2, f"exit status {r.returncode}: {r.stderr}"
    assert len(lines) == 1 and str(pid) in lines[0], r.stderr


def _get(name: str, *flags: str) -> str:
    r = caproto_cli("get", "--terse", *flags, name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_second_relay_on_the_data_directory_exits_2_and_touches_nothing(make_relay, ca):
    relay = make_relay(shards=2)
    name = relay.name("count", "i1")
    (pv,) = ca.get_pvs(name, timeout=5)
    assert pv.write([1], wait=True, timeout=5).status.success
    mark = len(relay.log())

    for role in ("up", "broker", "shard"):
        _one_line_naming(_second(relay, role), relay.proc.pid)

    # The first relay goes on as before: same processes, same values, and its status.
    assert relay.alive
    assert "died" not in relay.log()[mark:]
    assert relay.status().returncode == 0, relay.status().stdout
    assert pv.read().data[0] == 1
    assert pv.write([2], wait=True, timeout=5).status.success
    assert _get(name) == "2"


def test_a_peer_without_the_token_gets_no_snapshot_and_cannot_put(make_relay, ca):
    relay = make_relay(shards=1)
    name = relay.name("kept", "f1")
    (pv,) = ca.get_pvs(name, timeout=5)
    assert pv.write([1.5], wait=True, timeout=5).status.success
    intruder = relay.name("intruder", "f1")
    config = load_config(prefix=relay.prefix, shards=1, data_dir=relay.data_dir)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(config.shard_endpoint(0))
        sock.send_multipart(encode_batch([Hello(1)]))
        sock.send_multipart(encode_batch([Put(intruder, 2, 0.0, np.array([9.0]))]))
        sock.send_multipart(encode_batch([Write(name, 3, 0.0, np.array([9.0]))]))
        sock.send_multipart(encode_batch([Delete(name, 4)]))
        answers = []
        while sock.poll(2000):
            answers += decode_batch(sock.recv_multipart())
        assert all(type(m) is Reject for m in answers), answers
    finally:
        sock.close()
        ctx.term()

    assert pv.read().data[0] == 1.5
    listed = _get(relay.prefix + "pvlist", "-S")
    assert name in listed and intruder not in listed
    # The broker's own link was not disturbed: a put still completes.
    assert pv.write([2.5], wait=True, timeout=5).status.success
    wait_for(lambda: _get(name) == "2.5", what="the put after the intruder")
    relay.stop()
    relay.start()
    assert _get(name) == "2.5"
    assert intruder not in _get(relay.prefix + "pvlist", "-S")


def test_a_broker_of_another_relay_gets_no_snapshot(make_relay, tmp_path):
    relay = make_relay(shards=1)
    endpoint = load_config(prefix=relay.prefix, shards=1, data_dir=relay.data_dir).shard_endpoint(0)
    config = tmp_path / "foreign.toml"
    config.write_text(f'prefix = "{relay.prefix}"\nshards = 1\nendpoints = ["{endpoint}"]\n')
    log = tmp_path / "foreign.log"
    env = {**os.environ, "EPICS_CAS_SERVER_PORT": str(SECOND_PORT)}
    argv = [*CARELAY, "broker", "--config", str(config), "--data-dir", str(tmp_path / "other")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "shard 0 refused" in log.read_text(), what="the shard to refuse it")
        assert "in sync" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
