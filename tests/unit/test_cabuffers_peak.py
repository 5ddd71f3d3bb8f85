"""Circuits of many small messages take no large CA buffer from PCAS (it reuses its small
one: inBuf::fill, outBuf::allocRawMsg), so beside PCAS's own free list, where it is found,
they must pin nothing of max_bytes.  No sockets, no PCAS (its free list is laid out here
in ctypes memory)."""

from __future__ import annotations

import ctypes

from carelay.broker.cabuffers import FreeList, PinnedBuffers, _AllocMem, _FreeListPvt
from carelay.common.config import CA_LARGE_BUFFER_EXTRA

ARRAY_BYTES = 8_016_384
LARGE = ARRAY_BYTES + CA_LARGE_BUFFER_EXTRA
#: A client putting 1,000 scalars a second (24 bytes each): more than 16 KiB a second.
PUTS_PER_SECOND = 1_000 * 24
BUSY = range(1, 11)


def _found_list(blocks: int):
    """A FreeList that found PCAS's list of large buffers, holding ``blocks`` (kept
    alive with the returned memory)."""
    mems = [_AllocMem() for _ in range(blocks)]
    for a, b in zip(mems, mems[1:], strict=False):
        a.next = ctypes.addressof(b)
    pvt = _FreeListPvt(size=LARGE, nmalloc=1, mallochead=ctypes.addressof(mems[0]))
    fl = FreeList(ARRAY_BYTES)
    fl._pvt = ctypes.addressof(pvt)
    return fl, (pvt, mems)


def _take_block(pvt, keep) -> None:
    """PCAS takes one more large buffer from malloc."""
    more = _AllocMem(next=pvt.mallochead)
    pvt.mallochead = ctypes.addressof(more)
    keep.append(more)


def test_busy_circuits_of_small_messages_pin_nothing_beside_the_free_list():
    """The audit's case: 10 circuits each sending 24,000 bytes a second for 5 s, while
    PCAS's list holds only its UDP buffer: nothing is pinned, during or after."""
    fl, keep = _found_list(1)
    b = PinnedBuffers(ARRAY_BYTES)
    b.watch(fl)
    for t in range(5):
        b.observe(float(t), {k: t * PUTS_PER_SECOND for k in BUSY})
    assert b.pinned_bytes == 0
    b.observe(5.0, {})  # all closed
    assert b.pinned_bytes == 0
    del keep


def test_with_the_list_found_its_high_water_mark_is_counted():
    """Buffers PCAS took stay counted after their circuits close (it keeps them)."""
    fl, (pvt, mems) = _found_list(1)
    b = PinnedBuffers(ARRAY_BYTES)
    b.watch(fl)
    _take_block(pvt, mems)
    _take_block(pvt, mems)
    assert b.observe(0.0, {1: 10, 2: 10})  # two headers of large puts
    assert b.pinned_bytes == 2 * LARGE
    assert not b.observe(1.0, {})
    assert b.pinned_bytes == 2 * LARGE
