"""The large CA buffers PCAS holds, counted against ``max_bytes``.

PCAS (EPICS 3.14, under pcaspy) gives each circuit a small receive and send buffer of
CA_SMALL_BUFFER bytes.  The header of a message over it makes PCAS take a large buffer
(EPICS_CA_MAX_ARRAY_BYTES plus CA_LARGE_BUFFER_EXTRA) from a free list, and zero it,
for the receiving side; a reply over it (a read or event of a large value) does the same
for the sending side.  A circuit keeps its large buffers until it closes; they then go
back to the free list, which reuses them for later circuits and never gives them back.
So the memory they pin is the most large buffers that circuits held at once, times
their size: a high-water mark that never falls while the broker runs.

The broker sees the receiving side only through the kernel's count of the bytes each
circuit sent (TCP_INFO): a circuit that sent more than CA_SMALL_BUFFER bytes within one
window (about a second) is taken to hold a large receive buffer from then on.  That
misses a client that sends only the header of a large message, or trickles one; those,
and the send buffers, stay bounded by ``max_clients`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from carelay.common.config import CA_LARGE_BUFFER_EXTRA, CA_SMALL_BUFFER, CIRCUIT_SCAN_INTERVAL


class PinnedBuffers:
    """Which circuits hold a large CA receive buffer, and the bytes PCAS keeps for them.

    ``observe`` takes each look at the open circuits (by inode: the bytes each sent so
    far); ``pinned_bytes`` is what ``max_bytes`` counts for them."""

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
        #: Most circuits that held one at once: the buffers PCAS keeps.
        self.peak = 0

    @property
    def holding(self) -> int:
        """Open circuits taken to hold a large receive buffer now."""
        return len(self._holding)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of large buffers PCAS holds, in use or kept for later circuits."""
        return self.peak * self.buffer_size

    def observe(self, now: float, received: Mapping[int, int | None]) -> None:
        """Take one look at the open circuits: ``received`` maps each circuit's inode to
        the bytes it sent so far (None where the kernel does not say)."""
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

    def line(self) -> str:
        """The log line for a new high-water mark."""
        return (
            f"large CA receive buffers held at once: {self.peak}; PCAS keeps their "
            f"{self.pinned_bytes} bytes, counted against max_bytes"
        )
