"""The autosave writes a period's changed values in parts, so that the copies it makes for
its thread never add up to a second copy of the shard."""

from __future__ import annotations

import numpy as np
import pytest

from carelay.common.config import AUTOSAVE_PART_BYTES, load_config
from carelay.common.messages import Put
from carelay.common.protocol import encode_batch
from carelay.shard.persist import ShardDatabase
from carelay.shard.server import ShardServer

PREFIX = "U:"
COUNT = 100_000  # 800 kB a buffer
BUFFERS = 3 * AUTOSAVE_PART_BYTES // (COUNT * 8)  # three parts' worth


@pytest.fixture
def server(tmp_path):
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    s = ShardServer(config, 0, db=ShardDatabase(config.store_path(0)))
    s.load()
    yield s
    s.autosave.close()
    s.db.close()


def _put(server: ShardServer, name: str, value) -> None:
    server.handle(b"b", encode_batch([Put(name, 1, 0.0, np.asarray(value))]))
    server._commit()
    server._out.clear()


def _saved(server: ShardServer) -> dict:
    again = ShardDatabase(server.db.path)
    try:
        return {row.name: row.value for row in again.open()}
    finally:
        again.close()


def test_changed_buffers_are_written_part_by_part_until_all_are(server, monkeypatch):
    names = [f"{PREFIX}b{k}_F{COUNT}" for k in range(BUFFERS)]
    for k, name in enumerate(names):
        _put(server, name, np.zeros(COUNT))
        _put(server, name, np.full(COUNT // 2, float(k)))  # wraps: a copy to write
    sizes = []
    real = server.db.save
    monkeypatch.setattr(
        server.db, "save", lambda rows: sizes.append(sum(r[2].nbytes for r in rows)) or real(rows)
    )
    assert server.autosave.flush_soon() > 0
    parts = 1
    while server.autosave.saving_parts:
        server.autosave.collect(wait=True)
        assert server.autosave.flush_soon() > 0
        parts += 1
    server.autosave.collect(wait=True)
    assert parts >= 3
    assert max(sizes) < AUTOSAVE_PART_BYTES + COUNT * 8
    assert not server.store.dirty
    saved = _saved(server)
    for k, name in enumerate(names):
        np.testing.assert_array_equal(saved[name][COUNT // 2 :], k)
        np.testing.assert_array_equal(saved[name][: COUNT // 2], 0.0)


def test_a_value_changed_while_parts_are_written_is_written_too(server):
    names = [f"{PREFIX}b{k}_F{COUNT}" for k in range(BUFFERS)]
    for name in names:
        _put(server, name, np.zeros(COUNT))
        _put(server, name, np.ones(COUNT))
    server.autosave.flush_soon()
    first = names[0]
    _put(server, first, np.full(COUNT, 7.0))  # taken in a part already, or not
    while server.autosave.saving_parts:
        server.autosave.collect(wait=True)
        server.autosave.flush_soon()
    server.autosave.collect(wait=True)
    server.autosave.flush_soon()  # the next period
    server.autosave.collect(wait=True)
    np.testing.assert_array_equal(_saved(server)[first], 7.0)
    assert not server.store.dirty
