"""The store file of one shard: opened and checked, restored from its good copy when
damaged, locked against a second process, written through ``queries``."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from carelay.shard.persist.errors import StoreDamaged, StoreTooNew, write_error
from carelay.shard.persist.queries import (
    SavedPv,
    count_rows,
    load_rows,
    mark_checked,
    save_rows,
)
from carelay.shard.persist.schema import (
    checkpoint,
    connect,
    connect_read_only,
    prepare,
    quick_check,
)

log = logging.getLogger(__name__)


def good_copy_path(path: Path) -> Path:
    return path.with_name(path.name + ".good")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def lock_store(path: Path) -> int | None:
    """Take the exclusive lock of the store at ``path`` (held until the returned file
    descriptor is closed, or the process ends); None if another process holds it."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory: the names in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_database(path: Path) -> None:
    """Remove a scratch database and its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


#: Pages a refresh of the good copy copies at a time: between two steps, a close that
#: abandons the refresh is heard (4 MiB at SQLite's usual page size).
COPY_STEP_PAGES = 1024


class _Abandoned(Exception):
    """The store closes: the refresh of its good copy in flight stops."""


class ShardDatabase:
    """The autosave file of one shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        # The shard's loop commits creations while its autosave thread flushes values:
        # one connection, used by one of them at a time.
        self._lock = threading.Lock()
        # One refresh of the good copy at a time, and none while the store closes.  A
        # refresh holds this lock, never the one above, through its long steps (the check,
        # the copy, its fsync): it reads a snapshot on a connection of its own, so that
        # commits go on meanwhile.
        self._copy_lock = threading.Lock()
        #: Commits tried on the connection (failed ones too: a copy too many costs less
        #: than one missed), and how many of them the good copy holds (None: no copy
        #: written since the open), so that a store left unchanged is not copied again.
        self._commits = 0
        self._copied: int | None = None
        #: Set when the store closes: a refresh in flight stops, and none starts.
        self._closing = threading.Event()
        #: The read-only connection of the refresh in flight, which a close interrupts.
        self._reading: sqlite3.Connection | None = None
        #: When the store was last written (time.time; 0.0: never): by this process's
        #: last commit, or at the open, by the last one before it.
        self.last_flush = 0.0
        self.restored_from_copy = False

    # -- opening ----------------------------------------------------------------

    def open(self) -> list[SavedPv]:
        """Open (creating if new), check, and load every saved PV.

        A damaged file is replaced by the last good copy if that copy is sound,
        else StoreDamaged is raised; an empty store is never made up.  A sound store
        opens even where no new good copy can be written (a full disk): the shard serves
        it, and the next refresh of the copy tries again.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Before the open, which may write: when the last process last wrote it.
        self.last_flush = _last_written(self.path)
        try:
            rows = self._open_checked(self.path)
        except StoreTooNew:
            raise  # not damaged: its good copy is older, and would lose what it holds
        except StoreDamaged as damage:
            rows = self._restore(damage)
        try:
            self._keep_good_copy(self._conn)
            self._copied = self._commits
        except (sqlite3.Error, OSError) as e:
            log.error(
                "%s: cannot write its good copy (%s); the store itself is sound and stays in "
                "use, and the next refresh of the copy tries again",
                self.path,
                e,
            )
        return rows

    def _open_checked(self, path: Path) -> list[SavedPv]:
        existed = path.exists() and path.stat().st_size > 0
        wal = Path(f"{path}-wal")
        if not path.exists() and good_copy_path(path).exists():
            # A store is never deleted while its copy stays: this one went missing.
            # (To start afresh on purpose, remove both.)
            raise StoreDamaged(f"{path}: the file is missing")
        if (
            path.exists()
            and not existed
            and not (wal.exists() and wal.stat().st_size > 0)
            and good_copy_path(path).exists()
        ):
            # A new store is checkpointed at once, so an empty file where a good
            # copy exists is a truncated store, not a new one.
            raise StoreDamaged(f"{path}: the file is empty (truncated?)")
        conn = None
        try:
            conn = connect(path)
            prepare(conn, path, existed)
            rows = load_rows(conn, path)
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            raise StoreDamaged(f"{path}: {e}") from None
        except StoreDamaged:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        return rows

    def _restore(self, damage: StoreDamaged) -> list[SavedPv]:
        good = good_copy_path(self.path)
        if not good.exists():
            raise StoreDamaged(f"{damage}; no good copy ({good.name}) to restore") from None
        # Copy and check the good copy before the damaged file is moved: a restore that
        # fails must leave the damage in place, so that the next start refuses again
        # instead of finding no file and making a new, empty store.
        scratch = self.path.with_name(self.path.name + ".restoring")
        _remove_database(scratch)
        src_conn = connect_read_only(good)
        try:
            dst_conn = sqlite3.connect(scratch)
            try:
                src_conn.backup(dst_conn)
            finally:
                dst_conn.close()
        except sqlite3.DatabaseError as e:
            _remove_database(scratch)
            raise StoreDamaged(f"{damage}; the good copy {good} is damaged too: {e}") from None
        finally:
            src_conn.close()
        try:
            self._open_checked(scratch)
        except StoreDamaged as e:
            _remove_database(scratch)
            raise StoreDamaged(f"{damage}; restoring {good.name} failed: {e}") from None
        self._conn.close()
        self._conn = None
        damaged = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(damaged) + suffix))
        os.replace(scratch, self.path)
        try:
            rows = self._open_checked(self.path)
        except StoreDamaged as e:
            raise StoreDamaged(f"{damage}; restoring {good.name} failed: {e}") from None
        self.restored_from_copy = True
        log.error(
            "%s; restored the last good copy %s (saved %s) with %d PVs; the damaged file is "
            "kept as %s",
            damage,
            good.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(good.stat().st_mtime)),
            len(rows),
            damaged.name,
        )
        return rows

    def refresh_good_copy(self) -> bool:
        """Replace the good copy with the store as it is now, if the store passes its
        integrity check; returns whether it did (False too when nothing was committed
        since the last copy, which is then the store already: it is not written again).
        Bounds what a restore can lose.

        Commits are not held up meanwhile: the check and the copy read one snapshot of the
        store, on a read-only connection of their own (in WAL mode a reader blocks no
        writer), so the copy is exactly what passed the check; what is committed after
        the snapshot began goes into the next copy."""
        with self._copy_lock:
            if self._conn is None or self._closing.is_set():
                return False  # closed, or closing
            # Read before the snapshot begins: a commit that lands after this is counted
            # after it too, and makes the next refresh due.
            commits = self._commits
            if commits == self._copied:
                return False
            if not self._refresh_good_copy():
                return False
            self._copied = commits
            return True

    def settle_good_copy(self) -> None:
        """For a writer of a stopped shard's store (a reshard, an import): the good copy,
        taken when it opened the store, made again of what the store holds now, so that
        a restore brings back what it wrote.  One that cannot be written is logged: the
        shard takes a copy when it opens the store."""
        try:
            self.refresh_good_copy()
        except (OSError, sqlite3.Error) as e:
            log.error(
                "%s: cannot refresh its good copy (%s); its shard takes one when it opens "
                "the store",
                self.path,
                e,
            )

    def _refresh_good_copy(self) -> bool:
        src = connect_read_only(self.path)
        self._reading = src
        try:
            src.isolation_level = None
            try:
                # One read transaction, one snapshot, through the check and the copy.
                src.execute("BEGIN")
                src.execute("SELECT count(*) FROM sqlite_master").fetchone()
                check = quick_check(src)
            except sqlite3.DatabaseError as e:
                check = str(e)
            if self._closing.is_set():
                return self._abandoned()
            if check != "ok":
                log.error(
                    "%s failed its integrity check (%s); the good copy is kept", self.path, check
                )
                return False
            try:
                self._keep_good_copy(src)
            except (_Abandoned, sqlite3.Error):
                if not self._closing.is_set():
                    raise
                return self._abandoned()
            return True
        finally:
            self._reading = None
            src.close()

    def _abandoned(self) -> bool:
        log.info("%s closes: the refresh of its good copy is left, the copy kept", self.path)
        return False

    def _copy_step(self, status: int, remaining: int, total: int) -> None:
        """Between two steps of the copy: stop if the store closes."""
        if self._closing.is_set():
            raise _Abandoned

    def abandon_copy(self) -> None:
        """Stop a refresh of the good copy in flight at its next step (its check is
        interrupted), and start none after: the store closes.  A stop needs no new copy
        (the last flush is in the store itself), and a large store's takes seconds,
        past the time a stopping shard is given."""
        self._closing.set()
        reading = self._reading
        if reading is not None:
            with contextlib.suppress(sqlite3.Error):
                reading.interrupt()

    def _keep_good_copy(self, src: sqlite3.Connection) -> None:
        """Write the store as ``src`` reads it (the one snapshot of its read transaction)
        to the good copy: a scratch file, on disk before it takes the copy's name."""
        good = good_copy_path(self.path)
        scratch = good.with_name(good.name + ".tmp")
        scratch.unlink(missing_ok=True)
        try:
            dst = sqlite3.connect(scratch)
            try:
                # In steps, in the one read transaction: still one snapshot.
                src.backup(dst, pages=COPY_STEP_PAGES, progress=self._copy_step)
            finally:
                dst.close()
            _fsync(scratch)
        except BaseException:
            # Half a copy is no copy: the good one stays.  Its journal too, which a write
            # that failed (a full disk) leaves behind.
            for suffix in ("", "-journal"):
                Path(f"{scratch}{suffix}").unlink(missing_ok=True)
            raise
        os.replace(scratch, good)
        _fsync(good.parent)  # the new name on disk too

    # -- writing ----------------------------------------------------------------

    def save(
        self,
        upserts: Iterable[tuple[str, float, np.ndarray, dict]],
        deletes: Iterable[str] = (),
    ) -> int:
        """Write PVs and delete others in one transaction, durable on return."""
        with self._lock:
            try:
                return self._save(upserts, deletes)
            finally:
                self._commits += 1

    def _save(self, upserts, deletes) -> int:
        try:
            n = save_rows(self._conn, self.path, upserts, deletes)
        except sqlite3.DatabaseError as e:
            raise write_error(self.path, e) from e
        self.last_flush = time.time()
        return n

    def check_writable(self) -> None:
        """Commit a one-row write (the time of the check), or raise StoreWriteError: tells
        when a store that could not be written can be again, when no value waits."""
        with self._lock:
            try:
                mark_checked(self._conn)
            except sqlite3.DatabaseError as e:
                raise write_error(self.path, e) from e
            finally:
                self._commits += 1

    def count(self) -> int:
        """PVs in the store."""
        return count_rows(self._conn)

    def size(self) -> int:
        """Bytes on disk: the database and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.path) + suffix).st_size
        return total

    def close(self) -> None:
        """Close the store; a refresh of its good copy in flight is abandoned first."""
        self.abandon_copy()
        with self._copy_lock, self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                checkpoint(self._conn)
            except sqlite3.DatabaseError as e:
                log.warning("%s: checkpoint on close failed: %s", self.path, e)
            self._conn.close()
            self._conn = None


def _last_written(path: Path) -> float:
    """When the store at ``path`` was last written, as its files say (its log, where one
    is left, holds the last commits); 0.0 for none."""
    times = []
    for p in (path, Path(f"{path}-wal")):
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times, default=0.0)
