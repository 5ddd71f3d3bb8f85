"""Resharding by configuration: every PV ends in its owner's store, once."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from carelay.common.sharding import shard_for
from carelay.shard.persist import ShardDatabase
from carelay.shard.reshard import ReshardError, reshard, store_indices

N = 10_000


def store_path(tmp):
    return lambda k: tmp / f"shard-{k}.sqlite"


def fill(tmp, names, n_shards):
    dbs = {k: ShardDatabase(store_path(tmp)(k)) for k in range(n_shards)}
    for db in dbs.values():
        db.open()
    for k, db in dbs.items():
        db.save(
            (name, float(i), np.array([float(i)]), {"EGU": f"u{i}"})
            for i, name in enumerate(names)
            if shard_for(name, n_shards) == k
        )
        db.close()


def contents(tmp) -> dict[int, dict]:
    out = {}
    for k in store_indices(tmp):
        db = ShardDatabase(store_path(tmp)(k))
        out[k] = {r.name: (r.value.tolist(), r.fields) for r in db.open()}
        db.close()
    return out


@pytest.fixture
def names():
    return [f"P:pv{i}_f1" for i in range(N)]


def check_placed(tmp, names, n_shards):
    stores = contents(tmp)
    assert sorted(stores) == list(range(n_shards))
    seen = {}
    for k, rows in stores.items():
        for name, row in rows.items():
            assert shard_for(name, n_shards) == k, name
            assert name not in seen, f"{name} kept twice"
            seen[name] = row
    assert len(seen) == len(names)
    for i, name in enumerate(names):
        assert seen[name] == ([float(i)], {"EGU": f"u{i}"})


def test_two_to_three_moves_about_a_third(tmp_path, names, caplog):
    fill(tmp_path, names, 2)
    with caplog.at_level(logging.INFO):
        report = reshard(tmp_path, 3, store_path(tmp_path))
    assert report.total == N
    expected = sum(1 for n in names if shard_for(n, 3) != shard_for(n, 2))
    assert report.moved == expected
    assert 0.28 * N < report.moved < 0.39 * N  # about 1/3, and only to the new shard
    check_placed(tmp_path, names, 3)
    assert f"moved {report.moved} of {N} PVs" in caplog.text


def test_three_to_two_drains_and_removes_the_third_store(tmp_path, names):
    fill(tmp_path, names, 3)
    report = reshard(tmp_path, 2, store_path(tmp_path))
    assert report.removed_stores == 1
    assert not (tmp_path / "shard-2.sqlite").exists()
    assert not (tmp_path / "shard-2.sqlite.good").exists()
    check_placed(tmp_path, names, 2)


def test_a_store_left_only_as_its_good_copy_is_restored_and_moved(tmp_path, names):
    """A store gone missing, its good copy kept: its shard would restore the copy at its
    next open, but a shard beyond the new count never opens again, so resharding
    restores it and moves its PVs (before, they were left behind, and lost)."""
    fill(tmp_path, names, 3)
    db = ShardDatabase(store_path(tmp_path)(2))
    db.open()  # takes a good copy of what it holds now
    db.close()
    assert (tmp_path / "shard-2.sqlite.good").exists()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"shard-2.sqlite{suffix}").unlink(missing_ok=True)
    assert store_indices(tmp_path) == [0, 1, 2]
    reshard(tmp_path, 2, store_path(tmp_path))
    check_placed(tmp_path, names, 2)
    assert not (tmp_path / "shard-2.sqlite.good").exists()


def test_nothing_to_do_when_the_count_is_unchanged(tmp_path, names):
    fill(tmp_path, names[:100], 2)
    assert reshard(tmp_path, 2, store_path(tmp_path)).moved == 0
    check_placed(tmp_path, names[:100], 2)


def test_interrupted_move_resumes(tmp_path, names):
    """A crash between writing the new store and deleting from the old leaves a PV in
    both: the next run finishes the move and keeps it once."""
    names = names[:500]
    fill(tmp_path, names, 2)
    movers = [n for n in names if shard_for(n, 3) == 2]
    new = ShardDatabase(store_path(tmp_path)(2))
    new.open()
    i_of = {n: i for i, n in enumerate(names)}
    new.save((n, 0.0, np.array([float(i_of[n])]), {"EGU": f"u{i_of[n]}"}) for n in movers[:50])
    new.close()
    report = reshard(tmp_path, 3, store_path(tmp_path))
    assert report.moved == len(movers)
    check_placed(tmp_path, names, 3)


def test_a_store_in_use_is_not_touched(tmp_path, names):
    import fcntl
    import os

    fill(tmp_path, names[:100], 2)
    fd = os.open(tmp_path / "shard-0.sqlite.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ReshardError, match="shard-0.sqlite.lock"):
            reshard(tmp_path, 3, store_path(tmp_path))
    finally:
        os.close(fd)
    check_placed(tmp_path, names[:100], 2)


def test_empty_data_dir(tmp_path):
    assert reshard(tmp_path, 3, store_path(tmp_path)).total == 0


def test_a_store_left_only_as_its_good_copy_moves_when_shards_are_added(tmp_path, names):
    """Only shard 1 holds PVs, and only as its good copy: no other store says a move is
    due, yet some of its PVs belong to the new shard 2."""
    names = [n for n in names if shard_for(n, 2) == 1]
    fill(tmp_path, names, 2)
    db = ShardDatabase(store_path(tmp_path)(1))
    db.open()  # takes a good copy of what it holds now
    db.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"shard-1.sqlite{suffix}").unlink(missing_ok=True)
    report = reshard(tmp_path, 3, store_path(tmp_path))
    assert report.moved > 0
    check_placed_subset(tmp_path, names, 3)


def check_placed_subset(tmp, names, n_shards):
    """Every one of ``names`` once, in its owner's store."""
    seen = {}
    for k, rows in contents(tmp).items():
        for name in rows:
            assert shard_for(name, n_shards) == k, name
            assert name not in seen
            seen[name] = k
    assert sorted(seen) == sorted(names)


def _damage(path, at=0):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 100)


def test_a_damaged_store_is_judged_by_its_good_copy_and_moved(tmp_path, names, caplog):
    """One shard's store, damaged, and a second shard added: its good copy holds PVs of the
    new shard.  Before, the store that could not be read was left to its shard, which
    restored it and served PVs it does not own, whose puts then went to the other."""
    names = names[:2000]
    fill(tmp_path, names, 1)
    db = ShardDatabase(store_path(tmp_path)(0))
    db.open()  # takes a good copy of what it holds
    db.close()
    _damage(tmp_path / "shard-0.sqlite")
    with caplog.at_level(logging.INFO):
        report = reshard(tmp_path, 2, store_path(tmp_path))
    assert report.moved == sum(1 for n in names if shard_for(n, 2) == 1) > 0
    check_placed(tmp_path, names, 2)
    assert "restored the last good copy" in caplog.text


def test_a_damaged_store_whose_copy_needs_no_move_is_left_to_its_shard(tmp_path, names):
    fill(tmp_path, names[:200], 2)
    for k in (0, 1):
        db = ShardDatabase(store_path(tmp_path)(k))
        db.open()
        db.close()
    _damage(tmp_path / "shard-0.sqlite")
    assert reshard(tmp_path, 2, store_path(tmp_path)).total == 0  # not even opened
    assert (tmp_path / "shard-0.sqlite").read_bytes()[:100] == b"\xff" * 100


def test_a_pv_in_two_stores_keeps_its_newer_row(tmp_path, names, caplog):
    """The owner's store holds a newer row than the one moving in (a store restored
    from its copy, served meanwhile): the newer one stays, and the log says so."""
    names = names[:600]
    fill(tmp_path, names, 2)
    movers = [n for n in names if shard_for(n, 3) == 2][:40]
    new = ShardDatabase(store_path(tmp_path)(2))
    new.open()
    new.save((n, 2e9, np.array([-1.0]), {"EGU": "newer"}) for n in movers[:30])
    new.save((n, -1.0, np.array([-2.0]), {"EGU": "older"}) for n in movers[30:])
    new.close()
    with caplog.at_level(logging.INFO):
        report = reshard(tmp_path, 3, store_path(tmp_path))
    assert (report.total, report.doubled, report.older) == (600, 40, 40)
    stores = contents(tmp_path)
    assert all(stores[2][n] == ([-1.0], {"EGU": "newer"}) for n in movers[:30])
    i_of = {n: i for i, n in enumerate(names)}
    assert all(stores[2][n] == ([float(i_of[n])], {"EGU": f"u{i_of[n]}"}) for n in movers[30:])
    assert sum(len(rows) for rows in stores.values()) == 600
    assert "40 were in two stores" in caplog.text


def test_a_store_that_cannot_be_written_stops_the_move_and_loses_nothing(
    tmp_path, names, monkeypatch
):
    from carelay.shard.persist import StoreWriteError

    names = names[:3000]
    fill(tmp_path, names, 2)
    save, calls = ShardDatabase.save, []

    def full_disk(self, upserts, deletes=()):
        calls.append(1)
        if len(calls) > 3:
            raise StoreWriteError(27, self.path, "disk I/O error")
        return save(self, upserts, deletes)

    monkeypatch.setattr(ShardDatabase, "save", full_disk)
    with pytest.raises(ReshardError, match=r"stopped after moving \d+ of 3000 PVs: cannot write"):
        reshard(tmp_path, 3, store_path(tmp_path))
    monkeypatch.setattr(ShardDatabase, "save", save)
    report = reshard(tmp_path, 3, store_path(tmp_path))
    assert report.moved > 0
    check_placed(tmp_path, names, 3)


def test_the_good_copies_are_of_the_stores_after_the_move(tmp_path, names):
    """A store damaged after the move is restored with the PVs moved into it, not as it
    was when the move opened it (empty, for a new shard)."""
    names = names[:1000]
    fill(tmp_path, names, 2)
    reshard(tmp_path, 3, store_path(tmp_path))
    _damage(tmp_path / "shard-2.sqlite")
    check_placed(tmp_path, names, 3)  # opens each: shard 2 from its good copy


def test_the_move_is_announced_once_and_only_when_due(tmp_path, names):
    fill(tmp_path, names[:300], 2)
    said = []
    reshard(tmp_path, 2, store_path(tmp_path), lambda: said.append(1))
    assert said == []
    reshard(tmp_path, 3, store_path(tmp_path), lambda: said.append(1))
    assert said == [1]
