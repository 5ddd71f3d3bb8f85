"""The large CA buffers counted against max_bytes: PCAS's free list read where it lives,
which circuits hold one, and the bytes PCAS keeps (a high-water mark); no sockets, no
PCAS (its free list is laid out here in ctypes memory)."""

from __future__ import annotations

import ctypes

from carelay.broker.app import Broker
from carelay.broker.cabuffers import FreeList, PinnedBuffers, _AllocMem, _FreeListPvt
from carelay.common.config import CA_LARGE_BUFFER_EXTRA, CA_SMALL_BUFFER, load_config

ARRAY_BYTES = 816_384
LARGE = ARRAY_BYTES + CA_LARGE_BUFFER_EXTRA
BIG = CA_SMALL_BUFFER + 1


def test_a_buffer_is_the_array_bytes_and_room_for_a_header():
    assert PinnedBuffers(ARRAY_BYTES).buffer_size == LARGE
    assert PinnedBuffers(ARRAY_BYTES).pinned_bytes == 0


def test_a_circuit_that_sends_more_than_the_small_buffer_at_once_holds_one():
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    b.observe(0.0, {1: BIG, 2: CA_SMALL_BUFFER, 3: None, 4: 0})
    assert (b.holding, b.peak, b.pinned_bytes) == (1, 1, LARGE)


def test_small_messages_over_time_take_no_buffer():
    """A client that puts scalars for hours sends far more than 16 KiB, a little at a
    time: PCAS never takes a large buffer for it."""
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    for k in range(100):
        b.observe(float(k), {1: k * 1000})
    assert b.peak == 0
    # Within one window the bytes add up, across looks.
    b.observe(100.2, {1: 110_000})
    b.observe(100.6, {1: 120_000})
    assert b.peak == 0
    b.observe(101.0, {1: 130_000})
    assert b.peak == 1


def test_a_circuit_keeps_its_buffer_until_it_closes():
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    b.observe(0.0, {1: BIG})
    b.observe(5.0, {1: BIG})  # silent since: still holds it
    assert b.holding == 1
    b.observe(6.0, {})
    assert b.holding == 0


def test_the_count_is_the_most_held_at_once_and_never_falls():
    """PCAS keeps a closed circuit's buffer for the next one: waves of circuits reuse the
    same buffers, and the memory is never given back."""
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    b.observe(0.0, {1: BIG, 2: BIG, 3: BIG})
    b.observe(1.0, {})
    assert (b.holding, b.pinned_bytes) == (0, 3 * LARGE)
    b.observe(2.0, {4: BIG, 5: BIG})
    assert b.pinned_bytes == 3 * LARGE
    b.observe(3.0, {4: BIG, 5: BIG, 6: BIG, 7: BIG})
    assert (b.holding, b.pinned_bytes) == (4, 4 * LARGE)
    assert "4" in b.line() and str(4 * LARGE) in b.line()


def test_a_new_circuit_on_a_known_inode_starts_afresh():
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    b.observe(0.0, {1: 10})
    b.observe(1.0, {})
    b.observe(2.0, {1: BIG})
    assert b.holding == 1


def _free_list(size: int, blocks: int):
    """A FREELISTPVT of ``size`` with ``blocks`` blocks taken from malloc (kept alive)."""
    mems = [_AllocMem() for _ in range(blocks)]
    for a, b in zip(mems, mems[1:], strict=False):
        a.next = ctypes.addressof(b)
    head = ctypes.addressof(mems[0]) if mems else None
    return _FreeListPvt(size=size, nmalloc=1, mallochead=head), mems


def _made_by_pcas(free_list: FreeList, lists) -> None:
    """PCAS makes its lists (size, nmalloc, FREELISTPVT) through the hook."""
    made = iter(lists)

    def real(ppvt, size, nmalloc):
        ppvt[0] = ctypes.addressof(next(made)[2])

    free_list._real = real
    for size, nmalloc, _pvt in lists:
        slot = ctypes.c_void_p()
        free_list._init(ctypes.pointer(slot), size, nmalloc)


def test_the_free_list_of_large_buffers_is_counted_block_by_block():
    small, _ = _free_list(CA_SMALL_BUFFER, 5)
    large, keep = _free_list(LARGE, 3)
    fl = FreeList(ARRAY_BYTES)
    assert fl.buffers() is None  # not made yet
    _made_by_pcas(fl, [(CA_SMALL_BUFFER, 8, small), (LARGE, 1, large)])
    assert fl.buffers() == 3
    # A buffer more: PCAS puts its block at the head.
    more = _AllocMem(next=large.mallochead)
    large.mallochead = ctypes.addressof(more)
    assert fl.buffers() == 4
    del keep


def test_the_free_list_is_what_pcas_holds_and_alone_counted():
    large, keep = _free_list(LARGE, 1)
    fl = FreeList(ARRAY_BYTES)
    _made_by_pcas(fl, [(LARGE, 1, large)])
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    b.watch(fl)  # before any circuit: what the list holds (a UDP buffer) is not theirs
    assert b.pinned_bytes == 0
    for _ in range(5):
        large.mallochead = ctypes.addressof(more := _AllocMem(next=large.mallochead))
        keep.append(more)
    # Headers alone, or replies: no circuit sent much, and PCAS holds 5 more.
    assert b.observe(0.0, {1: 10})  # grew: a log line
    assert b.pinned_bytes == 5 * LARGE
    assert not b.observe(0.5, {1: 10})
    # Circuits that sent much (small messages, for all PCAS's list says) add nothing.
    assert not b.observe(1.0, {k: BIG for k in range(7)})
    assert b.pinned_bytes == 5 * LARGE
    del keep


class _Watched:
    """A circuit monitor as the broker holds one: only its buffers are read."""

    def __init__(self, buffers: PinnedBuffers) -> None:
        self.buffers = buffers


def test_max_bytes_counts_the_buffers_pcas_keeps(tmp_path):
    config = load_config(
        prefix="B:",
        shards=1,
        data_dir=str(tmp_path),
        max_bytes=4_000_000,
        max_elements=100_000,
        max_pvs=100,
    )
    broker = Broker(config, None)
    try:
        spec = config.pv_spec("B:late_F50000")  # charged 800 kB
        assert broker.bytes_left() == 4_000_000
        assert broker.table.over_limits(spec) is None
        buffers = PinnedBuffers(config.ca_max_array_bytes)
        broker.circuits = _Watched(buffers)
        buffers.observe(0.0, {k: BIG for k in range(4)})
        assert broker.bytes_left() == 4_000_000 - 4 * buffers.buffer_size
        why = broker.table.over_limits(spec)
        assert why is not None and "max_bytes" in why
        assert f"CA buffers hold {4 * buffers.buffer_size} bytes" in why
        # The circuits close; PCAS keeps the buffers, and so does the count.
        buffers.observe(1.0, {})
        assert broker.bytes_left() == 4_000_000 - 4 * buffers.buffer_size
    finally:
        for link in broker.links:
            link.close(linger=0)


def test_a_list_not_found_is_said_and_the_circuits_count_alone(caplog):
    b = PinnedBuffers(ARRAY_BYTES, window=1.0)
    with caplog.at_level("WARNING", logger="carelay.broker"):
        b.watch(FreeList(ARRAY_BYTES))  # PCAS made no list of that size
    assert "not found" in caplog.text
    b.observe(0.0, {1: BIG, 2: 10})
    assert b.pinned_bytes == LARGE
