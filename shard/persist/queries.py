"""The rows of a shard's store: read, written, counted.

The functions on a connection run in the shard (or in resharding and import, which hold
the store's lock); the functions on a path read a store without writing anything,
beside a running shard (WAL lets readers in while it writes) or with none.  What a
running shard holds in memory and has not flushed yet is not there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carelay.shard.persist.errors import StoreDamaged
from carelay.shard.persist.schema import connect_read_only

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SavedPv:
    name: str
    stamp: float
    value: np.ndarray
    fields: dict


def parse_row(path: Path, name, stamp, dtype, length, value, fields) -> SavedPv:
    """A row of ``pvs`` as a SavedPv; StoreDamaged when it does not hold together."""
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


def load_rows(conn: sqlite3.Connection, path: Path) -> list[SavedPv]:
    """Every PV of the store ``conn`` has open (at ``path``)."""
    return [parse_row(path, *r) for r in conn.execute("SELECT * FROM pvs")]


def save_rows(
    conn: sqlite3.Connection,
    path: Path,
    upserts: Iterable[tuple[str, float, np.ndarray, dict]],
    deletes: Iterable[str],
) -> int:
    """Write PVs and delete others in one transaction, durable on return; returns how
    many.  A failed write is rolled back and its own error raised."""
    conn.execute("BEGIN")
    try:
        # One statement run over every row (a creation burst commits hundreds at once).
        rows = [_row(*upsert) for upsert in upserts]
        gone = [(name,) for name in deletes]
        conn.executemany(_UPSERT, rows)
        conn.executemany(_DELETE, gone)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself after most failed writes; a ROLLBACK then fails
        # too, and its error must not stand in for the real one.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as again:
                log.warning("%s: rollback after a failed write failed: %s", path, again)
        raise
    return len(rows) + len(gone)


_UPSERT = "INSERT OR REPLACE INTO pvs VALUES (?, ?, ?, ?, ?, ?)"
_DELETE = "DELETE FROM pvs WHERE name = ?"


#: The fields column of a PV with none (most PVs): not encoded again for each row.
_NO_FIELDS_JSON = json.dumps({})


def _row(name: str, stamp: float, value: np.ndarray, fields: dict) -> tuple:
    """The ``pvs`` row of one PV, its value's own bytes as the blob: no copy of a large
    value per write."""
    value = np.ascontiguousarray(value)
    blob = memoryview(value).cast("B")
    extra = json.dumps(fields) if fields else _NO_FIELDS_JSON
    return name, stamp, value.dtype.str, value.size, blob, extra


def mark_checked(conn: sqlite3.Connection) -> None:
    """Commit a one-row write: the time of this check.  A failed one is rolled back and
    its error raised."""
    try:
        conn.execute("BEGIN")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('checked', ?)", (repr(time.time()),))
        conn.execute("COMMIT")
    except sqlite3.DatabaseError:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def count_rows(conn: sqlite3.Connection) -> int:
    """PVs in the store."""
    return conn.execute("SELECT count(*) FROM pvs").fetchone()[0]


def stored_names(path: Path) -> list[str] | None:
    """The names in the store at ``path``; [] when there is no store, None when it cannot
    be read."""
    if not path.exists():
        return []
    try:
        conn = connect_read_only(path)
        try:
            return [r[0] for r in conn.execute("SELECT name FROM pvs")]
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def store_holds(path: Path, name: str) -> bool | None:
    """Whether the store at ``path`` holds ``name``; False when there is no store, None
    when it cannot be read."""
    if not path.exists():
        return False
    try:
        conn = connect_read_only(path)
        try:
            return conn.execute("SELECT 1 FROM pvs WHERE name = ?", (name,)).fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def read_store(path: Path) -> list[SavedPv]:
    """Every PV in the store at ``path``, by name; StoreDamaged when it cannot be read."""
    if not path.exists():
        return []
    try:
        conn = connect_read_only(path)
    except sqlite3.Error as e:
        raise StoreDamaged(f"{path}: {e}") from None
    try:
        rows = conn.execute("SELECT * FROM pvs ORDER BY name").fetchall()
    except sqlite3.Error as e:
        raise StoreDamaged(f"{path}: {e}") from None
    finally:
        conn.close()
    return [parse_row(path, *r) for r in rows]
