"""The tables of a shard's store, and the checks made when it is opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from carelay.shard.persist.errors import StoreDamaged, StoreTooNew

SCHEMA_VERSION = 1
#: The write-ahead log is cut back to this size (bytes) by the checkpoint that empties
#: it.  Without it the log keeps the size of the largest transaction it ever held (a
#: flush of many large arrays) until the store is closed: on disk, and in STORE_BYTES.
WAL_SIZE_LIMIT = 8 * 1024 * 1024

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


def connect(path: Path) -> sqlite3.Connection:
    """A connection for the shard that writes ``path``: WAL, every commit on disk."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write ``path`` (a reader beside the shard, or none)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def quick_check(conn: sqlite3.Connection) -> str:
    """ "ok", or what SQLite's integrity check found wrong."""
    return conn.execute("PRAGMA quick_check").fetchone()[0]


def prepare(conn: sqlite3.Connection, path: Path, existed: bool) -> None:
    """Check that ``conn`` is a sound carelay store of this schema version (``existed``:
    the file had content), creating the tables where it is new.  StoreDamaged if not;
    a sqlite3.DatabaseError passes through."""
    check = quick_check(conn)
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
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        checkpoint(conn)
    elif version[0] != str(SCHEMA_VERSION):
        if version[0].isdigit() and int(version[0]) > SCHEMA_VERSION:
            raise StoreTooNew(
                f"{path}: schema version {version[0]}, written by a newer carelay (this one "
                f"reads version {SCHEMA_VERSION}); left as it is: run the carelay that wrote it"
            )
        raise StoreDamaged(f"{path}: schema version {version[0]}, expected {SCHEMA_VERSION}")


def checkpoint(conn: sqlite3.Connection) -> None:
    """Move the write-ahead log into the database and empty it."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
