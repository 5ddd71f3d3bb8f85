"""When the broker's queue for a shard goes: at once, in batches, or at the next tick."""

from __future__ import annotations

from types import SimpleNamespace

from carelay.broker.loop import sends_now
from carelay.common.protocol import BATCH_MAX


def _link(queued: int, urgent: bool = False):
    return SimpleNamespace(queued=queued, urgent=urgent)


def test_plain_puts_wait_for_a_batch_or_the_tick():
    assert not sends_now(_link(1))
    assert not sends_now(_link(BATCH_MAX - 1))
    assert sends_now(_link(BATCH_MAX))
    assert sends_now(_link(1, urgent=True))
