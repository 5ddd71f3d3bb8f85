"""What a shard's creation burst costs less, and still says: each creation logged once it
is durable (one line each, written at once), and a commit's rows written in one go."""

from __future__ import annotations

import errno
import io
import logging
from pathlib import Path

import numpy as np
import pytest

from carelay.common import lifecycle
from carelay.common.config import load_config
from carelay.common.messages import Put, Reject, Update
from carelay.common.protocol import encode_batch
from carelay.shard.persist import ShardDatabase, StoreWriteError
from carelay.shard.persist.queries import save_rows
from carelay.shard.server import ShardServer
from tests.unit.process_logging import process_logging

PREFIX = "U:"


@pytest.fixture
def logged():
    """The process's logging as setup_logging makes it, written to a string."""
    with process_logging() as (_log, out):
        yield out


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_log_each_writes_one_full_line_per_value(logged):
    log = logging.getLogger("carelay.shard.handler")
    log.info("before")
    lifecycle.log_each(log, logging.INFO, "created PV %s", ["U:a_f1", "U:b_f1", "U:c_f1"])
    lines = _lines(logged)
    assert len(lines) == 4
    for line, name in zip(lines[1:], ["U:a_f1", "U:b_f1", "U:c_f1"], strict=True):
        assert line.endswith(f" INFO shard 3: created PV {name}")
        # The same prefix as a line logged the usual way: time, level, role.
        assert line.split(" ", 1)[0][:10] == lines[0].split(" ", 1)[0][:10]


def test_log_each_says_nothing_below_the_level(logged):
    logging.getLogger().setLevel(logging.WARNING)
    lifecycle.log_each(logging.getLogger("carelay.x"), logging.INFO, "created PV %s", ["U:a"])
    lifecycle.log_each(logging.getLogger("carelay.x"), logging.WARNING, "nothing %s", [])
    assert logged.getvalue() == ""


def test_log_each_goes_the_usual_way_when_other_handlers_listen(logged, caplog):
    """A handler added beside setup_logging's (here pytest's) gets a record per value."""
    with caplog.at_level(logging.INFO):
        lifecycle.log_each(logging.getLogger("carelay.y"), logging.INFO, "x %s", ["a", "b"])
    assert [r.getMessage() for r in caplog.records] == ["x a", "x b"]
    assert len(_lines(logged)) == 2


def test_an_error_goes_the_usual_way_and_is_kept_as_the_last_one(logged):
    lifecycle.log_each(logging.getLogger("carelay.z"), logging.ERROR, "lost %s", ["a", "b"])
    assert len(_lines(logged)) == 2
    assert lifecycle.last_error.last["message"] == "lost b"


# -- the shard: creations logged after their commit ---------------------------------------


def _server(data_dir: Path) -> ShardServer:
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(data_dir))
    server = ShardServer(config, 0, db=ShardDatabase(config.store_path(0)))
    server.load()
    return server


@pytest.fixture
def server(tmp_path):
    s = _server(tmp_path)
    yield s
    s.autosave.close()
    s.db.close()


def _puts(*names: str) -> list:
    return encode_batch([Put(n, k + 1, 0.0, np.array([1.0])) for k, n in enumerate(names)])


def test_creations_are_logged_once_committed_in_order(server, logged):
    names = [f"{PREFIX}n{i}_f1" for i in range(5)]
    server.handle(b"b", _puts(*names))
    assert "created PV" not in logged.getvalue()  # not durable yet
    server._commit()
    created = [line.rsplit(" ", 1)[1] for line in _lines(logged) if "created PV" in line]
    assert created == names
    server._out.clear()
    # A put to a PV that exists creates nothing: no line.
    server.handle(b"b", _puts(names[0]))
    server._commit()
    assert sum("created PV" in line for line in _lines(logged)) == 5


def test_a_creation_the_commit_could_not_keep_is_not_logged_as_created(server, logged, monkeypatch):
    kept = f"{PREFIX}kept_f1"
    server.handle(b"b", _puts(kept))
    server._commit()
    server._out.clear()
    error = StoreWriteError(errno.ENOSPC, server.db.path, "database or disk is full")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(server.db, "save", fail)
    new = f"{PREFIX}new_f1"
    server.handle(b"b", _puts(new))
    server._commit()
    text = logged.getvalue()
    assert f"created PV {new}" not in text and f"created PV {kept}" in text
    assert "cannot save 1 creations/deletions/field changes" in text
    (reply,) = [m for _, m in server._out]
    assert type(reply) is Reject and reply.name == new
    assert server.requests.created == []


def test_the_answers_still_tell_the_creation(server, logged):
    name = f"{PREFIX}a_f1"
    server.handle(b"b", _puts(name))
    server._commit()
    (reply,) = [m for _, m in server._out]
    assert type(reply) is Update and reply.created and reply.name == name


# -- the store: rows written in one statement ----------------------------------------------


def test_save_rows_writes_and_deletes_and_counts_them(tmp_path):
    db = ShardDatabase(tmp_path / "s.sqlite")
    db.open()
    try:
        rows = [
            (f"{PREFIX}a_f1", 1.0, np.array([1.5]), {}),
            (f"{PREFIX}b_i3", 2.0, np.array([1, 2, 3], dtype=np.int32), {"EGU": "mm"}),
        ]
        assert db.save(rows) == 2
        assert db.save([], [f"{PREFIX}a_f1", f"{PREFIX}none_f1"]) == 2
        again = ShardDatabase(db.path)
        try:
            (row,) = again.open()
        finally:
            again.close()
        assert row.name == f"{PREFIX}b_i3" and row.value.tolist() == [1, 2, 3]
        assert row.fields == {"EGU": "mm"} and row.stamp == 2.0
    finally:
        db.close()


def test_save_rows_writes_nothing_when_a_row_fails(tmp_path):
    db = ShardDatabase(tmp_path / "s.sqlite")
    db.open()
    try:
        good = (f"{PREFIX}a_f1", 1.0, np.array([1.5]), {})
        bad = (f"{PREFIX}b_f1", 1.0, np.array([2.5]), {"x": object()})  # not JSON
        with pytest.raises(TypeError):
            save_rows(db._conn, db.path, [good, bad], [])
        assert db.count() == 0
        assert not db._conn.in_transaction
    finally:
        db.close()
