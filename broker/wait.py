"""One wait for CA and the shards: the select() that PCAS makes also watches the shards.

``cas.process`` sleeps in EPICS fdManager's select(), which sees the CA sockets only.
pcaspy's extension calls ``select`` through its global offset table (broker/got.py):
pointing that slot here adds the shard links' ZeroMQ descriptors and a wake-up pipe
(signals write to it) to the read set, so that a message from a shard, or a signal,
ends the CA wait at once and the loop can sleep until something is due.

ZeroMQ's descriptor is edge-triggered: readable means "read ZMQ_EVENTS", not "a message
waits", and a message may be queued already: any operation on a socket (a send too) may
take the signal of a message that came.  So the events of the sockets the loop sends on
are read before each sleep (one with a message: no sleep); the others (monitors, parked
sockets) are only ever read to the end, which re-arms their descriptors.  A wake that
came from a socket without a message sleeps on.  A select that cannot sleep (a zero
timeout) goes through untouched.  What the hook adds to the sets it takes out again, with its
count, before PCAS sees them.  A descriptor at or above FD_SETSIZE cannot go in an
fd_set: then the shards go unwatched (``watching`` is False) and the loop polls them.

The hook runs Python inside ``cas.process``, under the GIL: it does little, and nothing
it raises reaches C (it falls back to the plain select, and stops watching).  While CA
traffic keeps the loop from sleeping anyway, the loop disarms it (``arm``): the slot
points at the C library's select again, and PCAS's calls cost what they did.
"""

from __future__ import annotations

import ctypes
import logging

import zmq

from carelay.broker.got import find_slots, load_base, point_slots
from carelay.common.config import FD_SETSIZE
from carelay.common.lifecycle import drain_wakeup_fd, signal_wakeup_fd

__all__ = ["FdSet", "SelectHook", "fd_clear", "fd_isset", "fd_set", "sleep_for", "timeval"]

log = logging.getLogger(__name__)

_POLLIN = int(zmq.POLLIN)
_WORD_BITS = 64
#: An fd_set as glibc lays it out on x86-64: FD_SETSIZE bits in 64-bit words.
FdSet = ctypes.c_uint64 * (FD_SETSIZE // _WORD_BITS)
_FD_SET_BYTES = ctypes.sizeof(FdSet)


class Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


_SELECT_ARGS = (
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
)
_SELECT = ctypes.CFUNCTYPE(*_SELECT_ARGS)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.__errno_location.restype = ctypes.POINTER(ctypes.c_int)
_real_select = ctypes.CFUNCTYPE(*_SELECT_ARGS, use_errno=True)(("select", _libc))
_EINTR = 4


def fd_set(words, fd: int) -> None:
    """FD_SET on ``words`` (an FdSet, or one at an address)."""
    words[fd // _WORD_BITS] |= 1 << (fd % _WORD_BITS)


def fd_clear(words, fd: int) -> None:
    words[fd // _WORD_BITS] &= ~(1 << (fd % _WORD_BITS))


def fd_isset(words, fd: int) -> bool:
    return bool(words[fd // _WORD_BITS] >> (fd % _WORD_BITS) & 1)


def timeval(seconds: float) -> tuple[int, int]:
    """``seconds`` (not below 0) as select()'s (tv_sec, tv_usec)."""
    usec = max(0, round(seconds * 1_000_000))
    return usec // 1_000_000, usec % 1_000_000


def sleep_for(now: float, due: float, longest: float) -> float:
    """How long to wait in select() at ``now`` for what is ``due`` next: not below 0,
    not above ``longest``."""
    return min(max(due - now, 0.0), longest)


def _timeval_words(address: int):
    """The two words of the timeval at ``address``."""
    return (ctypes.c_long * 2).from_address(address)


def _set_errno(value: int) -> None:
    _libc.__errno_location().contents.value = value


class SelectHook:
    """The select() of pcaspy's extension, watching ZeroMQ sockets and a wake-up pipe too.

    The loop names the sockets (``watch``) and, after each ``cas.process``, reads
    ``woken`` (a watched socket has a message) and clears it."""

    def __init__(self, wake_fd: int = -1) -> None:
        #: The sockets whose events are read before each sleep (``watch``), and all.
        self.sockets: tuple = ()
        self._all: tuple = ()
        self._by_fd: dict[int, zmq.Socket] = {}
        #: The descriptors added to PCAS's read set: the sockets', then the wake-up pipe's.
        self._ours: tuple[int, ...] = ()
        self._max_fd = -1
        #: The hook is in place and every socket named is watched.
        self.watching = False
        self._installed = False
        #: A watched socket had a message, or a signal came, since the loop last looked.
        self.woken = False
        #: The read end of the signal pipe, or -1.
        self._wake_r = wake_fd
        self._saved = FdSet()
        self._callback = _SELECT(self._select)
        #: The extension's GOT slot of ``select`` (None until installed), what it points
        #: at armed and disarmed, and which it is now.
        self._slot: ctypes.c_void_p | None = None
        self._armed_at = self._plain_at = 0
        self._armed = False

    # -- set-up ---------------------------------------------------------------------------

    def install(self, module_path: str) -> None:
        """Point the ``select`` slot of the loaded extension ``module_path`` here, and make
        signals write to the wake-up pipe (``signal.set_wakeup_fd``)."""
        slots = find_slots(module_path, {"select"})
        r = signal_wakeup_fd()
        if r >= FD_SETSIZE:
            raise RuntimeError(f"descriptor {r} does not fit in an fd_set")
        self._wake_r = r
        point_slots(module_path, slots, {"select": self._callback})
        self._slot = ctypes.c_void_p.from_address(load_base(module_path) + slots["select"])
        self._armed_at = self._slot.value
        self._plain_at = ctypes.cast(_real_select, ctypes.c_void_p).value
        self._armed = self._installed = True
        self.watch(self.sockets)

    def arm(self, on: bool) -> None:
        """Point PCAS's select at the hook (``on``) or at the C library's own."""
        if on is not self._armed and self._slot is not None:
            self._slot.value = self._armed_at if on and self._installed else self._plain_at
            self._armed = on

    def watch(self, sockets: tuple, others: tuple = ()) -> bool:
        """Watch ``sockets`` (those the loop also sends on) and ``others`` (read only, to
        the end) from the next select on; False (and the shards unwatched) if a
        descriptor does not fit in an fd_set."""
        if (
            sockets == self.sockets
            and others == self._all[len(sockets) :]
            and self.watching == self._installed
            and self._ours
        ):
            return self.watching
        self.sockets = sockets
        self._all = sockets + others
        fds = tuple(s.getsockopt(zmq.FD) for s in self._all)
        self._by_fd = dict(zip(fds, self._all, strict=True))
        if any(fd >= FD_SETSIZE for fd in fds):
            if self.watching:
                log.warning(
                    "a shard socket's descriptor is above %d: polling the shards", FD_SETSIZE
                )
            self._ours, self.watching = (), False
            return False
        self._ours = fds + ((self._wake_r,) if self._wake_r >= 0 else ())
        self._max_fd = max(self._ours, default=-1)
        self.watching = self._installed and bool(self._ours)
        return self.watching

    # -- the hook -------------------------------------------------------------------------

    def has_message(self, sockets=None) -> bool:
        """Whether one of ``sockets`` (by default those the loop sends on) has a message
        waiting; reading ZMQ_EVENTS also re-arms its descriptor."""
        # A socket closed inside a CA callback is let be until the loop names the rest.
        return any(
            not s.closed and s.get(zmq.EVENTS) & _POLLIN
            for s in (self.sockets if sockets is None else sockets)
        )

    def _select(self, nfds, rset, wset, eset, tv):
        try:
            n = self._wait(nfds, rset, wset, eset, tv)
        except BaseException:
            # Never into C: this select is given up for the plain one from now on.
            self.watching = False
            self._installed = False
            try:
                self.arm(False)
                if rset:
                    ctypes.memmove(rset, self._saved, _FD_SET_BYTES)
                log.exception("waiting on the shard sockets failed; polling them instead")
            except BaseException:
                pass
            n = _real_select(nfds, rset, wset, eset, tv)
        _set_errno(ctypes.get_errno())
        return n

    def _wait(self, nfds, rset, wset, eset, tv) -> int:
        if not self.watching or not rset or (tv and not any(_timeval_words(tv))):
            return _real_select(nfds, rset, wset, eset, tv)
        # PCAS's read set as it came: put back on a failure, and for each sleep again.
        ctypes.memmove(self._saved, rset, _FD_SET_BYTES)
        if self.woken or self.has_message():
            # A message waits: CA's ready sockets are taken, without sleeping.
            self.woken = True
            if tv:
                Timeval.from_address(tv).tv_sec = Timeval.from_address(tv).tv_usec = 0
            return _real_select(nfds, rset, wset, eset, tv)
        words = FdSet.from_address(rset)
        ours = self._ours
        wide = max(nfds, self._max_fd + 1)
        while True:
            for fd in ours:
                fd_set(words, fd)
            n = _real_select(wide, rset, wset, eset, tv)
            if n <= 0:
                if n < 0:
                    # Which bits a failed select leaves is not defined: PCAS's own again.
                    ctypes.memmove(rset, self._saved, _FD_SET_BYTES)
                return n
            ready = [fd for fd in ours if fd_isset(words, fd)]
            if not ready:
                return n
            for fd in ready:
                fd_clear(words, fd)
            n -= len(ready)
            if ready[-1] == self._wake_r and drain_wakeup_fd(self._wake_r):
                self.woken = True
            by_fd = self._by_fd
            if self.has_message([by_fd[fd] for fd in ready if fd in by_fd]):
                self.woken = True
            if n or self.woken:
                return n
            # ZeroMQ's descriptor only said "look": sleep on for the rest (select has
            # counted the time down in ``tv``), CA's sockets watched again.
            ctypes.memmove(rset, self._saved, _FD_SET_BYTES)


def install(module_path: str) -> SelectHook | None:
    """The select hook, installed in the extension ``module_path``; None, and a warning,
    where it cannot be (the loop then polls the shards between CA slices)."""
    hook = SelectHook()
    try:
        hook.install(module_path)
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("CA's select cannot watch the shard sockets (%s); polling them", e)
        return None
    return hook
