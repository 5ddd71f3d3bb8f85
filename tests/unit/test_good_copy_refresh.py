"""The refresh of a store's good copy, every GOOD_COPY_INTERVAL: it checks and copies a
large store for seconds, and the loop's commits (creations, deletions, a front-end's
HELLO) must not wait for it meanwhile, or the shard answers nothing and the front-ends
take it for gone.  A refresh with nothing committed since the last copy writes nothing."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from carelay.shard.autosave import Autosave, StoreHealth
from carelay.shard.persist import ShardDatabase, good_copy_path, read_store
from carelay.shard.persist import database as database_module
from carelay.shard.persist.schema import quick_check
from carelay.shard.store import ShardStore

PREFIX = "U:"
#: How long the slow check waits for the write under test before it gives up: a write
#: that waits for the refresh never comes, so the test fails after this (s); a write that
#: does not wait is done in milliseconds.
_PATIENCE = 3.0


@pytest.fixture
def db(tmp_path):
    db = ShardDatabase(tmp_path / "shard-0.sqlite")
    db.open()
    yield db
    db.close()


def _row(name: str, value: float = 1.0) -> tuple:
    return (f"{PREFIX}{name}_f1", value, np.array([value]), {})


def _names(path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        return {r[0] for r in conn.execute("SELECT name FROM pvs")}
    finally:
        conn.close()


class _SlowCheck:
    """Stands in for the integrity check of a large store: it stays inside the check until
    ``done`` is set (or _PATIENCE passed), and says whether ``done`` came while it was in."""

    def __init__(self, monkeypatch) -> None:
        self.inside = threading.Event()
        self.done = threading.Event()
        #: Set once the check has said (done_while_inside) whether ``done`` let it go.
        self.left = threading.Event()
        self.done_while_inside: bool | None = None
        real = database_module.quick_check

        def slow(conn):
            self.inside.set()
            self.done_while_inside = self.done.wait(_PATIENCE)
            self.left.set()
            return real(conn)

        monkeypatch.setattr(database_module, "quick_check", slow)


def _in_thread(target) -> tuple[threading.Thread, list]:
    """Run ``target`` in a thread; the list receives its result or its exception."""
    out: list = []

    def run():
        try:
            out.append(target())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_commit_completes_while_the_good_copy_is_refreshed(db, monkeypatch):
    db.save([_row("a")])
    slow = _SlowCheck(monkeypatch)
    refresh, refreshed = _in_thread(db.refresh_good_copy)
    assert slow.inside.wait(_PATIENCE)

    def commit():
        db.save([_row("b")], deletes=[f"{PREFIX}a_f1"])  # a creation and a deletion
        slow.done.set()

    saver, saved = _in_thread(commit)
    saver.join(_PATIENCE + 5)
    refresh.join(_PATIENCE + 5)
    assert saved == [None] and refreshed == [True]
    assert slow.done_while_inside, "the commit waited for the refresh of the good copy"
    # The copy is the snapshot that was checked: the store before the commit made during
    # the check, and sound.
    good = good_copy_path(db.path)
    assert _names(good) == {f"{PREFIX}a_f1"}
    assert _names(db.path) == {f"{PREFIX}b_f1"}
    # What was committed after the snapshot began goes into the next copy.
    monkeypatch.setattr(database_module, "quick_check", quick_check)
    assert db.refresh_good_copy()
    assert _names(good) == {f"{PREFIX}b_f1"}


def _refreshing(db, monkeypatch) -> tuple[ShardStore, Autosave, _SlowCheck]:
    """A store and its autosave, PV a committed at 1.0 and then written 2.0 while a refresh
    of the good copy is inside its (slow) check."""
    store = ShardStore(PREFIX, 1000, 60)
    autosave = Autosave(store, db, StoreHealth(0, 0.5, db.path), 0)
    a = f"{PREFIX}a_f1"
    store.put(a, np.array([1.0]))
    assert autosave.commit() is None
    slow = _SlowCheck(monkeypatch)
    autosave.refresh_good_copy_soon()
    assert slow.inside.wait(_PATIENCE)
    store.write_one(a, np.array([2.0]), 5.0)
    return store, autosave, slow


def test_a_value_flush_and_a_commit_complete_while_the_good_copy_is_refreshed(db, monkeypatch):
    """The loop refreshes the copy and flushes values on threads; a commit waits for the
    value write in flight, which must not wait behind the copy."""
    store, autosave, slow = _refreshing(db, monkeypatch)
    try:
        a, b = f"{PREFIX}a_f1", f"{PREFIX}b_f1"
        assert autosave.flush_soon() == 1  # the value write, in flight

        def commit():
            store.put(b, np.array([3.0]))
            unsaved = autosave.commit()  # waits for the value write, then commits
            slow.done.set()
            return unsaved

        loop, committed = _in_thread(commit)
        loop.join(_PATIENCE + 5)
        assert slow.left.wait(_PATIENCE + 5)
        assert committed == [None]
        assert slow.done_while_inside, "the commit waited for the refresh of the good copy"
    finally:
        slow.done.set()
        autosave.close()
    rows = {r.name: r.value.tolist() for r in read_store(db.path)}
    assert rows == {a: [2.0], b: [3.0]}


def _identity(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_a_refresh_with_nothing_committed_since_the_last_copy_writes_nothing(db):
    good = good_copy_path(db.path)
    db.save([_row("a")])
    assert db.refresh_good_copy()
    before = _identity(good)
    assert not db.refresh_good_copy()
    assert not db.refresh_good_copy()
    assert _identity(good) == before
    db.save([_row("a", 2.0)])  # a value flush, as a creation, makes the next one due
    assert db.refresh_good_copy()
    assert _identity(good) != before


def test_a_refresh_right_after_the_open_writes_nothing(db):
    good = good_copy_path(db.path)
    before = _identity(good)  # the open wrote it
    assert not db.refresh_good_copy()
    assert _identity(good) == before


def test_a_failed_check_leaves_the_copy_and_the_next_refresh_checks_again(db, monkeypatch):
    good = good_copy_path(db.path)
    db.save([_row("a")])
    before = good.read_bytes()
    monkeypatch.setattr(database_module, "quick_check", lambda conn: "*** in database main ***")
    assert not db.refresh_good_copy()
    assert good.read_bytes() == before
    monkeypatch.setattr(database_module, "quick_check", quick_check)
    # Nothing committed since, but the last refresh wrote no copy: this one does.
    assert db.refresh_good_copy()
    assert _names(good) == {f"{PREFIX}a_f1"}


def test_a_close_abandons_a_refresh_in_its_check(db, monkeypatch, caplog):
    """A stopping shard closes its store; a refresh in flight (seconds for a large store,
    past the time a stopping shard is given) is not waited for: it stops, and the good
    copy stays as it was."""
    good = good_copy_path(db.path)
    db.save([_row("a")])
    before = good.read_bytes()
    slow = _SlowCheck(monkeypatch)
    refresh, refreshed = _in_thread(db.refresh_good_copy)
    assert slow.inside.wait(_PATIENCE)
    closer, closed = _in_thread(db.close)
    # The close has said so before it waits for the refresh to let go of the store.
    assert db._closing.wait(_PATIENCE)
    slow.done.set()
    closer.join(_PATIENCE + 5)
    refresh.join(_PATIENCE + 5)
    assert refreshed == [False] and closed == [None]
    assert good.read_bytes() == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not db.refresh_good_copy()  # closed: nothing to copy


def test_a_close_abandons_a_refresh_between_two_steps_of_its_copy(db, monkeypatch, caplog):
    good = good_copy_path(db.path)
    db.save([_row(f"w{k}", float(k)) for k in range(400)])
    db.save([(f"{PREFIX}big_F100000", 1.0, np.arange(100_000.0), {})])  # about 200 pages
    before = good.read_bytes()
    monkeypatch.setattr(database_module, "COPY_STEP_PAGES", 8)
    copying = threading.Event()
    real_step = db._copy_step

    def step(*args) -> None:
        copying.set()
        db._closing.wait(_PATIENCE)  # the close comes during the copy
        real_step(*args)

    monkeypatch.setattr(db, "_copy_step", step)
    refresh, refreshed = _in_thread(db.refresh_good_copy)
    assert copying.wait(_PATIENCE)
    db.close()
    refresh.join(_PATIENCE + 5)
    assert refreshed == [False]
    assert good.read_bytes() == before
    assert not good.with_name(good.name + ".tmp").exists()  # no half copy left
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_copy_in_steps_is_the_snapshot_it_began_with(db, monkeypatch):
    """Commits land between the steps of a copy: the copy is the store as the refresh's
    read transaction saw it, the commits go into the next one."""
    db.save([_row(f"w{k}", float(k)) for k in range(300)])
    monkeypatch.setattr(database_module, "COPY_STEP_PAGES", 2)
    real_step = db._copy_step
    landed: list = []

    def step(*args) -> None:
        if len(landed) < 3:
            landed.append(f"late{len(landed)}")
            db.save([_row(landed[-1])])
        real_step(*args)

    monkeypatch.setattr(db, "_copy_step", step)
    assert db.refresh_good_copy()
    assert len(landed) == 3
    copied = _names(good_copy_path(db.path))
    assert copied == {f"{PREFIX}w{k}_f1" for k in range(300)}
    assert {f"{PREFIX}{n}_f1" for n in landed} <= _names(db.path)


def test_a_stop_does_not_wait_for_a_refresh_in_flight(db, monkeypatch):
    """Autosave.stop: the values are written, and the refresh is abandoned."""
    _, autosave, slow = _refreshing(db, monkeypatch)
    a = f"{PREFIX}a_f1"
    stopper, stopped = _in_thread(autosave.stop)
    assert db._closing.wait(_PATIENCE)
    slow.done.set()
    stopper.join(_PATIENCE + 5)
    assert stopped == [True]
    assert slow.done_while_inside  # the stop did not wait for the check to time out
    rows = {r.name: r.value.tolist() for r in read_store(db.path)}
    assert rows == {a: [2.0]}


_FULL_DISK = """
import os, resource, signal, sys
from pathlib import Path
import numpy as np
from carelay.shard.persist import ShardDatabase
d = Path(sys.argv[1])
db = ShardDatabase(d / "shard-0.sqlite")
db.open()
db.save([(f"U:x{i}_f1000", 1.0, np.arange(1000.0), {}) for i in range(400)])
# The file size limit as a full disk gives it: writes past it fail (EFBIG).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    db.refresh_good_copy()
except Exception as e:
    print("refused:", e)
"""


def test_a_copy_that_fails_on_a_full_disk_leaves_no_scratch_behind(tmp_path):
    """A copy cut short by a full disk left its scratch file's journal in the data
    directory, at every refresh that failed."""
    r = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and "refused:" in r.stdout, r.stdout + r.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "shard-0.sqlite",
        "shard-0.sqlite-shm",
        "shard-0.sqlite-wal",
        "shard-0.sqlite.good",
    ]
    assert quick_check(sqlite3.connect(good_copy_path(tmp_path / "shard-0.sqlite"))) == "ok"
