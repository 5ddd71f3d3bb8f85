"""When the broker's queue for a shard goes: at once, in batches, or at the next tick."""

from __future__ import annotations

from types import SimpleNamespace

from carelay.broker.loop import sends_now
from carelay.common.protocol import BATCH_MAX


def _link(queued: int, urgent: bool = False):
    return SimpleNamespace(queued=queued, urgent=urgent)


def test_alone_plain_puts_wait_for_a_batch_or_the_tick():
    assert not sends_now(_link(1), others=False)
    assert not sends_now(_link(BATCH_MAX - 1), others=False)
    assert sends_now(_link(BATCH_MAX), others=False)
    assert sends_now(_link(1, urgent=True), others=False)


def test_with_other_front_ends_each_slices_puts_go_at_once():
    # A PVA monitor or another broker's client hears of a put only once its shard has
    # applied it: waiting for the tick would add up to a tick to their latency.
    assert sends_now(_link(1), others=True)
    assert not sends_now(_link(0), others=True)
