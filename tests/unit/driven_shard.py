"""A real ShardServer with its store, driven batch by batch as a broker drives it, and
its store made to fail: for the unit tests of a shard's faults and of its log."""

from __future__ import annotations

import time
from pathlib import Path

from carelay.common.config import load_config
from carelay.common.messages import Message
from carelay.common.protocol import encode_batch
from carelay.shard.persist import ShardDatabase, StoreWriteError
from carelay.shard.server import ShardServer

PREFIX = "U:"
#: The autosave period: short, so that a store's fault turns into refusals soon.
PERIOD = 0.5


def shard_with_store(tmp_path: Path) -> ShardServer:
    """A loaded ShardServer of one shard with a database under ``tmp_path``; close its
    autosave and database when done."""
    config = load_config(
        prefix=PREFIX, shards=1, data_dir=str(tmp_path / "data"), autosave_period=PERIOD
    )
    config.run_dir.mkdir(parents=True)
    server = ShardServer(config, 0, db=ShardDatabase(config.store_path(0)))
    server.load()
    return server


def handle(server: ShardServer, *msgs) -> list[Message]:
    """``msgs`` from one broker as one batch: applied, committed; what it was answered
    and published."""
    server.handle(b"b", encode_batch(list(msgs)))
    server._commit()
    out = [msg for _, msg in server._out]
    server._out.clear()
    return out


def break_store(server: ShardServer, monkeypatch, code: int, text: str) -> StoreWriteError:
    """Make every write to the store fail with ``code`` (a full disk, a file size limit),
    as its write-ahead log would."""
    error = StoreWriteError(code, Path(f"{server.db.path}-wal"), text)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(server.db, "save", fail)
    monkeypatch.setattr(server.db, "check_writable", fail)
    return error


def past_the_period(server: ShardServer) -> None:
    """What the loop does at its next turn, once the autosave period has passed."""
    server.health.check(time.monotonic() + PERIOD + 0.1)
