"""The broker's CA circuits: found in /proc, judged by TCP_INFO, bounded and reaped.

PCAS, the CA server under pcaspy, gives Python no hook on its circuits.  The broker
sees them all the same: every TCP socket of this process whose local port is a CA port
and that has a peer is a circuit (PCAS's own descriptor, never closed here).  The
kernel's TCP_INFO says, for each, how many bytes the client sent and how long ago it
last sent data or acknowledged ours.  ``shutdown`` on the descriptor ends a circuit:
PCAS sees the end on its next select() and cleans the circuit up itself.

Which circuits go (``choose_closures``, a pure function):

- idle: the client neither sent nor acknowledged anything for ``client_idle_timeout``.
  Acknowledgements count: a libca client that receives monitors sends no echo, its
  kernel acknowledges every event.
- stalled: it stopped in the middle of a message and fell silent for
  CLIENT_STALL_TIMEOUT: PCAS holds its buffer, perhaps a large one, for a message it
  never finishes.  Where its stream is not followed (broker/sockethooks.py), a circuit
  that sent more than a small CA message in all is taken to be in one.  Not every
  circuit that sent much: a caproto client, which sends nothing while it has nothing
  to do, made hundreds of channels and then waited for their changes.
- over ``max_clients``: first circuits that sent not one byte CLIENT_SILENT_GRACE
  after connecting (a CA client speaks at once: they are no clients yet), then the
  newest (refused).

A circuit that asks for more than ``max_channels`` channels is closed where its streams
are followed (broker/sockethooks.py); its closure is logged here with the others.

PCAS never selects descriptors from FD_SETSIZE on, so the broker keeps its soft
RLIMIT_NOFILE at FD_SETSIZE (common/lifecycle.py's ``fit_fd_limit``, lowered where it is
higher, raised where it is lower): a circuit PCAS accepts is one it can
serve and clean up.  A new circuit is judged right after the cas.process() slice that
accepted it, before PCAS reads from it (``CircuitMonitor.poll``): a circuit over the
limit never gets to make PCAS take a large buffer for it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from carelay.broker.cabuffers import PinnedBuffers
from carelay.common.config import (
    BROKER_FD_HEADROOM,
    CA_SMALL_BUFFER,
    CIRCUIT_LOG_INTERVAL,
    CIRCUIT_SCAN_INTERVAL,
    CLIENT_SILENT_GRACE,
    CLIENT_STALL_TIMEOUT,
)

log = logging.getLogger(__name__)

#: socket.TCP_INFO where the platform names it (Linux: 11).
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: Bytes of struct tcp_info asked for: enough for tcpi_bytes_received (Linux 4.1).
_TCP_INFO_LEN = 160
#: Offsets in struct tcp_info (linux/tcp.h).
_LAST_DATA_RECV = 52
_LAST_ACK_RECV = 56
_BYTES_RECEIVED = 128
#: tcpi_state of a circuit whose client has gone or is going (FIN sent or received).
_TCP_ESTABLISHED = 1
_TCP_CLOSE_WAIT = 8


@dataclass(frozen=True)
class Circuit:
    """One CA circuit as the kernel sees it."""

    fd: int
    inode: int
    peer: str
    #: Bytes the client sent (None where the kernel does not say).
    bytes_received: int | None
    #: Seconds since the client last sent data or acknowledged ours.
    silent_for: float
    #: Seconds since the broker first saw the circuit.
    age: float
    #: Whether the client stopped in the middle of a message (None: not followed).
    mid_message: bool | None = None

    @property
    def spoke(self) -> bool:
        return self.bytes_received is None or self.bytes_received > 0


@dataclass(frozen=True)
class Limits:
    """What the broker allows its circuits."""

    max_clients: int
    idle_timeout: float
    stall_timeout: float = CLIENT_STALL_TIMEOUT
    silent_grace: float = CLIENT_SILENT_GRACE


def choose_closures(circuits: Iterable[Circuit], limits: Limits) -> list[tuple[Circuit, str]]:
    """The circuits to close, each with why: "idle", "stalled", "silent" or "refused"."""
    out: list[tuple[Circuit, str]] = []
    keep: list[Circuit] = []
    stall = min(limits.stall_timeout, limits.idle_timeout)
    for c in circuits:
        stuck = c.mid_message
        if stuck is None:
            stuck = (c.bytes_received or 0) > CA_SMALL_BUFFER
        if stuck and c.silent_for >= stall:
            out.append((c, "stalled"))
        elif c.silent_for >= limits.idle_timeout:
            out.append((c, "idle"))
        else:
            keep.append(c)
    excess = len(keep) - limits.max_clients
    if excess <= 0:
        return out
    mute = [c for c in keep if not c.spoke and c.age >= limits.silent_grace]
    mute.sort(key=lambda c: -c.age)
    gone = {id(c) for c in mute[:excess]}
    out += [(c, "silent") for c in mute[:excess]]
    excess -= len(gone)
    if excess > 0:
        rest = sorted((c for c in keep if id(c) not in gone), key=lambda c: c.age)
        out += [(c, "refused") for c in rest[:excess]]
    return out


def open_fds() -> int:
    """How many descriptors this process holds."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def client_limit(
    configured: int | None, fd_limit: int, own_fds: int, memory_room: int | None = None
) -> int:
    """The circuits the broker may hold: ``configured``, or (None) as many as fit in
    ``memory_room``; never more than ``fd_limit`` leaves beside the ``own_fds`` it holds
    and BROKER_FD_HEADROOM."""
    room = max(1, fd_limit - own_fds - BROKER_FD_HEADROOM)
    wanted = configured if configured is not None else memory_room
    return room if wanted is None else min(wanted, room)


class _Tally:
    """One log line per CIRCUIT_LOG_INTERVAL for one kind of event (a closure, CA buffers
    taken); the rest counted.  Not a LogBudget: the interval runs from the last line, the
    count rides on the next line (or a summary with the last event), at the tally's level."""

    def __init__(self, interval: float = CIRCUIT_LOG_INTERVAL, level: int = logging.WARNING):
        self.interval = interval
        self.level = level
        self.next_line = 0.0
        self.unlogged = 0
        self.last = ""

    def event(self, now: float, line: str) -> None:
        if now >= self.next_line:
            more = f" (and {self.unlogged} more since the last line)" if self.unlogged else ""
            log.log(self.level, "%s%s", line, more)
            self.unlogged = 0
            self.next_line = now + self.interval
        else:
            self.unlogged += 1
            self.last = line

    def flush(self, now: float) -> None:
        if self.unlogged and now >= self.next_line:
            log.log(self.level, "%d more like: %s", self.unlogged, self.last)
            self.unlogged = 0
            self.next_line = now + self.interval


def is_ca_circuit(fd: int, ports: Collection[int]) -> bool:
    """Whether descriptor ``fd`` of this process is a TCP connection on one of the CA
    ``ports`` (the listening socket has no peer; anything else is not a socket)."""
    s = None
    try:
        s = socket.socket(fileno=fd)
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if s.getsockname()[1] not in ports:
            return False
        s.getpeername()
        return True
    except OSError:
        return False
    finally:
        if s is not None:
            s.detach()  # PCAS's descriptor: never closed here


def _peer_text(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


class CircuitMonitor:
    """Watches the broker's CA circuits and closes what ``choose_closures`` picks.

    ``poll`` is called after every cas.process() slice; it costs one dup() and close()
    unless a descriptor came or went (then it scans at once) or CIRCUIT_SCAN_INTERVAL
    passed (then it scans for the timers)."""

    def __init__(
        self,
        ports: Iterable[int],
        limits: Limits,
        fd_limit: int,
        clock: Callable[[], float] = time.monotonic,
        array_bytes: int = 0,
        mid_message: Callable[[int], bool | None] = lambda fd: None,
    ) -> None:
        self.ports = frozenset(ports)
        #: Whether a circuit's client stopped inside a message (sockethooks.mid_message).
        self.mid_message = mid_message
        self.limits = limits
        self.fd_limit = fd_limit
        self.clock = clock
        #: A descriptor to dup(): the number dup() returns is the lowest free one, which
        #: every accept() takes; when it moves, circuits came or went.
        self._probe = os.open(os.devnull, os.O_RDONLY)
        self._lowest = -2
        self._next_scan = 0.0
        #: (fd, inode) of each socket seen: whether it is a CA circuit.
        self._kinds: dict[tuple[int, int], bool] = {}
        #: inode of each circuit seen: when it was first seen.
        self._first_seen: dict[int, float] = {}
        #: inodes of circuits shut down here, until PCAS has closed them.
        self._closed: set[int] = set()
        #: fd: inode of circuits shut down here.  PCAS may close one and accept a new
        #: circuit on the same descriptor within one slice, which the lowest free
        #: descriptor does not show.
        self._shut_fds: dict[int, int] = {}
        #: Circuits and open descriptors at the last scan (the health figures read them).
        self.circuits = 0
        self.descriptors = 0
        #: Bytes the CA circuits have received, summed at the last scan.
        self.received = 0
        self._tallies = {k: _Tally() for k in ("idle", "stalled", "silent", "refused", "channels")}
        self._tallies["buffers"] = _Tally(level=logging.INFO)  # accounting, not a fault
        #: The large CA buffers PCAS holds for the circuits (EPICS_CA_MAX_ARRAY_BYTES).
        self.buffers = PinnedBuffers(array_bytes)

    def close(self) -> None:
        os.close(self._probe)

    def _lowest_free(self) -> int:
        try:
            fd = os.dup(self._probe)
        except OSError:
            return -1  # no descriptor free: PCAS cannot accept until circuits go
        os.close(fd)
        return fd

    def _reused(self) -> bool:
        """Whether a descriptor of a circuit shut down here now holds another socket."""
        for fd, inode in self._shut_fds.items():
            try:
                if os.fstat(fd).st_ino == inode:
                    continue
            except OSError:
                pass
            return True
        return False

    def poll(self) -> None:
        lowest = self._lowest_free()
        now = self.clock()
        if lowest != self._lowest or now >= self._next_scan or self._reused():
            self._lowest = lowest
            self.scan(now)

    def scan(self, now: float) -> None:
        self._next_scan = now + CIRCUIT_SCAN_INTERVAL
        circuits = list(self._circuits(now))
        self.circuits = len(circuits)
        closures = choose_closures(circuits, self.limits)
        # A refused circuit is closed before PCAS reads from it: it takes no buffer.
        refused = {c.inode for c, why in closures if why == "refused"}
        seen = {c.inode: c.bytes_received for c in circuits if c.inode not in refused}
        self.received = sum(seen.values())
        if self.buffers.observe(now, seen):
            self._tallies["buffers"].event(now, self.buffers.line())
        for c, why in closures:
            if self._shut(c):
                self.circuits -= 1
                self._tallies[why].event(now, self._line(c, why))
        for tally in self._tallies.values():
            tally.flush(now)
        self._lowest = self._lowest_free()

    def too_many_channels(self, address: str, limit: int) -> None:
        """A circuit from ``address`` was closed for asking for more than ``limit``
        channels."""
        self._tallies["channels"].event(
            self.clock(),
            f"closed CA circuit from {address or 'an unknown address'}: asked for more "
            f"than {limit} channels (max_channels)",
        )

    def _line(self, c: Circuit, why: str) -> str:
        lim = self.limits
        if why == "refused":
            return f"refused CA circuit from {c.peer}: max_clients ({lim.max_clients}) reached"
        if why == "silent":
            return (
                f"closed CA circuit from {c.peer}: sent nothing in {c.age:.0f} s and circuits "
                f"are over max_clients ({lim.max_clients})"
            )
        if why == "idle":
            return (
                f"closed CA circuit from {c.peer}: nothing sent or acknowledged for "
                f"{c.silent_for:.0f} s (client_idle_timeout {lim.idle_timeout:g} s)"
            )
        return (
            f"closed CA circuit from {c.peer}: silent for {c.silent_for:.0f} s after sending "
            f"{c.bytes_received} bytes, perhaps in the middle of a message"
        )

    def _fds(self) -> Iterable[int]:
        try:
            return [int(name) for name in os.listdir("/proc/self/fd")]
        except OSError:
            # No descriptor left to read the directory with: try each number.
            return range(self.fd_limit)

    def _circuits(self, now: float) -> Iterable[Circuit]:
        kinds: dict[tuple[int, int], bool] = {}
        seen: dict[int, float] = {}
        closed: set[int] = set()
        fds = self._fds()
        self.descriptors = len(fds)
        for fd in fds:
            if fd == self._probe:
                continue
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if not stat.S_ISSOCK(st.st_mode):
                continue
            key = (fd, st.st_ino)
            kind = self._kinds.get(key)
            if kind is None:
                kind = is_ca_circuit(fd, self.ports)
            kinds[key] = kind
            if not kind:
                continue
            if st.st_ino in self._closed:
                closed.add(st.st_ino)
                continue
            first = seen[st.st_ino] = self._first_seen.get(st.st_ino, now)
            c = self._inspect(fd, st.st_ino, now - first)
            if c is not None:
                yield c
        self._kinds = kinds
        self._first_seen = seen
        self._closed = closed
        self._shut_fds = {fd: inode for fd, inode in self._shut_fds.items() if inode in closed}

    def _inspect(self, fd: int, inode: int, age: float) -> Circuit | None:
        s = None
        try:
            s = socket.socket(fileno=fd)
            info = s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
            peer = _peer_text(s.getpeername())
        except OSError:
            return None
        finally:
            if s is not None:
                s.detach()
        if len(info) <= _LAST_ACK_RECV + 4 or info[0] not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
            return None
        data_ms, ack_ms = struct.unpack_from("=II", info, _LAST_DATA_RECV)
        received = None
        if len(info) >= _BYTES_RECEIVED + 8:
            (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED)
        silent = min(data_ms, ack_ms) / 1000.0
        return Circuit(fd, inode, peer, received, silent, age, self.mid_message(fd))

    def _shut(self, c: Circuit) -> bool:
        """End circuit ``c``: PCAS sees the end on its next select() and closes it."""
        s = None
        try:
            s = socket.socket(fileno=c.fd)
            if os.fstat(c.fd).st_ino != c.inode:
                return False
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        finally:
            if s is not None:
                s.detach()
        self._closed.add(c.inode)
        self._shut_fds[c.fd] = c.inode
        return True
