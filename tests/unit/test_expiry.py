"""Expiry of requests (codec and shard), the shard's token check, and the run lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from carelay.common.config import RUN_LOCK_FILE, load_config
from carelay.common.protocol import (
    BATCH_TAG,
    Message,
    Op,
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


def test_a_run_carries_its_expiry_and_a_run_without_one_stays_as_it_was():
    (run,) = decode_batch(encode_batch([_run([0, 7], [1.0, 2.0], 1234.5)]), runs=True)
    assert run.expires == 1234.5 and run.reqs == [0, 7]
    plain = encode_batch([_run([0, 0], [1.0, 2.0], 0.0)])
    (run,) = decode_batch(plain, runs=True)
    assert run.expires == 0.0
    # The plain run is the six fields it always was: no byte more on the hot path.
    assert len(plain[0]) < len(encode_batch([_run([0, 0], [1.0, 2.0], 1.5)])[0])


@pytest.mark.parametrize("expires", [-1.0, 5, "soon", None, float("nan")])
def test_a_malformed_expiry_drops_the_batch(expires):
    import msgpack

    entry = _run([7], [1.0], 1.0)._entry()
    entry[6] = expires
    with pytest.raises(ProtocolError, match="expiry"):
        decode_batch([BATCH_TAG + msgpack.packb([entry], use_bin_type=True)], runs=True)


def test_a_message_carries_its_expiry_in_info():
    msg = Message(Op.PUT, NAME, req=3, info={"expires": 99.5}, data=np.array([1.0]))
    (back,) = decode_batch(encode_batch([msg]))
    assert back.info["expires"] == 99.5


# -- the shard -----------------------------------------------------------------------


def test_an_expired_put_is_refused_and_changes_nothing(tmp_path):
    server = _server(tmp_path)
    past, future = time.time() - 1, time.time() + 60
    created = _send(server, [Message(Op.PUT, NAME, req=1, info={"expires": future},
                                     data=np.array([1.0]))])  # fmt: skip
    assert [m.op for m in created] == [Op.UPDATE]
    late = [
        Message(Op.PUT, NAME, req=2, info={"expires": past}, data=np.array([2.0])),
        Message(Op.SET_FIELD, NAME, req=3, info={"field": "EGU", "value": "V", "expires": past}),
        Message(Op.DELETE, NAME, req=4, info={"expires": past}),
    ]
    out = _send(server, late)
    assert [(m.op, m.req) for m in out] == [(Op.REJECT, 2), (Op.REJECT, 3), (Op.REJECT, 4)]
    assert all("expired" in m.reason for m in out)
    assert server.store.get(NAME).tolist() == [1.0]
    assert NAME in server.store


def test_expired_writes_that_wait_are_dropped_and_the_plain_ones_applied(tmp_path):
    server = _server(tmp_path)
    _send(server, [Message(Op.PUT, NAME, req=1, data=np.array([1.0]))])
    out = _send(server, [_run([0, 5, 0], [2.0, 3.0, 4.0], time.time() - 1)])
    # The dropped one is refused, then the PV as the shard holds it, for the mirror.
    assert [(m.op, m.req) for m in out] == [(Op.REJECT, 5), (Op.UPDATE, 0)]
    assert out[1].info.get("restate") == 1
    assert server.store.get(NAME).tolist() == [1.0, 2.0, 4.0]
    # A WRITE of an array, alone: the same.
    late = Message(Op.WRITE, NAME, req=6, info={"expires": time.time() - 1},
                   data=np.array([5.0, 6.0]))  # fmt: skip
    assert [m.op for m in _send(server, [late])] == [Op.REJECT, Op.UPDATE]
    assert server.store.get(NAME).tolist() == [1.0, 2.0, 4.0]


def test_a_write_within_its_expiry_is_applied(tmp_path):
    server = _server(tmp_path)
    _send(server, [Message(Op.PUT, NAME, req=1, data=np.array([1.0]))])
    out = _send(server, [_run([0, 5], [2.0, 3.0], time.time() + 60)])
    assert [(m.op, m.req) for m in out] == [(Op.ACK, 5)]
    assert server.store.get(NAME).tolist() == [1.0, 2.0, 3.0]


def test_hello_and_ping_never_expire(tmp_path):
    server = _server(tmp_path)
    out = _send(server, [Message(Op.PING, req=9, info={"expires": 1.0})])
    assert [m.op for m in out] == [Op.PONG]


# -- the token -----------------------------------------------------------------------


def test_a_peer_is_served_only_after_a_hello_with_the_token(tmp_path):
    server = _server(tmp_path, token="s3cret")
    put = Message(Op.PUT, NAME, req=2, data=np.array([1.0]))
    assert _send(server, [put], peer=b"x") == []
    out = _send(server, [Message(Op.HELLO, req=3, info={"token": "guess"})], peer=b"x")
    assert [m.op for m in out] == [Op.REJECT]
    assert _send(server, [put], peer=b"x") == []
    assert NAME not in server.store
    out = _send(server, [Message(Op.HELLO, req=4, info={"token": "s3cret"}), put], peer=b"b")
    assert [m.op for m in out] == [Op.SNAPSHOT_BEGIN, Op.SNAPSHOT_END, Op.UPDATE]
    # Admitted once, served from then on; another peer still is not.
    assert [m.op for m in _send(server, [Message(Op.PING, req=5)], peer=b"b")] == [Op.PONG]
    assert _send(server, [Message(Op.PING, req=6)], peer=b"y") == []


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
    hello = {"token": "s3cret", "broker": "b1"}
    _send(server, [Message(Op.HELLO, req=1, info=hello)], peer=b"old")
    _send(server, [Message(Op.PUT, NAME, req=2, data=np.array([1.0]))], peer=b"old")
    _send(server, [Message(Op.HELLO, req=3, info=hello)], peer=b"new")
    # What the old connection still brings: requests refused, plain WRITEs dropped.
    late = [_run([0, 4], [2.0, 3.0], 0.0), Message(Op.DELETE, NAME, req=5)]
    out = _send(server, late, peer=b"old")
    assert [(m.op, m.req) for m in out] == [(Op.REJECT, 4), (Op.REJECT, 5)]
    assert server.store.get(NAME).tolist() == [1.0]
    # Another broker's connection is not fenced by it.
    _send(server, [Message(Op.HELLO, req=6, info={**hello, "broker": "b2"})], peer=b"other")
    out = _send(server, [_run([7], [4.0], 0.0)], peer=b"new")
    assert [(m.op, m.req) for m in out] == [(Op.ACK, 7)]
    assert [m.op for m in _send(server, [Message(Op.PING, req=8)], peer=b"other")] == [Op.PONG]
