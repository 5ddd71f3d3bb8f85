"""One relay per data directory: the run lock, and the token that a shard asks of a broker.

``carelay up`` holds an exclusive lock (flock) on ``data_dir/carelay.lock``, with its pid
inside, for as long as it runs; its children pass because their parent holds it.  A
broker or shard started alone (shards on other hosts, see deploy/) holds a shared lock on
the same file, so that several of them run together on one data directory but never
beside a ``carelay up``, plus a lock of its own role (the broker ``broker.lock``, a shard
its store's lock).  Whoever cannot take a lock exits with status 2 and names the pid that
holds it, before it touches anything.

The token: the supervisor makes one per run and hands it to its children in the
environment; the broker presents it in its HELLO, and a shard serves no peer that has not.
Where there are CurveZMQ keys they admit peers instead (only holders of the keys get
through), under ``carelay up`` too, so that a broker started alone on another host
joins its shards; processes started alone without keys use a token file in the data
directory, readable by its owner alone and made by the first of them to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path

from carelay.common.config import RUN_LOCK_FILE, TOKEN_FILE, Config
from carelay.common.lifecycle import PARENT_PID_ENV

#: Set by the supervisor in its children's environment: the run's token.
RUN_TOKEN_ENV = "CARELAY_RUN_TOKEN"


class DataDirInUse(Exception):
    """A lock that another process holds; the message names its pid."""


def holders(path: Path) -> list[int]:
    """The pids holding a lock on the file ``path`` (from /proc/locks; else the pid
    written in the file)."""
    pids: list[int] = []
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"; waiters have "->".
                if len(parts) >= 6 and parts[1] != "->" and parts[5] == dev:
                    pid = int(parts[4])
                    if pid > 0 and pid not in pids:
                        pids.append(pid)
    except (OSError, ValueError):
        pass
    if not pids:
        written = _written_pid(path)
        if written:
            pids.append(written)
    return sorted(pids)


def _written_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _in_use(path: Path, what: str) -> DataDirInUse:
    pids = holders(path)
    who = "pid " + ", ".join(map(str, pids)) if pids else "another process"
    return DataDirInUse(f"{what} is in use by carelay {who} ({path}); not starting")


def _lock(path: Path, mode: int, write_pid: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    if write_pid:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def lock_run(data_dir: Path) -> int:
    """The exclusive lock of ``carelay up`` on ``data_dir`` (held until the returned file
    descriptor closes); DataDirInUse if a relay, or a process started alone, runs there."""
    path = data_dir / RUN_LOCK_FILE
    try:
        return _lock(path, fcntl.LOCK_EX, write_pid=True)
    except BlockingIOError:
        raise _in_use(path, f"data directory {data_dir}") from None


def supervised(data_dir: Path) -> bool:
    """Whether this process is a child of the ``carelay up`` that holds ``data_dir``."""
    parent = os.environ.get(PARENT_PID_ENV, "")
    return (
        parent.isdigit()
        and int(parent) == os.getppid()
        and _written_pid(data_dir / RUN_LOCK_FILE) == int(parent)
    )


def join_run(data_dir: Path, role_lock: str | None = None) -> list[int]:
    """The locks of a broker or shard started alone: the shared lock on ``data_dir`` and,
    with ``role_lock``, that file's exclusive lock; DataDirInUse if either is held."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / RUN_LOCK_FILE
    try:
        fds = [_lock(path, fcntl.LOCK_SH, write_pid=False)]
    except BlockingIOError:
        raise _in_use(path, f"data directory {data_dir}") from None
    if role_lock is not None:
        role = data_dir / role_lock
        try:
            fds.append(_lock(role, fcntl.LOCK_EX, write_pid=True))
        except BlockingIOError:
            os.close(fds[0])
            raise _in_use(
                role, f"the {role_lock.split('.')[0]} of data directory {data_dir}"
            ) from None
    return fds


def run_token(config: Config) -> str | None:
    """The token this process presents (front-end) or asks for (shard); None: none.

    With keys the CurveZMQ handshake admits peers, under ``carelay up`` too: a broker
    started alone on another host (``[[ca]]``) holds the keys, never this run's token.
    Under ``carelay up`` the run's token is still presented, and a shard refuses one it
    is not of its run (see Admission): another relay on the same endpoints and keys (one
    started with another data directory, say) does not write into this one's stores."""
    token = os.environ.get(RUN_TOKEN_ENV)
    if token and supervised(config.data_dir):
        return token
    if config.keys_dir is not None:
        return None
    return _token_file(config.data_dir / TOKEN_FILE)


def _token_file(path: Path) -> str:
    """The token in ``path``, made (mode 0600) if there is none yet."""
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_hex(16).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process made the file first: then its token counts.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
