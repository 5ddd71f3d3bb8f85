"""Expiry of requests (codec and shard), the shard's token check, and the run lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from carelay.broker.sync import ShardSync
from carelay.common.config import RUN_LOCK_FILE, load_config
from carelay.common.messages import (
    EXPIRED,
    Ack,
    Applied,
    Delete,
    Hello,
    Message,
    Ping,
    Pong,
    Put,
    Reject,
    SetField,
    SnapshotBegin,
    SnapshotEnd,
    Update,
    Write,
)
from carelay.common.protocol import (
    BATCH_TAG,
    ProtocolError,
    WriteRun,
    decode_batch,
    encode_batch,
)
from carelay.common.runlock import DataDirInUse, holders, join_run, lock_run, run_token
from carelay.shard.server import ShardServer

PREFIX = "U:"
NAME = "U:x_F10"


def _server(tmp_path, token: str | None = None) -> ShardServer:
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    return ShardServer(config, 0, token=token)


def _send(server: ShardServer, msgs: list, peer: bytes = b"b") -> list[Message]:
    server.handle(peer, encode_batch(msgs))
    out = [msg for _, msg in server._out]
    server._out.clear()
    return out


def _run(reqs: list[int], values: list[float], expires: float) -> WriteRun:
    run = WriteRun(np.dtype("<f8"), expires=expires)
    for req, v in zip(reqs, values, strict=True):
        run.add(NAME, req, 1.0, np.array([v]))
    return run


# -- the codec ---------------------------------------------------------------------


def test_a_run_carries_its_expiry():
    (run,) = decode_batch(encode_batch([_run([0, 7], [1.0, 2.0], 1234.5)]), to_shard=True)
    assert run.expires == 1234.5 and run.reqs == [0, 7]
    (run,) = decode_batch(encode_batch([_run([0, 0], [1.0, 2.0], 0.0)]), to_shard=True)
    assert run.expires == 0.0


@pytest.mark.parametrize("expires", [-1.0, 5, "soon", None, float("nan")])
def test_a_malformed_expiry_drops_the_batch(expires):
    import msgpack

    entry = _run([7], [1.0], 1.0).entry()
    entry[6] = expires
    with pytest.raises(ProtocolError, match="expiry"):
        decode_batch([BATCH_TAG + msgpack.packb([entry], use_bin_type=True)], to_shard=True)


def test_a_message_carries_its_expiry():
    msg = Put(NAME, 3, 0.0, np.array([1.0]), expires=99.5)
    (back,) = decode_batch(encode_batch([msg]))
    assert back.expires == 99.5


# -- the shard -----------------------------------------------------------------------


def test_an_expired_put_is_refused_and_changes_nothing(tmp_path):
    server = _server(tmp_path)
    past, future = time.time() - 1, time.time() + 60
    created = _send(server, [Put(NAME, 1, 0.0, np.array([1.0]), expires=future)])
    assert [type(m) for m in created] == [Update]
    late = [
        Put(NAME, 2, 0.0, np.array([2.0]), expires=past),
        SetField(NAME, 3, "EGU", "V", expires=past),
        Delete(NAME, 4, expires=past),
    ]
    out = _send(server, late)
    assert [(type(m), m.req) for m in out] == [(Reject, 2), (Reject, 3), (Reject, 4)]
    assert all("expired" in m.reason for m in out)
    assert server.store.get(NAME).tolist() == [1.0]
    assert NAME in server.store


def test_expired_writes_that_wait_are_dropped_and_the_plain_ones_applied(tmp_path):
    server = _server(tmp_path)
    _send(server, [Put(NAME, 1, 0.0, np.array([1.0]))])
    out = _send(server, [_run([0, 5, 0], [2.0, 3.0, 4.0], time.time() - 1)])
    # The dropped one is refused, then the PV as the shard holds it, for the mirror.
    assert [(type(m), m.req) for m in out] == [(Reject, 5), (Update, 0)]
    assert out[1].reset
    assert server.store.get(NAME).tolist() == [1.0, 2.0, 4.0]
    # A WRITE of an array, alone: the same.
    late = Write(NAME, 6, 0.0, np.array([5.0, 6.0]), expires=time.time() - 1)
    assert [type(m) for m in _send(server, [late])] == [Reject, Update]
    assert server.store.get(NAME).tolist() == [1.0, 2.0, 4.0]


def test_a_write_within_its_expiry_is_applied(tmp_path):
    server = _server(tmp_path)
    _send(server, [Put(NAME, 1, 0.0, np.array([1.0]))])
    out = _send(server, [_run([0, 5], [2.0, 3.0], time.time() + 60)])
    assert [(type(m), m.req) for m in out] == [(Ack, 5)]
    assert server.store.get(NAME).tolist() == [1.0, 2.0, 3.0]


def test_hello_and_ping_never_expire():
    assert not hasattr(Ping(9), "expires") and not hasattr(Hello(9), "expires")


# -- the token -----------------------------------------------------------------------


def test_a_peer_is_served_only_after_a_hello_with_the_token(tmp_path):
    server = _server(tmp_path, token="s3cret")
    put = Put(NAME, 2, 0.0, np.array([1.0]))
    assert _send(server, [put], peer=b"x") == []
    out = _send(server, [Hello(3, token="guess")], peer=b"x")
    assert [type(m) for m in out] == [Reject]
    assert _send(server, [put], peer=b"x") == []
    assert NAME not in server.store
    out = _send(server, [Hello(4, token="s3cret"), put], peer=b"b")
    assert [type(m) for m in out] == [SnapshotBegin, SnapshotEnd, Update]
    # Admitted once, served from then on; another peer still is not.
    assert [type(m) for m in _send(server, [Ping(5)], peer=b"b")] == [Pong]
    assert _send(server, [Ping(6)], peer=b"y") == []


# -- the run lock ----------------------------------------------------------------------


def _hold(data_dir, how: str) -> subprocess.Popen:
    """Another process holding ``data_dir`` (``up`` or a standalone ``shard``)."""
    code = (
        "import sys, pathlib, time\n"
        "from carelay.common.runlock import join_run, lock_run\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "fds = lock_run(d) if sys.argv[2] == 'up' else join_run(d)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir), how], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_run_lock_names_its_holder_and_is_free_once_it_is_gone(tmp_path):
    proc = _hold(tmp_path, "up")
    try:
        assert holders(tmp_path / RUN_LOCK_FILE) == [proc.pid]
        for take in (lock_run, join_run):
            with pytest.raises(DataDirInUse, match=f"pid {proc.pid}"):
                take(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    os.close(lock_run(tmp_path))


def test_roles_started_alone_share_a_data_directory_but_not_with_up(tmp_path):
    proc = _hold(tmp_path, "shard")
    try:
        fds = join_run(tmp_path, "broker.lock")
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            join_run(tmp_path, "broker.lock")
        with pytest.raises(DataDirInUse, match=f"{proc.pid}"):
            lock_run(tmp_path)
        for fd in fds:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()


def test_processes_started_alone_share_one_token_file(tmp_path):
    config = load_config(data_dir=str(tmp_path))
    token = run_token(config)
    assert token and run_token(config) == token
    assert (tmp_path / "carelay.token").stat().st_mode & 0o777 == 0o600


def test_a_broker_that_says_hello_again_fences_its_earlier_connection(tmp_path):
    server = _server(tmp_path, token="s3cret")
    _send(server, [Hello(1, "s3cret", "b1")], peer=b"old")
    _send(server, [Put(NAME, 2, 0.0, np.array([1.0]))], peer=b"old")
    _send(server, [Hello(3, "s3cret", "b1")], peer=b"new")
    # What the old connection still brings: requests refused, plain WRITEs dropped.
    late = [_run([0, 4], [2.0, 3.0], 0.0), Delete(NAME, 5)]
    out = _send(server, late, peer=b"old")
    assert [(type(m), m.req) for m in out] == [(Reject, 4), (Reject, 5)]
    assert server.store.get(NAME).tolist() == [1.0]
    # Another broker's connection is not fenced by it.
    _send(server, [Hello(6, "s3cret", "b2")], peer=b"other")
    out = _send(server, [_run([7], [4.0], 0.0)], peer=b"new")
    # Its sender's answer and how far its WRITEs are applied, and the change published
    # to the other broker.
    assert [type(m) for m in out] == [Update, Ack, Applied]
    assert [m.req for m in out[:2]] == [0, 7]
    assert [type(m) for m in _send(server, [Ping(8)], peer=b"other")] == [Pong]


def test_with_keys_a_front_end_under_carelay_up_presents_its_run_token(tmp_path, monkeypatch):
    """So that a shard of another run (same endpoints and keys) refuses it; started
    alone, with keys, it presents none (the keys admit it)."""
    from carelay.common import runlock

    (tmp_path / "keys").mkdir()
    for name in ("shard.key", "broker.key"):
        (tmp_path / "keys" / name).write_text("")
    config = load_config(data_dir=str(tmp_path / "data"), keys_dir=str(tmp_path / "keys"))
    monkeypatch.setenv(runlock.RUN_TOKEN_ENV, "this run")
    assert run_token(config) is None  # not a child of the relay's `carelay up`
    monkeypatch.setattr(runlock, "supervised", lambda data_dir: True)
    assert run_token(config) == "this run"


def test_a_put_the_shard_dropped_as_expired_fails_once_as_a_timeout():
    """A stopped shard, resumed just before the deadline, drops a put that came past its
    expiry: the broker files it as the timeout it is, once (here, or at the deadline if
    that came first), not as a refusal of the shard's."""
    errors: list = []
    waiting = {7: SimpleNamespace(client=("host", "user"))}
    link = SimpleNamespace(
        index=0, write_places={}, own_writes={}, stale_restate=set(), usable=True
    )
    broker = SimpleNamespace(
        links=[link],
        table=SimpleNamespace(),
        config=SimpleNamespace(front_ends=1),
        error=lambda *args: errors.append(args) or True,
        requests=SimpleNamespace(
            waiter=lambda k, req: waiting.get(req),
            finish=lambda k, req, ok: waiting.pop(req, None),
        ),
    )
    sync = ShardSync(broker)
    sync._reject(link, Reject(7, "a_f1", EXPIRED, 1))
    assert errors == [
        ("shard_down", "no answer from the shard in time", "a_f1", 0, ("host", "user"))
    ]
    sync._reject(link, Reject(8, "a_f1", EXPIRED, 1))  # failed at its deadline already
    assert len(errors) == 1
