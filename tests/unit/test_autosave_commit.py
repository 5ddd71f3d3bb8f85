"""The autosave on its own, without the loop: a commit says what it could not save, and
the store's health turns a lasting failure into refused puts with callback."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import numpy as np
import pytest

from carelay.shard.autosave import Autosave, StoreHealth, Unsaved
from carelay.shard.persist import ShardDatabase, StoreWriteError
from carelay.shard.store import ShardStore

PREFIX = "U:"
PERIOD = 0.5


@pytest.fixture
def parts(tmp_path):
    db = ShardDatabase(tmp_path / "shard-0.sqlite")
    db.open()
    store = ShardStore(PREFIX, 1000, 60)
    health = StoreHealth(0, PERIOD, db.path)
    autosave = Autosave(store, db, health, 0)
    yield store, db, health, autosave
    autosave.close()
    db.close()


def test_a_commit_with_nothing_to_make_durable_returns_none(parts):
    store, db, health, autosave = parts
    assert autosave.commit() is None
    store.put(f"{PREFIX}a_f1", np.array([1.0]))
    assert autosave.commit() is None
    assert db.count() == 1 and health.store_error is None


def test_a_failed_commit_returns_what_it_could_not_save_and_undoes_it(parts, monkeypatch):
    store, db, health, autosave = parts
    kept, new = f"{PREFIX}kept_f1", f"{PREFIX}new_f1"
    store.put(kept, np.array([1.0]))
    assert autosave.commit() is None
    error = StoreWriteError(errno.EFBIG, Path(f"{db.path}-wal"), "disk I/O error")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(db, "save", fail)
    store.put(new, np.array([2.0]))
    store.delete(kept)
    unsaved = autosave.commit()
    assert unsaved == Unsaved({new: 2, kept: 3}, error)
    # Undone in the store: the creation is gone, the deletion did not happen.
    assert new not in store and kept in store
    assert health.store_error is error and health.refusing == ""


def test_a_failure_longer_than_the_period_refuses_until_a_write_works(parts):
    _, _, health, _ = parts
    health.failed(OSError(errno.ENOSPC, "No space left on device"), "autosave failed", 3)
    health.check(time.monotonic())
    assert health.refusing == "" and not health.status_due
    health.check(time.monotonic() + PERIOD + 0.1)
    assert "the store of shard 0 cannot be written" in health.refusing
    assert health.status_due
    health.status_due = False
    health.written()
    assert health.refusing == "" and health.store_error is None and health.status_due


def test_a_flush_while_the_wall_clock_is_stepped_back_times_it_truly(parts, monkeypatch):
    """NTP steps the clock back an hour during a flush: its duration is not -3600 s (the
    histogram's sum, a Prometheus counter, would go down)."""
    store, db, _, autosave = parts
    store.put(f"{PREFIX}a_f1", np.array([1.0]))
    autosave.commit()
    store.write_one(f"{PREFIX}a_f1", np.array([2.0]), time.time())
    save, wall = db.save, time.time

    def save_then_step(rows):
        save(rows)
        monkeypatch.setattr(time, "time", lambda: wall() - 3600.0)

    monkeypatch.setattr(db, "save", save_then_step)
    assert autosave.flush() == 1
    assert autosave.flush_times.count == 1
    assert 0.0 <= autosave.flush_times.total < 5.0
