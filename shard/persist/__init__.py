"""A shard's autosave on disk: one SQLite database in WAL mode per shard.

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
(``<name>.good``), refreshed every GOOD_COPY_INTERVAL while the store changes, from a
snapshot that passed the integrity check: when the database itself is damaged, the
shard restores that copy and says so.

Every SQL statement of the relay is in this package: ``schema`` opens, checks and
creates the tables, ``queries`` reads and writes the rows, ``database`` is the file
of one shard (its lock, its good copy), ``errors`` what a failure says.
"""

from carelay.shard.persist.database import (
    ShardDatabase,
    good_copy_path,
    lock_path,
    lock_store,
)
from carelay.shard.persist.errors import StoreDamaged, StoreWriteError
from carelay.shard.persist.queries import SavedPv, read_store, store_holds, stored_names
from carelay.shard.persist.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "SavedPv",
    "ShardDatabase",
    "StoreDamaged",
    "StoreWriteError",
    "good_copy_path",
    "lock_path",
    "lock_store",
    "read_store",
    "store_holds",
    "stored_names",
]
