"""The shard's autosave file: round trips, torn writes, damage and the good copy."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from carelay.shard.persist import ShardDatabase, StoreDamaged, good_copy_path
from carelay.shard.persist.schema import WAL_SIZE_LIMIT


def _rows(db: ShardDatabase) -> dict:
    return {r.name: (r.stamp, r.value.tolist(), r.fields) for r in db.open()}


@pytest.fixture
def path(tmp_path):
    return tmp_path / "shard-0.sqlite"


def test_new_store_is_empty_and_round_trips(path):
    db = ShardDatabase(path)
    assert db.open() == []
    db.save(
        [
            ("P:a_f1", 1.5, np.array([2.5]), {}),
            ("P:b_F4", 2.0, np.array([1.0, 2.0, 3.0]), {"EGU": "mm"}),
            ("P:t_c10", 3.0, np.frombuffer(b"hi\0", np.uint8), {}),
            ("P:s_s1", 4.0, np.array([b"text"], dtype="S40"), {}),
        ]
    )
    db.close()
    again = ShardDatabase(path)
    rows = {r.name: r for r in again.open()}
    assert set(rows) == {"P:a_f1", "P:b_F4", "P:t_c10", "P:s_s1"}
    assert rows["P:a_f1"].value.tolist() == [2.5] and rows["P:a_f1"].stamp == 1.5
    assert rows["P:b_F4"].value.tolist() == [1.0, 2.0, 3.0]
    assert rows["P:b_F4"].fields == {"EGU": "mm"}
    assert rows["P:t_c10"].value.tobytes() == b"hi\0"
    assert rows["P:s_s1"].value.dtype == np.dtype("S40")
    again.close()


def test_a_store_opened_again_says_when_it_was_last_written(path):
    db = ShardDatabase(path)
    db.open()
    assert db.last_flush == 0.0  # a new store: never
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    written = max(os.stat(p).st_mtime for p in path.parent.glob(path.name + "*"))
    old = written - 3600
    for p in path.parent.glob(path.name + "*"):
        os.utime(p, (old, old))
    again = ShardDatabase(path)
    again.open()
    assert again.last_flush == old  # `carelay status` says when, not "never"
    again.close()


def test_delete_and_replace(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {}), ("P:b_f1", 1.0, np.array([2.0]), {})])
    db.save([("P:a_f1", 2.0, np.array([3.0]), {})], deletes=["P:b_f1"])
    db.close()
    assert _rows(ShardDatabase(path)) == {"P:a_f1": (2.0, [3.0], {})}


def test_committed_data_survives_a_process_that_never_closed(path, tmp_path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    # No close(): copy the files as a crash would leave them (database, WAL).
    crash = tmp_path / "crash"
    crash.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(f"{path}{suffix}", f"{crash / path.name}{suffix}")
    assert _rows(ShardDatabase(crash / path.name)) == {"P:a_f1": (1.0, [1.0], {})}


def test_torn_wal_write_keeps_the_last_committed_state(path, tmp_path):
    """A crash in the middle of a commit: the WAL ends in a partial frame."""
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    wal = f"{path}-wal"
    committed_size = os.path.getsize(wal)
    db.save([("P:a_f1", 2.0, np.array([2.0]), {}), ("P:big_F1000", 2.0, np.ones(1000), {})])
    full_size = os.path.getsize(wal)
    assert full_size > committed_size
    crash = tmp_path / "crash"
    crash.mkdir()
    shutil.copy(path, crash / path.name)
    torn = (committed_size + full_size) // 2
    with open(wal, "rb") as f:
        data = f.read(torn)
    with open(f"{crash / path.name}-wal", "wb") as f:
        f.write(data)
    rows = _rows(ShardDatabase(crash / path.name))
    assert rows == {"P:a_f1": (1.0, [1.0], {})}


def test_damaged_store_restores_the_good_copy_and_keeps_the_damaged_file(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    ShardDatabase(path).open()  # a clean start refreshes the good copy
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"\xff" * 200)  # overwrite the header
    restored = ShardDatabase(path)
    rows = {r.name for r in restored.open()}
    assert rows == {"P:a_f1"}
    assert restored.restored_from_copy
    assert any(p.name.startswith(path.name + ".damaged-") for p in path.parent.iterdir())


def test_damaged_store_without_good_copy_refuses_naming_the_file(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    good_copy_path(path).unlink()
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"garbage " * 20)
    with pytest.raises(StoreDamaged, match=str(path.name)):
        ShardDatabase(path).open()


@pytest.mark.parametrize("size", [0, 100, 1000])
def test_truncated_store_is_never_taken_for_empty(path, size):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {}), ("P:b_F10", 1.0, np.ones(10), {})])
    db.close()
    good_copy_path(path).unlink()
    ShardDatabase(path).open()  # a good copy holding both PVs
    os.truncate(path, size)
    rows = {r.name for r in ShardDatabase(path).open()}
    assert rows == {"P:a_f1", "P:b_F10"}  # restored, not empty


def test_truncated_store_and_no_copy_refuses(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    os.truncate(path, 100)
    good_copy_path(path).write_bytes(b"not a database either" * 10)
    with pytest.raises(StoreDamaged, match="good copy"):
        ShardDatabase(path).open()


@pytest.mark.parametrize("good", ["garbage", "header-overwritten", "truncated"])
def test_failed_restore_keeps_refusing_and_keeps_the_damaged_file(path, good):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    ShardDatabase(path).open()  # a good copy holding the PV
    with open(path, "r+b") as f:
        f.write(b"\xff" * 100)
    damaged = path.read_bytes()
    copy = good_copy_path(path)
    if good == "garbage":
        copy.write_bytes(b"not a database either" * 10)
    elif good == "header-overwritten":
        with open(copy, "r+b") as f:
            f.write(b"\xff" * 100)
    else:
        os.truncate(copy, 1000)
    for _ in range(3):  # a supervisor starts the shard again and again
        with pytest.raises(StoreDamaged, match="good copy"):
            ShardDatabase(path).open()
        assert path.read_bytes() == damaged  # never replaced by an empty store


def test_record_that_does_not_fit_is_damage(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_F4", 1.0, np.ones(4), {})])
    db.close()
    good_copy_path(path).unlink()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE pvs SET length = 40")
    conn.commit()
    conn.close()
    with pytest.raises(StoreDamaged, match="P:a_F4"):
        ShardDatabase(path).open()


def test_other_database_is_not_a_store(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.execute("INSERT INTO unrelated VALUES (1)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreDamaged, match="not a carelay store"):
        ShardDatabase(path).open()


def test_missing_store_beside_its_good_copy_is_restored_not_started_empty(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    ShardDatabase(path).open()  # a good copy holding the PV
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    again = ShardDatabase(path)
    assert [r.name for r in again.open()] == ["P:a_f1"]
    assert again.restored_from_copy


def test_refreshed_good_copy_holds_later_changes(path):
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    assert db.refresh_good_copy()
    db.save([("P:b_f1", 2.0, np.array([2.0]), {})])  # after the refresh: not in the copy
    db.close()
    with open(path, "r+b") as f:
        f.write(b"\xff" * 100)
    assert {r.name for r in ShardDatabase(path).open()} == {"P:a_f1"}


def test_the_log_of_a_large_flush_does_not_stay_on_disk(path):
    """A flush of many large arrays writes its whole transaction to the store's
    write-ahead log; once checkpointed, the log goes back to its bound rather than
    keeping that size (STORE_BYTES twice the data) until the shard is restarted."""
    db = ShardDatabase(path)
    db.open()
    big = [(f"P:w{k}_F250000", 1.0, np.full(250_000, float(k)), {}) for k in range(24)]
    db.save(big)  # 48 MB in one transaction
    wal = Path(str(path) + "-wal")
    assert wal.stat().st_size > 40_000_000
    for k in range(1100):  # past SQLite's automatic checkpoint (1,000 pages)
        db.save([("P:small_f1", float(k), np.array([float(k)]), {})])
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    assert db.size() < 60_000_000
    db.close()
    again = ShardDatabase(path)
    rows = {r.name: r for r in again.open()}
    assert rows["P:w23_F250000"].value[-1] == 23.0 and rows["P:small_f1"].value[0] == 1099.0
    again.close()


def _schema(path: Path, version: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (version,))
    conn.close()


def test_a_store_of_a_newer_schema_is_refused_and_left_as_it_is(tmp_path):
    """Not damaged: restoring its (older) good copy would lose what it holds."""
    path = tmp_path / "shard-0.sqlite"
    db = ShardDatabase(path)
    db.open()
    db.save([("P:a_f1", 1.0, np.array([1.0]), {})])
    db.close()
    _schema(path, "2")
    before = path.read_bytes()
    with pytest.raises(StoreDamaged, match="schema version 2, written by a newer carelay"):
        ShardDatabase(path).open()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0.sqlite", "shard-0.sqlite.good"]


def test_a_store_of_an_unknown_schema_is_damaged_and_restored(tmp_path):
    path = tmp_path / "shard-0.sqlite"
    db = ShardDatabase(path)
    db.open()
    db.close()
    _schema(path, "x")
    db = ShardDatabase(path)
    assert db.open() == [] and db.restored_from_copy
    db.close()
