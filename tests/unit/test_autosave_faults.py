"""A store that cannot be written: the error it gives, and what the shard does about it."""

from __future__ import annotations

import errno
import json
import logging
import resource
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from carelay.common.lifecycle import write_status
from carelay.common.messages import (
    Ack,
    Applied,
    Delete,
    Ping,
    Pong,
    Put,
    Reject,
    SetField,
    Update,
    Write,
)
from carelay.common.protocol import WriteRun
from carelay.shard.persist import ShardDatabase, StoreWriteError
from carelay.shard.server import ShardServer
from tests.unit.driven_shard import (
    PREFIX,
    break_store,
    handle,
    past_the_period,
    shard_with_store,
)


def _rows(*pairs) -> list:
    return [(f"{PREFIX}{name}_f1", 1.0, np.array([value]), {}) for name, value in pairs]


def _saved(path: Path) -> dict:
    again = ShardDatabase(path)
    try:
        return {row.name: row.value.tolist() for row in again.open()}
    finally:
        again.close()


class _FileSizeLimit:
    """RLIMIT_FSIZE (soft) on this process at ``size`` bytes, for the ``with`` block."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)


def _wal_size(db: ShardDatabase) -> int:
    return Path(f"{db.path}-wal").stat().st_size


# -- the store: the real error, not "cannot rollback" ------------------------------------


def test_a_write_past_the_file_size_limit_names_efbig_and_the_file(tmp_path):
    db = ShardDatabase(tmp_path / "s.sqlite")
    db.open()
    try:
        db.save(_rows(("a", 1.0)))
        with _FileSizeLimit(_wal_size(db)), pytest.raises(StoreWriteError) as caught:
            db.save(_rows(("a", 2.0), ("b", 3.0)))
        e = caught.value
        assert e.errno == errno.EFBIG
        assert e.filename == f"{db.path}-wal"
        assert "[Errno 27]" in str(e) and str(db.path) in str(e)
        assert "rollback" not in str(e)
        assert not list(tmp_path.glob("*.probe"))
        # Nothing half-written, and the next write, with room again, goes through.
        assert _saved(db.path) == {f"{PREFIX}a_f1": [1.0]}
        db.save(_rows(("a", 2.0), ("b", 3.0)))
        with _FileSizeLimit(_wal_size(db)), pytest.raises(StoreWriteError):
            db.check_writable()
        db.check_writable()
    finally:
        db.close()
    assert _saved(db.path) == {f"{PREFIX}a_f1": [2.0], f"{PREFIX}b_f1": [3.0]}


@pytest.fixture
def full_disk(tmp_path):
    """A small tmpfs (skipped where mount is not permitted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_write_to_a_full_disk_names_enospc(full_disk):
    db = ShardDatabase(full_disk / "s.sqlite")
    db.open()
    try:
        db.save(_rows(("a", 1.0)))
        _fill(full_disk)
        with pytest.raises(StoreWriteError) as caught:
            db.save(_rows(*((f"n{k}", float(k)) for k in range(50))))
        assert caught.value.errno == errno.ENOSPC
        assert "No space left on device" in str(caught.value)
        (full_disk / "filler").unlink()
        db.save(_rows(("a", 2.0)))
    finally:
        db.close()
    assert _saved(db.path) == {f"{PREFIX}a_f1": [2.0]}


def test_a_sound_store_opens_where_no_good_copy_can_be_written(tmp_path, caplog):
    """A shard restarted while its disk is full: its store is sound, so it serves it,
    though the copy an open writes cannot be made (and no half copy is left)."""
    path = tmp_path / "s.sqlite"
    db = ShardDatabase(path)
    db.open()
    db.save([(f"{PREFIX}a{k}_f1000", 1.0, np.full(1000, float(k)), {}) for k in range(40)])
    db.close()
    good = Path(f"{path}.good").read_bytes()
    again = ShardDatabase(path)
    try:
        with caplog.at_level(logging.ERROR), _FileSizeLimit(path.stat().st_size // 3):
            rows = again.open()
        assert len(rows) == 40
        assert "cannot write its good copy" in caplog.text
        assert Path(f"{path}.good").read_bytes() == good  # the last good copy stays
        assert not list(tmp_path.glob("*.tmp"))
        assert again.refresh_good_copy()  # with room again
    finally:
        again.close()


# -- the shard: held values, refusals, and the state it tells ---------------------------------


@pytest.fixture
def server(tmp_path):
    s = shard_with_store(tmp_path)
    yield s
    s.autosave.close()
    s.db.close()


def _pong(server: ShardServer, ping: Ping) -> Pong:
    """The PONG to ``ping``, and only that (a broker alone is told with it, by an APPLIED,
    which of its WRITEs are applied)."""
    out = handle(server, ping)
    assert [type(m) for m in out if type(m) is not Applied] == [Pong]
    return next(m for m in out if type(m) is Pong)


def _write(name: str, value: float, req: int = 0) -> Write:
    return Write(name, req, 1.0, np.array([value]))


def _broken(server, monkeypatch) -> StoreWriteError:
    """Make every write to the store fail as a file size limit does."""
    return break_store(server, monkeypatch, errno.EFBIG, "disk I/O error")


def test_a_failed_flush_holds_the_values_and_says_why_once(server, monkeypatch, caplog):
    name = f"{PREFIX}a_f1"
    assert type(handle(server, Put(name, 1, 0.0, np.array([1.0])))[0]) is Update
    _broken(server, monkeypatch)
    handle(server, _write(name, 2.0))
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            server.autosave.flush_soon()
            server.autosave.collect(wait=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "[Errno 27] File too large" in errors[0] and f"{server.db.path}-wal" in errors[0]
    assert name in server.store.dirty
    # Within the autosave period nothing is refused yet.
    assert server.health.refusing == ""
    assert type(handle(server, _write(name, 3.0, req=5))[0]) is Ack


def test_past_the_period_puts_with_callback_fail_and_plain_puts_are_held(server, monkeypatch):
    name, buffer = f"{PREFIX}a_f1", f"{PREFIX}b_F3"
    handle(
        server,
        Put(name, 1, 0.0, np.array([1.0])),
        Put(buffer, 2, 0.0, np.array([1.0])),
    )
    _broken(server, monkeypatch)
    handle(server, _write(name, 2.0))
    server.autosave.flush()
    past_the_period(server)
    assert "cannot write" in server.health.refusing and "[Errno 27]" in server.health.refusing

    # A WRITE with callback, alone or in a run, is refused and not applied: the broker
    # gets the PV as it stands.  Plain ones are applied and held.
    run = WriteRun(np.dtype("<f8"))
    run.add(name, 7, 1.0, np.array([5.0]))
    run.add(name, 0, 1.0, np.array([6.0]))
    out = handle(server, _write(name, 4.0, req=6), run)
    assert [type(m) for m in out] == [Reject, Update, Reject, Update]
    assert out[0].reason == server.health.refusing and out[1].req == 0 and out[1].reset
    assert server.store.get(name).tolist() == [6.0]
    # A PUT with callback is refused; a plain one (the broker's long way) is applied.
    callback = Put(buffer, 8, 0.0, np.array([2.0]), callback=True)
    plain = Put(buffer, 9, 0.0, np.array([3.0]))
    assert [type(m) for m in handle(server, callback, plain)] == [Reject, Update]
    assert server.store.get(buffer).tolist() == [1.0, 3.0]
    # A creation is refused with the real reason.
    out = handle(server, Put(f"{PREFIX}new_f1", 10, 0.0, np.array([1.0])))
    assert type(out[0]) is Reject and "[Errno 27]" in out[0].reason
    # The broker hears it in every PONG, and carelay status in the status file.
    pong = _pong(server, Ping(11))
    assert pong.store_error == server.health.refusing
    server._write_status()
    status = json.loads(server.status_path.read_text())
    assert "[Errno 27]" in status["store_error"]
    assert status["store_failed_since"] <= time.time()
    assert {name, buffer} <= server.store.dirty


def test_when_the_store_heals_everything_clears_and_the_held_values_are_saved(server, monkeypatch):
    name = f"{PREFIX}a_f1"
    handle(server, Put(name, 1, 0.0, np.array([1.0])))
    server.autosave.flush()
    _broken(server, monkeypatch)
    handle(server, _write(name, 2.0))
    server.autosave.flush()
    past_the_period(server)
    assert server.health.refusing
    monkeypatch.undo()
    assert server.autosave.flush_soon() == 1
    server.autosave.collect(wait=True)
    assert server.health.store_error is None and server.health.refusing == ""
    assert _saved(server.db.path) == {name: [2.0]}
    pong = _pong(server, Ping(2))
    assert pong.store_error == ""
    server._write_status()
    status = json.loads(server.status_path.read_text())
    assert status["store_error"] is None and status["store_failed_since"] is None
    assert type(handle(server, _write(name, 3.0, req=3))[0]) is Ack


def test_with_nothing_held_a_small_write_tells_when_the_store_heals(server, monkeypatch):
    _broken(server, monkeypatch)
    out = handle(server, Put(f"{PREFIX}new_f1", 1, 0.0, np.array([1.0])))
    assert type(out[0]) is Reject
    assert server.health.store_error is not None and not server.store.dirty
    server.autosave.flush_soon()  # tries the small write: it fails too
    server.autosave.collect(wait=True)
    assert server.health.store_error is not None
    monkeypatch.undo()
    server.autosave.flush_soon()
    server.autosave.collect(wait=True)
    assert server.health.store_error is None


def _too_large(server, monkeypatch, limit: int) -> None:
    """Make a write whose values pass ``limit`` bytes fail as a file size limit does, where
    a smaller one (a creation's commit, the write check) still gets in."""
    error = StoreWriteError(errno.EFBIG, Path(f"{server.db.path}-wal"), "disk I/O error")
    save = server.db.save

    def save_small(upserts, deletes=()):
        upserts = list(upserts)
        if sum(row[2].nbytes for row in upserts) > limit:
            raise error
        return save(upserts, deletes)

    monkeypatch.setattr(server.db, "save", save_small)


def test_a_small_write_that_gets_in_does_not_end_the_fault_while_values_are_held(
    server, monkeypatch
):
    """Under a file size limit a creation's small commit fits while the large value held
    cannot: the fault stays on (no flapping to "written again"), and past the period the
    creation is refused, as are deletions and field changes, until the held value is saved."""
    big, small = f"{PREFIX}big_f1000", f"{PREFIX}a_f1"
    handle(server, Put(big, 1, 0.0, np.zeros(1000)), Put(small, 2, 0.0, np.array([1.0])))
    server.autosave.flush()
    _too_large(server, monkeypatch, 1000)
    handle(server, Put(big, 3, 0.0, np.full(1000, 2.0)))
    server.autosave.flush_soon()
    server.autosave.collect(wait=True)
    assert server.health.store_error is not None and big in server.store.dirty

    # Within the period a creation's commit gets in, but the fault goes on.
    assert type(handle(server, Put(f"{PREFIX}early_f1", 4, 0.0, np.array([1.0])))[0]) is Update
    assert server.health.store_error is not None
    handle(server, _write(small, 3.0))
    server.autosave.flush_soon()
    server.autosave.collect(wait=True)
    assert server.health.store_error is not None

    past_the_period(server)
    assert "[Errno 27]" in server.health.refusing
    new = f"{PREFIX}new_f1"
    out = handle(
        server,
        _write(small, 4.0, req=5),
        Put(new, 6, 0.0, np.array([1.0])),
        SetField(small, 7, "EGU", "V"),
        Delete(small, 8),
    )
    assert [type(m) for m in out] == [Reject, Update, Reject, Reject, Reject]
    assert all("[Errno 27]" in m.reason for m in out if type(m) is Reject)
    assert new not in server.store and small in server.store
    assert server.store.fields(small) == {}
    assert server.health.refusing and server.health.store_error is not None
    pong = _pong(server, Ping(9))
    assert pong.store_error == server.health.refusing

    # Room again: the held values are written and only then does it all clear.
    monkeypatch.undo()
    server.autosave.flush_soon()
    server.autosave.collect(wait=True)
    assert server.health.store_error is None and server.health.refusing == ""
    saved = _saved(server.db.path)
    assert saved[big] == [2.0] * 1000 and saved[small] == [3.0]
    assert type(handle(server, Put(new, 10, 0.0, np.array([1.0])))[0]) is Update


def test_a_part_of_the_flush_that_gets_in_does_not_end_the_fault(server, monkeypatch):
    """A flush in parts: the small value's part is written, the large one's is not; the
    fault stays on, and FLUSH_AGE does not say that every value is saved."""
    monkeypatch.setattr("carelay.shard.autosave.AUTOSAVE_PART_BYTES", 1)  # a row a part
    big, small = f"{PREFIX}big_f1000", f"{PREFIX}a_f1"
    handle(server, Put(big, 1, 0.0, np.zeros(1000)), Put(small, 2, 0.0, np.array([1.0])))
    server.autosave.flush()
    saved_at = server.autosave.saved_at
    _too_large(server, monkeypatch, 1000)
    failed = False
    for k in (3.0, 4.0):  # two periods: the large part fails before the small one, or after
        handle(server, Put(big, 3, 0.0, np.full(1000, k)), _write(small, k))
        for _ in range(2):
            assert server.autosave.flush_soon() == 1
            server.autosave.collect(wait=True)
            # Once failed, it stays failed, whichever part comes first.
            failed = failed or server.health.store_error is not None
            assert failed == (server.health.store_error is not None)
        assert failed and not server.autosave.saving_parts
        assert _saved(server.db.path)[small] == [k]
    assert server.autosave.saved_at == saved_at
    assert big in server.store.dirty


def test_a_stop_during_the_fault_names_the_values_it_could_not_save(server, monkeypatch, caplog):
    names = [f"{PREFIX}v{k}_f1" for k in range(3)]
    handle(server, *(Put(n, 1, 0.0, np.array([1.0])) for n in names))
    server.autosave.flush()
    _broken(server, monkeypatch)
    handle(server, *(_write(n, 2.0) for n in names))
    server.bind()
    try:
        with caplog.at_level(logging.INFO):
            assert server.serve(SimpleNamespace(stopping=True)) is False
    finally:
        server.close()
    (line,) = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert "3 values not saved" in line and "[Errno 27]" in line
    assert all(n in line for n in names)
    assert "flushed" not in caplog.text
    assert _saved(server.db.path) == {n: [1.0] for n in names}


def test_a_status_file_on_a_full_disk_still_tells(full_disk):
    path = full_disk / "shard-0.json"
    write_status(path, {"store_error": None, "note": "x" * 100})
    _fill(full_disk)
    write_status(path, {"store_error": "cannot write: [Errno 28] No space left on device"})
    status = json.loads(path.read_text())
    assert status["store_error"].endswith("No space left on device")
    assert not [p for p in full_disk.iterdir() if p.name.endswith(".tmp")]
