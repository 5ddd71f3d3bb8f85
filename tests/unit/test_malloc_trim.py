"""A process gives freed memory back only when malloc holds enough of it free: an idle
process, with nothing to give back, makes no malloc_trim call each second."""

from __future__ import annotations

import pytest

from carelay.common import lifecycle
from carelay.common.config import MALLOC_TRIM_MIN


@pytest.mark.skipif(lifecycle._mallinfo2 is None, reason="glibc 2.33 or later only")
def test_trims_only_above_the_free_bytes_it_needs():
    free = lifecycle._mallinfo2().fordblks
    assert not lifecycle.return_freed_memory(min_free=free + 1)
    assert lifecycle.return_freed_memory(min_free=0)
    blocks = [bytearray(4096) for _ in range(2 * MALLOC_TRIM_MIN // 4096)]
    del blocks[::2]  # freed, and kept by malloc between the ones still held
    assert lifecycle._mallinfo2().fordblks >= MALLOC_TRIM_MIN
    assert lifecycle.return_freed_memory()
