"""A put to DRVH or DRVL brings a value past them within them once the change is durable,
as an ao record processes when they are put; a put to them that failed changes no value."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from carelay.common.config import load_config
from carelay.common.messages import FieldChanged, Hello, Put, Reject, SetField, Update
from carelay.common.protocol import encode_batch
from carelay.shard.persist import ShardDatabase, StoreWriteError
from carelay.shard.server import ShardServer

PREFIX = "D:"
NAME = f"{PREFIX}x_f1"
A, B = b"front-end A", b"front-end B"


def _server(tmp_path: Path) -> ShardServer:
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path / "data"))
    server = ShardServer(config, 0, db=ShardDatabase(config.store_path(0)))
    server.load()
    for k, peer in enumerate((A, B), start=1):
        server.handle(peer, encode_batch([Hello(k)]))
    server.handle(A, encode_batch([Put(NAME, 3, 0.0, np.array([6.0]))]))
    server._commit()
    server._out.clear()
    return server


def _limit(server: ShardServer, field: str, value: float) -> list:
    server.handle(A, encode_batch([SetField(NAME, 9, field, value)]))
    server._commit()
    out, server._out[:] = list(server._out), []
    return out


def test_the_value_goes_within_the_new_limit_to_every_front_end(tmp_path):
    server = _server(tmp_path)
    out = _limit(server, "DRVH", 3.0)
    assert server.store.get(NAME).tolist() == [3.0]
    to_a = [msg for peer, msg in out if peer == A]
    # After the answer, in sequence order: the PV as it stands here.
    assert [type(msg) for msg in to_a] == [FieldChanged, Update]
    assert to_a[0].req == 9 and to_a[0].seq < to_a[1].seq
    assert to_a[1].req == 0 and to_a[1].reset and to_a[1].data.tolist() == [3.0]
    to_b = [msg for peer, msg in out if peer == B and type(msg) is Update]
    assert len(to_b) == 1 and to_b[0].data.tolist() == [3.0] and not to_b[0].reset
    assert _limit(server, "DRVH", 4.0) and server.store.get(NAME).tolist() == [3.0]  # within


def test_a_drive_limit_that_could_not_be_saved_changes_no_value(tmp_path, monkeypatch):
    server = _server(tmp_path)
    # A value past a saved limit, as a store holds it after a crash took the clipped
    # value (flushed later than the limit) with it.
    server.store.set_field(NAME, "DRVH", 3.0)
    assert server.autosave.commit() is None and server.store.get(NAME).tolist() == [6.0]

    def fail(*args, **kwargs):
        raise StoreWriteError(errno.EIO, tmp_path / "shard-0.sqlite", "disk I/O error")

    monkeypatch.setattr(server.db, "save", fail)
    out = _limit(server, "DRVL", -1.0)
    assert [type(msg) for peer, msg in out if peer == A] == [Reject]
    assert server.store.get(NAME).tolist() == [6.0]
    assert server.store.fields(NAME) == {"DRVH": 3.0}
    assert not [msg for _, msg in out if type(msg) is Update]
