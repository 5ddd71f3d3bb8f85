"""Resharding by configuration: move each PV to the shard that owns it now.

Run by ``carelay up`` before any shard starts, on the stores in the data
directory.  A move writes the PV (value and fields) into its new store and
commits, then deletes it from the old one and commits: a move interrupted
between the two leaves the PV in both, and the next run moves it again
(the write replaces), so nothing is lost or kept twice.  Rendezvous hashing
keeps the moves few: going from N to N+1 shards moves about 1/(N+1) of them.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from carelay.common.config import TRANSFER_CHUNK
from carelay.common.progress import Progress
from carelay.common.sharding import shard_for
from carelay.shard.persist import (
    ShardDatabase,
    good_copy_path,
    lock_path,
    lock_store,
    stored_names,
)

log = logging.getLogger(__name__)

_STORE_RE = re.compile(r"shard-(\d+)\.sqlite(?:\.good)?")


class ReshardError(Exception):
    """A store could not be opened or written, or is in use; the message names it."""


@dataclass
class ReshardReport:
    moved: int = 0
    #: PVs in all the stores, each counted once.
    total: int = 0
    removed_stores: int = 0
    #: PVs found in two stores, and the copies of them dropped as the older.
    doubled: int = 0
    older: int = 0


def store_indices(data_dir: Path) -> list[int]:
    """Indices of the shard stores present in ``data_dir``: a store, or its good copy
    alone (a store gone missing, which opening it restores from the copy)."""
    out = set()
    for p in data_dir.glob("shard-*.sqlite*"):
        m = _STORE_RE.fullmatch(p.name)
        if m:
            out.add(int(m[1]))
    return sorted(out)


def reshard(data_dir: Path, n_shards: int, store_path, moving=None) -> ReshardReport:
    """Move every PV in ``data_dir`` to its owner among ``n_shards``.

    ``store_path(k)`` is where shard k keeps its store (Config.store_path); ``moving()``,
    if given, is called once a move is found due, before any store is opened.  A PV found
    in two stores (a move cut short, or a store restored from its good copy) keeps the
    row of the newer stamp.  ReshardError when a store cannot be opened or written: what
    was moved stays moved, and the next start goes on with the rest.
    """
    report = ReshardReport()
    present = store_indices(data_dir)
    if not any(_misplaced(store_path(k), k, n_shards) for k in present):
        return report
    if moving is not None:
        moving()
    indices = sorted(set(present) | set(range(n_shards)))
    locks, dbs = [], {}
    try:
        for k in indices:
            path = store_path(k)
            fd = lock_store(path)
            if fd is None:
                raise ReshardError(f"{lock_path(path)} is held by a running shard; stop it first")
            locks.append(fd)
        rows = {}
        for k in indices:
            db = ShardDatabase(store_path(k))
            try:
                rows[k] = db.open()
            except Exception as e:
                raise ReshardError(f"cannot open {db.path} to reshard: {e}") from None
            dbs[k] = db
        try:
            _move(rows, dbs, n_shards, report)
            for k in indices:
                if k >= n_shards and not dbs[k].count():
                    dbs[k].close()
                    del dbs[k]
                    _remove_store(store_path(k))
                    report.removed_stores += 1
        except (OSError, sqlite3.Error) as e:
            raise ReshardError(
                f"resharding stopped after moving {report.moved} of {report.total} PVs: {e}; "
                "nothing is lost: the next start goes on with the move"
            ) from None
        # Each good copy as its store is now: taken at the open, it still holds the PVs
        # that moved (a restore of it would bring them back where they were).
        for db in dbs.values():
            db.settle_good_copy()
    finally:
        for db in dbs.values():
            db.close()
        for fd in locks:
            os.close(fd)
    if report.moved or report.doubled:
        log.info(
            "resharding to %d shards moved %d of %d PVs%s",
            n_shards,
            report.moved,
            report.total,
            f"; {report.doubled} were in two stores (a move cut short, or a store restored): "
            f"each keeps its newer value, {report.older} older copies dropped"
            if report.doubled
            else "",
        )
    return report


def _move(rows: dict[int, list], dbs: dict, n_shards: int, report: ReshardReport) -> None:
    """Move the PVs of ``rows`` (by store index) that their store does not own."""
    held = {k: {row.name: row for row in saved} for k, saved in rows.items()}
    seen: dict[str, int] = {}
    for saved in rows.values():
        for row in saved:
            seen[row.name] = seen.get(row.name, 0) + 1
    report.total = len(seen)
    report.doubled = sum(1 for n in seen.values() if n > 1)
    moves: list[tuple[int, int, list]] = []
    for k, saved in rows.items():
        by_target: dict[int, list] = {}
        for row in saved:
            owner = shard_for(row.name, n_shards)
            if owner != k:
                by_target.setdefault(owner, []).append(row)
        moves += [(k, owner, moving) for owner, moving in by_target.items()]
    progress = Progress(log, "resharding", sum(len(m) for _, _, m in moves), "PVs moved")
    for k, owner, moving in moves:
        target = held.setdefault(owner, {})
        for i in range(0, len(moving), TRANSFER_CHUNK):
            chunk = moving[i : i + TRANSFER_CHUNK]
            newer = []
            for row in chunk:
                there = target.get(row.name)
                if there is not None:
                    report.older += 1  # one of the two copies goes
                    if there.stamp > row.stamp:
                        continue  # the owner's own row is newer: this one
                newer.append(row)
                target[row.name] = row
            dbs[owner].save((r.name, r.stamp, r.value, r.fields) for r in newer)
            dbs[k].save((), deletes=[r.name for r in chunk])
            report.moved += len(chunk)
            progress.step(len(chunk))
        log.debug("moved %d PVs from shard %d to shard %d", len(moving), k, owner)


def _misplaced(path: Path, index: int, n_shards: int) -> bool:
    """Whether the store at ``path`` holds a PV that shard ``index`` does not own (a cheap,
    read-only look).  A store that cannot be read is judged by its good copy, which
    opening it restores; without one, it is left to its shard to report."""
    if index >= n_shards:
        return True
    if not path.exists() and good_copy_path(path).exists():
        return True  # left as its good copy: opening it restores it, then it is looked at
    names = stored_names(path)
    if names is None:
        names = stored_names(good_copy_path(path))
        if names is None:
            return False
    return any(shard_for(name, n_shards) != index for name in names)


def _remove_store(path: Path) -> None:
    # The good copy first: left alone by a crash, it is a store "gone missing", which the
    # next start restores from it, with the PVs it held before they moved.
    for p in (good_copy_path(path), path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    log.info("removed the emptied store %s", path)
