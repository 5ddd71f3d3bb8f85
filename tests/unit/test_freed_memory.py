"""FreedMemory: freed memory is given back after work, not at every look."""

from __future__ import annotations

from carelay.common import lifecycle


def test_freed_memory_is_returned_only_when_the_work_counters_moved(monkeypatch):
    calls = []
    monkeypatch.setattr(lifecycle, "return_freed_memory", lambda: calls.append(1) or True)
    freed = lifecycle.FreedMemory()
    freed.after((0, 0, 0))
    assert len(calls) == 1  # the first look: whatever start-up freed
    freed.after((0, 0, 0))
    freed.after((0, 0, 0))
    assert len(calls) == 1  # idle: nothing moved, no look at the heap
    freed.after((0, 5, 0))
    assert len(calls) == 2
    freed.after((0, 5, 0))
    assert len(calls) == 2
