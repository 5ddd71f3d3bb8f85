"""The PVA front-end follows a PV from a client's search on (PvaSync.searched): the
shard's answer is in, or on its way, when the client makes its channel, and a channel
opens only once every FOLLOW of its PV sent so far is answered.  No p4p, no shards: the
links' sends are recorded, and the shard's answers given by hand."""

from __future__ import annotations

import time

import numpy as np
import pytest

from carelay.broker.link import LinkState
from carelay.broker.pva.front import PvaFrontEnd
from carelay.common.config import PVA_SEARCH_FOLLOW, load_config
from carelay.common.messages import Follow, Watch
from tests.unit.test_pva_front import FakeChannel

NAME = "P:searched_f1"


@pytest.fixture
def front(tmp_path):
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path)))
    f.make_channel_object = lambda _front, name: FakeChannel(name)
    f.sync.follows = True  # as with pva = true
    yield f
    f.inbox.close()


class Shard:
    """What the front-end sends one shard link, and the answers to its FOLLOWs."""

    def __init__(self, front, name: str, accepting: bool = True) -> None:
        self.front = front
        pv = front.table.new_pv(name)
        front.table.set_real(pv, True)
        pv.apply(np.array([1.0]), 1.0, append=False)
        self.link = link = front.links[pv.shard]
        link.state = LinkState.LIVE
        link.timers.last_heard = time.monotonic()
        self.sent: list = []

        def send_queued() -> list:
            out, link.outbox = link.outbox, []
            link.queued, link.urgent = 0, False
            if not accepting:
                return out
            self.sent += out
            return []

        link.send_queued = send_queued

    def follows(self, on: bool = True) -> list[int]:
        """The numbers of the FOLLOWs (``on``) or UNFOLLOWs sent."""
        return [m.req for m in self.sent if type(m) is Follow and m.on is on]

    def answer(self, req: int) -> None:
        self.front.requests.finish(self.link.index, req, True)

    def searched(self, name: str) -> int:
        """A client searched for ``name`` and the loop took it: the FOLLOW sent for it."""
        assert self.front.test_channel(name) is True
        self.front.inbox.run()
        (req,) = self.follows()
        return req


def test_a_search_follows_the_pv_and_its_channel_opens_once_the_answer_is_in(front):
    shard = Shard(front, NAME)
    req = shard.searched(NAME)
    channel = front.make_channel(NAME)
    front.inbox.run()
    assert shard.follows() == [req]  # no second FOLLOW for the channel
    assert channel.shown == []  # the answer is not in: the mirror may be older
    shard.answer(req)
    (opened,) = channel.shown
    assert opened["value"] == 1.0


def test_a_channel_made_after_the_answer_opens_at_once(front):
    shard = Shard(front, NAME)
    req = shard.searched(NAME)
    shard.answer(req)
    assert front.test_channel(NAME) is True  # searched again: followed, nothing sent
    channel = front.make_channel(NAME)
    front.inbox.run()
    assert shard.follows() == [req]
    assert len(channel.shown) == 1


def test_a_channel_made_again_waits_for_the_follow_still_in_flight(front):
    """Dropped and made again before its FOLLOW was answered: the second channel waits
    for the answer to the FOLLOW sent after the UNFOLLOW, not only the first (the shard
    sent nothing of the PV between the two)."""
    shard = Shard(front, NAME)
    first = front.make_channel(NAME)
    front.inbox.run()
    (req1,) = shard.follows()
    front.drop_channel(first)
    assert shard.follows(False)
    second = front.make_channel(NAME)
    front.inbox.run()
    _, req2 = shard.follows()
    shard.answer(req1)
    assert second.shown == []
    shard.answer(req2)
    assert len(second.shown) == 1


def test_a_searched_pv_without_a_channel_is_let_go(front):
    shard = Shard(front, NAME)
    shard.answer(shard.searched(NAME))
    front.sync.expire_searched(time.monotonic())
    assert NAME in front.sync.followed  # not yet
    front.sync.expire_searched(time.monotonic() + PVA_SEARCH_FOLLOW + 1)
    assert NAME not in front.sync.followed
    assert len(shard.follows(False)) == 1


def test_a_searched_pv_whose_channel_came_stays_followed(front):
    shard = Shard(front, NAME)
    req = shard.searched(NAME)
    channel = front.make_channel(NAME)
    front.inbox.run()
    assert shard.follows() == [req]
    shard.answer(req)
    front.sync.expire_searched(time.monotonic() + PVA_SEARCH_FOLLOW + 1)
    assert NAME in front.sync.followed
    assert shard.follows(False) == []
    assert len(channel.shown) == 1


def test_a_provisional_pv_is_not_followed_at_its_search(front):
    shard = Shard(front, NAME)
    front.test_channel("P:new_f1")
    front.inbox.run()
    assert "P:new_f1" not in front.sync.followed
    assert all(m.name != "P:new_f1" for m in shard.sent)


def test_a_follow_that_cannot_go_ends_at_once_and_the_channel_opens(front):
    """A shard that accepts nothing now: the FOLLOW fails at once (it waited for its
    deadline), and the channel opens with the mirror as it stands."""
    shard = Shard(front, NAME, accepting=False)
    channel = front.make_channel(NAME)
    front.inbox.run()
    assert len(channel.shown) == 1
    assert not front.requests.unanswered[shard.link.index]


def _watches(shard) -> list[tuple[str, bool]]:
    return [(m.name, m.on) for m in shard.sent if type(m) is Watch]


def test_a_field_channel_opens_as_its_pvs_own_does(front):
    """``NAME.FIELD`` opens once its PV's FOLLOW is answered, and keeps the PV followed
    and watched (a put with callback through another front-end then completes only once
    the field shows it) until neither the PV's own channel nor a field's is held."""
    shard = Shard(front, NAME)
    egu = front.make_channel(NAME + ".EGU")
    front.inbox.run()
    (req,) = shard.follows()
    assert _watches(shard) == [(NAME, True)]  # the PV, not the field's name
    assert egu.shown == []  # the answer is not in: the field may be older
    own = front.make_channel(NAME)
    front.inbox.run()
    shard.answer(req)
    assert len(egu.shown) == 1 and len(own.shown) == 1  # both open with the answer
    front.on_first_connect(egu)
    front.on_first_connect(own)
    front.on_last_disconnect(own)
    assert shard.follows(False) == [] and (NAME, False) not in _watches(shard)
    front.on_last_disconnect(egu)
    assert shard.follows(False) and _watches(shard)[-1] == (NAME, False)


def test_a_field_channel_dropped_before_it_opened_is_forgotten(front):
    shard = Shard(front, NAME)
    egu = front.make_channel(NAME + ".EGU")
    front.inbox.run()
    front.drop_channel(egu)  # e.g. its opening was given up
    pv = front.table.pvs[NAME]
    assert not pv.field_channels and not front.field_pvs
    assert shard.follows(False)
    (req,) = shard.follows()
    shard.answer(req)
    assert egu.shown == []


def test_a_resync_watches_the_pv_of_a_field_channel(front):
    shard = Shard(front, NAME)
    front.make_channel(NAME + ".EGU")
    front.inbox.run()
    shard.sent.clear()
    front.sync._resync(shard.link, None)
    assert (NAME, True) in _watches(shard) and (NAME + ".EGU", True) not in _watches(shard)
