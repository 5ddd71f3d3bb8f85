"""What a store that cannot be read or written says: the file, the problem, the errno."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

#: Bytes the write that finds the errno of a failed store write makes (one page).
_PROBE_BYTES = 4096


class StoreDamaged(Exception):
    """The database file cannot be trusted; the message names the file and the problem."""


class StoreTooNew(StoreDamaged):
    """The store is of a newer schema than this carelay reads: sound, as far as anyone
    can tell here, and not to be replaced by its good copy.  It cannot be served."""


class StoreWriteError(OSError):
    """A write to the store failed: ``errno`` (None when the system gave none that could
    be found), ``filename`` the file written, ``detail`` what SQLite said."""

    def __init__(self, errno: int | None, filename: Path, detail: str) -> None:
        super().__init__(errno, os.strerror(errno) if errno else "error unknown", str(filename))
        self.detail = detail

    def __str__(self) -> str:
        cause = f"[Errno {self.errno}] {self.strerror}" if self.errno else "errno unknown"
        return f"cannot write {self.filename}: {cause} (SQLite: {self.detail})"


def write_error(path: Path, e: sqlite3.DatabaseError) -> StoreWriteError:
    """``e``, raised by a write to the store at ``path``, with the errno and the file.
    SQLite keeps the errno to itself (``disk I/O error`` for EFBIG, ``database or disk is
    full`` for ENOSPC), so the write it was making is made again in a scratch file beside
    the store: a page past the end of the larger of the database and its write-ahead log,
    where SQLite writes next.  What the system answers there is the errno."""
    wal = Path(f"{path}-wal")
    target = wal if wal.exists() else path
    offset = 0
    for p in (path, wal):
        with contextlib.suppress(OSError):
            offset = max(offset, p.stat().st_size)
    probe = path.with_name(path.name + ".probe")
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
