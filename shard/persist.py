"""A shard's autosave: one SQLite database in WAL mode per shard.

Why SQLite in WAL mode: every commit is atomic and, with ``synchronous=FULL``,
on disk before it returns; a torn write (a crash in the middle of a commit)
leaves a WAL whose last frames fail their checksums, and SQLite ignores them
on the next open, so the database is exactly the last committed state.  It is
in the standard library, needs no server, and ``PRAGMA quick_check`` tells a
damaged file from a good one, so a damaged store is never taken for an
empty one.

Layout: ``pvs(name, stamp, dtype, length, value, fields)`` with the value as
the raw little-endian array (a buffer oldest first), and ``meta(key, value)``.
After each successful open, a copy of the database is kept beside it
(``<name>.good``): when the database itself is damaged, the shard restores
that copy and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("carelay.shard")

SCHEMA_VERSION = 1
#: Bytes the write that finds the errno of a failed store write makes (one page).
_PROBE_BYTES = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pvs (
    name   TEXT PRIMARY KEY,
    stamp  REAL NOT NULL,
    dtype  TEXT NOT NULL,
    length INTEGER NOT NULL,
    value  BLOB NOT NULL,
    fields TEXT NOT NULL DEFAULT '{}'
);
"""


class StoreDamaged(Exception):
    """The database file cannot be trusted; the message names the file and the problem."""


class StoreWriteError(OSError):
    """A write to the store failed: ``errno`` (None when the system gave none that could
    be found), ``filename`` the file written, ``detail`` what SQLite said."""

    def __init__(self, errno: int | None, filename: Path, detail: str) -> None:
        super().__init__(errno, os.strerror(errno) if errno else "error unknown", str(filename))
        self.detail = detail

    def __str__(self) -> str:
        cause = f"[Errno {self.errno}] {self.strerror}" if self.errno else "errno unknown"
        return f"cannot write {self.filename}: {cause} (SQLite: {self.detail})"


@dataclass(slots=True)
class SavedPv:
    name: str
    stamp: float
    value: np.ndarray
    fields: dict


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


def _remove_database(path: Path) -> None:
    """Remove a scratch database and its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def stored_names(path: Path) -> list[str] | None:
    """The names in the store at ``path``, read without writing anything; [] when there
    is no store, None when it cannot be read."""
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute("SELECT name FROM pvs")]
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def read_store(path: Path) -> list[SavedPv]:
    """Every PV in the store at ``path``, read without writing anything: beside a running
    shard (WAL lets readers in while it writes) or with none.  What the shard holds in
    memory and has not flushed yet is not there.  StoreDamaged when it cannot be read."""
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise StoreDamaged(f"{path}: {e}") from None
    try:
        rows = conn.execute("SELECT * FROM pvs ORDER BY name").fetchall()
    except sqlite3.Error as e:
        raise StoreDamaged(f"{path}: {e}") from None
    finally:
        conn.close()
    return [ShardDatabase._row(path, *r) for r in rows]


class ShardDatabase:
    """The autosave file of one shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        # The shard's loop commits creations while its autosave thread flushes values:
        # one connection, used by one of them at a time.
        self._lock = threading.Lock()
        self.last_flush = 0.0
        self.restored_from_copy = False

    # -- opening ----------------------------------------------------------------

    def open(self) -> list[SavedPv]:
        """Open (creating if new), check, and load every saved PV.

        A damaged file is replaced by the last good copy if that copy is sound,
        else StoreDamaged is raised; an empty store is never made up.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            rows = self._open_checked(self.path)
        except StoreDamaged as damage:
            rows = self._restore(damage)
        self._keep_good_copy()
        return rows

    def _connect(self, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

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
            conn = self._connect(path)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreDamaged(f"{path}: integrity check failed: {check}")
            if existed:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                if not {"meta", "pvs"} <= tables:
                    raise StoreDamaged(f"{path}: not a carelay store (tables missing)")
            conn.executescript(_SCHEMA)
            version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                if existed and conn.execute("SELECT count(*) FROM pvs").fetchone()[0]:
                    raise StoreDamaged(f"{path}: schema version missing")
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            elif version[0] != str(SCHEMA_VERSION):
                raise StoreDamaged(
                    f"{path}: schema version {version[0]}, expected {SCHEMA_VERSION}"
                )
            rows = [self._row(path, *r) for r in conn.execute("SELECT * FROM pvs")]
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

    @staticmethod
    def _row(path, name, stamp, dtype, length, value, fields) -> SavedPv:
        try:
            dt = np.dtype(dtype)
            if not isinstance(value, bytes) or len(value) != length * dt.itemsize:
                raise ValueError(f"value of {len(value)} bytes for {length} x {dt}")
            data = np.frombuffer(value, dtype=dt).copy()
            extra = json.loads(fields)
            if not isinstance(extra, dict):
                raise ValueError("fields are not a map")
        except (TypeError, ValueError) as e:
            raise StoreDamaged(f"{path}: damaged record {name!r}: {e}") from None
        return SavedPv(name, float(stamp), data, extra)

    def _restore(self, damage: StoreDamaged) -> list[SavedPv]:
        good = good_copy_path(self.path)
        if not good.exists():
            raise StoreDamaged(f"{damage}; no good copy ({good.name}) to restore") from None
        # Copy and check the good copy before the damaged file is moved: a restore that
        # fails must leave the damage in place, so that the next start refuses again
        # instead of finding no file and making a new, empty store.
        scratch = self.path.with_name(self.path.name + ".restoring")
        _remove_database(scratch)
        src_conn = sqlite3.connect(f"file:{good}?mode=ro", uri=True)
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
        integrity check; returns whether it did.  Bounds what a restore can lose."""
        with self._lock:
            return self._refresh_good_copy()

    def _refresh_good_copy(self) -> bool:
        try:
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            check = str(e)
        if check != "ok":
            log.error("%s failed its integrity check (%s); the good copy is kept", self.path, check)
            return False
        self._keep_good_copy()
        return True

    def _keep_good_copy(self) -> None:
        good = good_copy_path(self.path)
        scratch = good.with_name(good.name + ".tmp")
        scratch.unlink(missing_ok=True)
        dst = sqlite3.connect(scratch)
        try:
            self._conn.backup(dst)
        finally:
            dst.close()
        fd = os.open(scratch, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(scratch, good)

    # -- writing ----------------------------------------------------------------

    def save(
        self,
        upserts: Iterable[tuple[str, float, np.ndarray, dict]],
        deletes: Iterable[str] = (),
    ) -> int:
        """Write PVs and delete others in one transaction, durable on return."""
        with self._lock:
            return self._save(upserts, deletes)

    def _save(self, upserts, deletes) -> int:
        conn = self._conn
        n = 0
        conn.execute("BEGIN")
        try:
            for name, stamp, value, fields in upserts:
                value = np.ascontiguousarray(value)
                # The array's own bytes as the blob: no copy of a large value per write.
                blob = memoryview(value).cast("B")
                conn.execute(
                    "INSERT OR REPLACE INTO pvs VALUES (?, ?, ?, ?, ?, ?)",
                    (name, stamp, value.dtype.str, value.size, blob, json.dumps(fields)),
                )
                n += 1
            for name in deletes:
                conn.execute("DELETE FROM pvs WHERE name = ?", (name,))
                n += 1
            conn.execute("COMMIT")
        except BaseException as e:
            # SQLite rolls back by itself after most failed writes; a ROLLBACK then fails
            # too, and its error must not stand in for the real one.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as again:
                    log.warning("%s: rollback after a failed write failed: %s", self.path, again)
            if isinstance(e, sqlite3.DatabaseError):
                raise self._write_error(e) from e
            raise
        self.last_flush = time.time()
        return n

    def check_writable(self) -> None:
        """Commit a one-row write (the time of the check), or raise StoreWriteError: tells
        when a store that could not be written can be again, when no value waits."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('checked', ?)", (repr(time.time()),)
                )
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise self._write_error(e) from e

    def _write_error(self, e: sqlite3.DatabaseError) -> StoreWriteError:
        """``e`` with the errno and the file.  SQLite keeps the errno to itself (``disk I/O
        error`` for EFBIG, ``database or disk is full`` for ENOSPC), so the write it was
        making is made again in a scratch file beside the store: a page past the end of
        the larger of the database and its write-ahead log, where SQLite writes next.
        What the system answers there is the errno."""
        wal = Path(f"{self.path}-wal")
        target = wal if wal.exists() else self.path
        offset = 0
        for path in (self.path, wal):
            with contextlib.suppress(OSError):
                offset = max(offset, path.stat().st_size)
        probe = self.path.with_name(self.path.name + ".probe")
        errno = None
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as failed:
            errno = failed.errno
        else:
            try:
                page = bytes(_PROBE_BYTES)
                done = 0
                while done < len(page):  # a write that reaches a size limit is cut short
                    done += os.pwrite(fd, page[done:], offset + done) or len(page)
                os.fsync(fd)
            except OSError as failed:
                errno = failed.errno
            finally:
                os.close(fd)
                with contextlib.suppress(OSError):
                    probe.unlink()
        return StoreWriteError(errno, target, str(e))

    def count(self) -> int:
        """PVs in the store."""
        return self._conn.execute("SELECT count(*) FROM pvs").fetchone()[0]

    def size(self) -> int:
        """Bytes on disk: the database and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.path) + suffix).st_size
        return total

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError as e:
                log.warning("%s: checkpoint on close failed: %s", self.path, e)
            self._conn.close()
            self._conn = None
