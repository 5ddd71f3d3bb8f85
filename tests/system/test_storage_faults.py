"""Storage faults: a shard whose store cannot be written while it runs.

The fault is made with RLIMIT_FSIZE on the running shard process (``prlimit
--fsize``): a limit at the current size of the store's write-ahead log makes
the next write to it fail with EFBIG, and nothing else of the shard's (its
status file, the relay log) comes near that size.  Raising the limit again
ends the fault.

What the failure model promises: while the store cannot be written for longer
than ``autosave_period``, puts with callback to the shard's PVs fail, its PVs
carry a WRITE alarm of MAJOR severity and ``carelay status`` exits 3 naming
the shard and the error; plain puts are held and flushed once the store can be
written again; a stop during the fault says what it could not save and exits
non-zero, and loses nothing that was stored.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus, CaprotoError

from tests.system.clients import Context, name_on_shard
from tests.system.conftest import wait_for

AUTOSAVE = 0.2
FAST = ["--autosave-period", str(AUTOSAVE)]
#: Elements of the PV whose puts grow the store's write-ahead log past everything else
#: the shard writes (its status file, the relay log), so that a file size limit at the
#: log's size stops the store alone.
GROW = 20_000
CLIENT_ERRORS = (CaprotoError, TimeoutError, KeyError)


# -- helpers ---------------------------------------------------------------------------


def connect(ca, *names: str) -> list:
    pvs = ca.get_pvs(*names, timeout=5)
    for pv in pvs:
        pv.wait_for_connection(timeout=5)
    return pvs


def put_ok(pv, value) -> bool:
    """A put with callback through caproto; True only if the relay acknowledged it."""
    try:
        return bool(pv.write(value, wait=True, timeout=3).status.success)
    except CLIENT_ERRORS:
        return False


def read_time(pv):
    """(first element, severity, status) of a DBR_TIME read."""
    r = pv.read(data_type="time", data_count=0, timeout=5)
    return r.data[0], r.metadata.severity, r.metadata.status


def shard_status(relay, shard: int = 0) -> dict:
    try:
        return json.loads((relay.data_dir / "run" / f"shard-{shard}.json").read_text())
    except (OSError, ValueError):
        return {}


def store(relay, shard: int = 0) -> Path:
    return relay.data_dir / f"shard-{shard}.sqlite"


def stored(relay, name: str, shard: int = 0) -> float | None:
    """The value of scalar ``name`` in the shard's store on disk, read beside the shard."""
    conn = sqlite3.connect(f"file:{store(relay, shard)}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT dtype, value FROM pvs WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    return None if row is None else float(np.frombuffer(row[1], dtype=row[0])[0])


def wait_stored(relay, name: str, value: float) -> None:
    wait_for(lambda: stored(relay, name) == value, what=f"{name} = {value} in the store")


def limit_store(relay, ca, shard: int = 0) -> int:
    """Make shard ``shard``'s store unwritable: a file size limit on the process at the
    size of its largest store file, after a large PV grew the write-ahead log."""
    (big,) = connect(ca, name_on_shard(relay, shard, "grow", f"f{GROW}"))
    for k in (1.0, 2.0):
        assert put_ok(big, np.full(GROW, k))
        wait_stored(relay, big.name, k)
    wal = Path(f"{store(relay, shard)}-wal")
    size = max(store(relay, shard).stat().st_size, wal.stat().st_size)
    assert len(relay.log()) < size // 4, "the relay log would reach the limit too"
    pid = shard_status(relay, shard)["pid"]
    # The soft limit only: raising a hard limit again needs CAP_SYS_RESOURCE.
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    return pid


def unlimit(pid: int) -> None:
    inf = resource.RLIM_INFINITY
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (inf, inf))


def log_lines(relay, *words: str) -> list[str]:
    return [line for line in relay.log().splitlines() if all(w in line for w in words)]


class Severities:
    """The alarm severities a DBR_TIME subscription of ``pv`` saw, in order."""

    def __init__(self, pv) -> None:
        self.seen: list = []
        self._lock = threading.Lock()
        self.sub = pv.subscribe(data_type="time")
        self.sub.add_callback(self._event)

    def _event(self, sub, response) -> None:
        with self._lock:
            self.seen.append(response.metadata.severity)

    def saw(self, severity, after: int = 0) -> bool:
        with self._lock:
            return severity in self.seen[after:]


# -- the tests -----------------------------------------------------------------------------


def test_an_unwritable_store_fails_puts_with_callback_and_raises_an_alarm_until_it_heals(
    make_relay, ca
):
    relay = make_relay(shards=2, extra=FAST)
    before, during = (name_on_shard(relay, 0, stem) for stem in ("before", "during"))
    other = name_on_shard(relay, 1, "other")
    pv_before, pv_during, pv_other = connect(ca, before, during, other)
    for pv, value in ((pv_before, 1.5), (pv_during, 1.0), (pv_other, 1.0)):
        assert put_ok(pv, [value])
    wait_stored(relay, before, 1.5)
    monitor = Severities(pv_before)
    wait_for(lambda: monitor.saw(AlarmSeverity.NO_ALARM), what="the monitor's first event")

    mark = len(relay.log())
    pid = limit_store(relay, ca)
    pv_during.write([2.5], wait=False)  # a plain put: held until the store can be written

    # The shard says why, naming the errno and the file, and keeps trying.
    wait_for(
        lambda: log_lines(relay, "ERROR", "shard 0", "[Errno 27]", str(store(relay))),
        what="an ERROR naming EFBIG and the store",
    )
    assert "cannot rollback" not in relay.log()[mark:]
    # Past the autosave period, carelay status names the shard and the error.
    r = wait_for(
        lambda: (lambda r: r if r.returncode == 3 else None)(relay.status()),
        what="carelay status to exit 3",
    )
    assert "shard 0" in r.stdout and "File too large" in r.stdout, r.stdout
    # A put with callback fails, and is not applied; the PVs are in alarm.
    assert not put_ok(pv_before, [9.0])
    assert read_time(pv_before) == (1.5, AlarmSeverity.MAJOR_ALARM, AlarmStatus.WRITE)
    assert read_time(pv_during) == (2.5, AlarmSeverity.MAJOR_ALARM, AlarmStatus.WRITE)
    wait_for(lambda: monitor.saw(AlarmSeverity.MAJOR_ALARM), what="the alarm on the monitor")
    # A creation and a field change are refused, with the real reason; the other shard
    # goes on as before.
    (new, egu, hihi) = connect(
        ca, name_on_shard(relay, 0, "new"), f"{before}.EGU", f"{before}.HIHI"
    )
    stamp = pv_before.read(data_type="time").metadata.timestamp
    assert not put_ok(new, [1.0])
    assert not put_ok(egu, ["V"])
    # A put to HIHI would process the PV (stamp it anew): refused, it processes nothing.
    assert not put_ok(hihi, [1.0])
    assert pv_before.read(data_type="time").metadata.timestamp == stamp
    assert log_lines(relay, "refused", f"{before}:", "autosave failed", "[Errno 27]")
    assert put_ok(pv_other, [2.0])
    assert read_time(pv_other) == (2.0, AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)

    # The store heals: everything clears by itself and the held value is flushed.
    n = len(monitor.seen)
    unlimit(pid)
    wait_for(lambda: relay.status().returncode == 0, what="carelay status to exit 0")
    wait_stored(relay, during, 2.5)
    wait_for(lambda: monitor.saw(AlarmSeverity.NO_ALARM, after=n), what="the alarm to clear")
    assert read_time(pv_before) == (1.5, AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)
    assert put_ok(new, [3.0])
    assert stored(relay, before) == 1.5
    monitor.sub.clear()

    # A crash now (no last flush anywhere) keeps both: what was stored before the fault,
    # and the plain put held through it.
    sup = relay.proc.pid
    os.kill(sup, signal.SIGSTOP)
    for child in relay.children():
        if child != sup:
            os.kill(child, signal.SIGKILL)
    os.kill(sup, signal.SIGKILL)
    relay.stop()
    relay.start()
    fresh = Context()
    try:
        pv_before, pv_during = connect(fresh, before, during)
        assert read_time(pv_before)[:2] == (1.5, AlarmSeverity.NO_ALARM)
        assert read_time(pv_during)[:2] == (2.5, AlarmSeverity.NO_ALARM)
    finally:
        fresh.disconnect()


def test_a_stop_during_the_fault_names_what_it_could_not_save_and_loses_nothing_stored(
    make_relay, ca
):
    relay = make_relay(shards=2, extra=FAST)
    kept, held = (name_on_shard(relay, 0, stem) for stem in ("kept", "held"))
    pv_kept, pv_held = connect(ca, kept, held)
    assert put_ok(pv_kept, [1.5]) and put_ok(pv_held, [1.0])
    wait_stored(relay, held, 1.0)
    wait_stored(relay, kept, 1.5)

    limit_store(relay, ca)
    pv_held.write([7.0], wait=False)  # held in memory: the store cannot take it
    wait_for(lambda: relay.status().returncode == 3, what="carelay status to exit 3")

    mark = len(relay.log())
    code = relay.stop()
    stop_log = relay.log()[mark:]
    assert code not in (0, None), f"carelay up exited {code} after a stop that lost values"
    lines = [
        line
        for line in stop_log.splitlines()
        if "ERROR" in line and "shard 0" in line and "1 value" in line
    ]
    assert lines and held in lines[0], stop_log
    assert "shard 0: flushed" not in stop_log

    # The shard's new process can write: the store holds what it held before the fault.
    relay.start()
    fresh = Context()
    try:
        pv_kept, pv_held = connect(fresh, kept, held)
        assert read_time(pv_kept)[:2] == (1.5, AlarmSeverity.NO_ALARM)
        assert read_time(pv_held)[:2] == (1.0, AlarmSeverity.NO_ALARM)
    finally:
        fresh.disconnect()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")


def _fill(directory: Path) -> Path:
    """Take every free byte of the file system of ``directory``; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_a_full_disk_is_reported_by_carelay_status_and_heals_when_space_comes_back(make_relay, ca):
    relay = make_relay(shards=1, extra=FAST, start=False)
    _mount_tmpfs(relay.data_dir, "4m")
    try:
        relay.start()
        name = name_on_shard(relay, 0, "full")
        (pv,) = connect(ca, name)
        assert put_ok(pv, [1.0])
        wait_stored(relay, name, 1.0)
        filler = _fill(relay.data_dir)
        pv.write([2.0], wait=False)
        r = wait_for(
            lambda: (lambda r: r if r.returncode == 3 else None)(relay.status()),
            what="carelay status to exit 3",
        )
        assert "shard 0" in r.stdout and "No space left on device" in r.stdout, r.stdout
        assert not put_ok(pv, [3.0])
        filler.unlink()
        wait_for(lambda: relay.status().returncode == 0, what="carelay status to exit 0")
        wait_stored(relay, name, 2.0)
        assert put_ok(pv, [4.0])
        assert relay.stop() == 0
    finally:
        relay.stop()
        subprocess.run(["umount", "-l", str(relay.data_dir)], check=False)


def test_a_small_commit_that_fits_under_the_limit_does_not_end_the_fault(make_relay, ca):
    """A file size limit that a large value cannot fit under, but a creation's small commit
    can: the fault stays on until the held value is written (no flapping to a healed store
    that acknowledges puts it cannot keep), and past the period creations are refused."""
    relay = make_relay(shards=1, extra=FAST)
    small, big = name_on_shard(relay, 0, "small"), name_on_shard(relay, 0, "big", "f60000")
    pv_small, pv_big = connect(ca, small, big)
    assert put_ok(pv_small, [1.0]) and put_ok(pv_big, [1.0])  # the big one's row: 1 element
    wait_stored(relay, big, 1.0)
    wal = Path(f"{store(relay)}-wal")
    # Room for some small commits, none for the 480 kB value.
    size = max(store(relay).stat().st_size, wal.stat().st_size) + 160_000
    assert len(relay.log()) < size // 4, "the relay log would reach the limit too"
    pid = shard_status(relay)["pid"]
    mark = len(relay.log())
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    pv_big.write(np.full(60000, 2.0), wait=False)  # a plain put: held, it cannot be written
    wait_for(lambda: relay.status().returncode == 3, what="carelay status to exit 3")

    for k in range(3):
        (new,) = connect(ca, name_on_shard(relay, 0, f"new{k}"))
        new.write([1.0], wait=False)  # a plain put: only the shard's commit can refuse it
        (line,) = wait_for(
            lambda name=new.name: (
                log_lines(relay, "shard 0", name, "refused")
                or log_lines(relay, "shard 0", "created PV", name)
            ),
            what=f"{new.name} refused or created",
        )
        assert "autosave failed" in line and "[Errno 27]" in line, line
        assert not put_ok(pv_small, [2.0]), "a put with callback was acknowledged"
        r = relay.status()
        assert r.returncode == 3 and "File too large" in r.stdout, r.stdout
        assert read_time(pv_small) == (1.0, AlarmSeverity.MAJOR_ALARM, AlarmStatus.WRITE)
    assert "can be written again" not in relay.log()[mark:]

    unlimit(pid)
    wait_for(lambda: relay.status().returncode == 0, what="carelay status to exit 0")
    wait_for(lambda: stored(relay, big) == 2.0, what="the held value in the store")
    assert put_ok(new, [3.0]) and put_ok(pv_small, [4.0])
