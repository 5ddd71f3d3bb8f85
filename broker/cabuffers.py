"""The large CA buffers PCAS holds, counted against ``max_bytes``.

PCAS (EPICS 3.14, under pcaspy) gives each circuit a small receive and send buffer of
CA_SMALL_BUFFER bytes.  The header of a message over it makes PCAS take a large buffer
(EPICS_CA_MAX_ARRAY_BYTES plus CA_LARGE_BUFFER_EXTRA) from a free list, and zero it,
for the receiving side; a reply over it (a read or event of a large value) does the same
for the sending side.  Many small messages, however fast, take none: PCAS moves what is
left of a read to the start of the small buffer and reads on (inBuf::fill), and flushes
a full send buffer (outBuf::allocRawMsg).  A circuit keeps its large buffers until it
closes; they then go back to the free list, which reuses them for later circuits and
never gives them back.  So the memory they pin is the most large buffers that circuits
held at once, times their size: a high-water mark that never falls while the broker runs.

The broker counts them two ways:

- ``FreeList`` reads PCAS's free list of large buffers itself.  It learns where the list
  lives when PCAS makes it (a hook on ``freeListInitPvt`` in the extension's global
  offset table, broker/got.py, as broker/sockethooks.py hooks ``recv``), and counts the
  buffers the list took from malloc: in use or free, receiving or sending, exactly what
  PCAS holds.  Where the list is found, it alone is counted.
- ``PinnedBuffers`` otherwise counts from the kernel's figure of the bytes each circuit
  sent (TCP_INFO): a circuit that sent more than CA_SMALL_BUFFER bytes within one window
  (about a second) is taken to hold a large receive buffer until it closes, and the most
  such circuits at once count.  That is a guess: it takes a client of many small
  messages (fast puts, hundreds of channels made at once) for one, and misses the send
  buffers, a header sent alone and a message sent a little at a time.  As a floor beside
  the list it made every busy circuit pin a large buffer for good: ten clients putting
  a thousand scalars a second took 80 MB of ``max_bytes`` until the broker restarted.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from collections.abc import Mapping

from carelay.broker.got import find_slots, point_slots
from carelay.common.config import (
    CA_LARGE_BUFFER_EXTRA,
    CA_SMALL_BUFFER,
    CIRCUIT_SCAN_INTERVAL,
    FD_SETSIZE,
)

log = logging.getLogger(__name__)


class PinnedBuffers:
    """The large CA buffers PCAS holds for circuits: what its free list took, where it was
    found, else the most circuits seen at once to hold a receive buffer.

    ``observe`` takes each look at the open circuits (by inode: the bytes each sent so
    far) and reads the free list; ``pinned_bytes`` is what ``max_bytes`` counts."""

    def __init__(
        self,
        array_bytes: int,
        window: float = CIRCUIT_SCAN_INTERVAL,
        small: int = CA_SMALL_BUFFER,
    ) -> None:
        #: Bytes of one large buffer, for EPICS_CA_MAX_ARRAY_BYTES ``array_bytes``.
        self.buffer_size = array_bytes + CA_LARGE_BUFFER_EXTRA
        self.window = window
        self.small = small
        #: inode: (start of its current window, bytes it had sent then).
        self._marks: dict[int, tuple[float, int]] = {}
        #: inodes of the open circuits taken to hold a large buffer.
        self._holding: set[int] = set()
        #: Most circuits that held one at once: the buffers PCAS keeps, at least.
        self.peak = 0
        #: PCAS's own list of large buffers, where it could be found.
        self.free_list: FreeList | None = None
        #: Large buffers the list held before any circuit (PCAS's UDP search buffer), and
        #: at the last look.
        self._base = self._held = 0
        #: Whether the list was read at the last look (then it alone is counted).
        self._listed = False
        self._reported = 0

    def watch(self, free_list: FreeList | None) -> None:
        """Count PCAS's ``free_list`` too, less the buffers it holds now: called once the
        server is made, before it accepts any circuit."""
        self.free_list = free_list
        held = free_list.buffers() if free_list is not None else None
        if free_list is not None and held is None:
            log.warning(
                "PCAS's list of large CA buffers not found: they are counted from the "
                "circuits' bytes only"
            )
        self._base = self._held = held or 0
        self._listed = held is not None

    @property
    def holding(self) -> int:
        """Open circuits taken to hold a large receive buffer now."""
        return len(self._holding)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of large buffers PCAS holds for circuits, in use or kept for later ones,
        as of the last look: what its list holds, where found; else the most circuits
        held at once, as guessed from their bytes."""
        if self._listed:
            return max(0, self._held - self._base) * self.buffer_size
        return self.peak * self.buffer_size

    def observe(self, now: float, received: Mapping[int, int | None]) -> bool:
        """Take one look at the open circuits: ``received`` maps each circuit's inode to
        the bytes it sent so far (None where the kernel does not say).  Returns whether
        ``pinned_bytes`` grew since the last look that said so."""
        marks: dict[int, tuple[float, int]] = {}
        for inode, sent in received.items():
            if sent is None:
                continue
            since, base = self._marks.get(inode, (now, 0))
            if sent - base > self.small:
                self._holding.add(inode)
            marks[inode] = (now, sent) if now - since >= self.window else (since, base)
        self._marks = marks
        self._holding &= marks.keys()
        self.peak = max(self.peak, len(self._holding))
        if self.free_list is not None:
            held = self.free_list.buffers()
            self._listed = held is not None
            self._held = held or self._base
        pinned = self.pinned_bytes
        grew, self._reported = pinned > self._reported, max(pinned, self._reported)
        return grew

    def line(self) -> str:
        """The log line for a new high-water mark."""
        return (
            f"large CA buffers: {self.pinned_bytes // self.buffer_size} held by PCAS "
            f"({self.pinned_bytes} bytes, counted against max_bytes)"
        )


class _FreeListPvt(ctypes.Structure):
    """FREELISTPVT of EPICS libCom's freeListLib.c (3.14 on)."""

    _fields_ = [
        ("size", ctypes.c_int),
        ("nmalloc", ctypes.c_int),
        ("head", ctypes.c_void_p),
        ("mallochead", ctypes.c_void_p),
        ("nBlocksAvailable", ctypes.c_size_t),
        ("lock", ctypes.c_void_p),
    ]


class _AllocMem(ctypes.Structure):
    """One block the free list took from malloc."""

    _fields_ = [("next", ctypes.c_void_p), ("memory", ctypes.c_void_p)]


_INIT = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int)
#: Most blocks a list is walked for: PCAS has at most two large buffers per circuit.
_MOST_BLOCKS = 4 * FD_SETSIZE


class FreeList:
    """PCAS's free list of large buffers of ``array_bytes`` (EPICS_CA_MAX_ARRAY_BYTES),
    found when PCAS makes it.  Read on the thread that runs PCAS, between its slices."""

    def __init__(self, array_bytes: int) -> None:
        size = array_bytes + CA_LARGE_BUFFER_EXTRA
        #: The sizes freeListInitPvt may make of it (aligned up to 8 bytes, or not).
        self._sizes = {size, (size + 7) & ~7}
        self._pvt: int | None = None
        self._real = None
        self._hook = None

    def install(self, module_path: str) -> None:
        """Point the ``freeListInitPvt`` slot of the loaded extension ``module_path`` at a
        hook that notes the list of large buffers; before PCAS's server is made."""
        slots = find_slots(module_path, {"freeListInitPvt"})
        self._real = _INIT(("freeListInitPvt", ctypes.CDLL(module_path)))
        self._hook = _INIT(self._init)
        point_slots(module_path, slots, {"freeListInitPvt": self._hook})

    def _init(self, ppvt, size: int, nmalloc: int) -> None:
        self._real(ppvt, size, nmalloc)
        try:
            if size in self._sizes and nmalloc == 1 and ppvt[0]:
                pvt = _FreeListPvt.from_address(ppvt[0])
                if pvt.size in self._sizes and pvt.nmalloc == 1:
                    self._pvt = ppvt[0]
        except Exception:  # never into PCAS
            log.exception("cannot note PCAS's list of large CA buffers")

    def buffers(self) -> int | None:
        """The large buffers PCAS took from malloc and holds (in use or free); None while
        the list is not known."""
        if self._pvt is None:
            return None
        n = 0
        block = _FreeListPvt.from_address(self._pvt).mallochead
        while block and n < _MOST_BLOCKS:
            n += 1
            block = _AllocMem.from_address(block).next
        return n


def watch_free_list(array_bytes: int) -> FreeList | None:
    """PCAS's list of large buffers, to be found when the server is made (call before);
    None, and a warning, where pcaspy's extension cannot be hooked."""
    from pcaspy import _cas

    free_list = FreeList(array_bytes)
    try:
        free_list.install(_cas.__file__)
    except (OSError, RuntimeError, ValueError, IndexError, struct.error) as e:
        log.warning("large CA buffers are counted from the circuits' bytes only: %s", e)
        return None
    return free_list
