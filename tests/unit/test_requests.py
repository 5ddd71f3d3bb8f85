"""Requests, the broker's one record of what it waits for from the shards, without
sockets or CA: numbering, answers in order, deadlines, a link that goes down, puts that
cannot be sent, and puts parked while a shard restarts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from carelay.broker.requests import Requests
from carelay.common.config import PUT_RECONNECT_GRACE, PUT_TIMEOUT
from carelay.common.messages import Write


class Link:
    def __init__(self, index: int) -> None:
        self.index = index
        self.usable = True
        self.ever_synced = True
        self.down_since = 0.0
        self.lost_writes = False
        self.not_served = ""
        self.unsent: list = []

    def send_queued(self) -> list:
        out, self.unsent = self.unsent, []
        return out


class PV:
    def __init__(self, name: str) -> None:
        self.name = name
        self.creating = False
        self.waiting_put = False
        self.resumed: list = []

    def resume(self, payload, notify, go: bool) -> None:
        self.resumed.append((payload, go))


class Table:
    def reserve(self, pv, creating: bool) -> None:
        pv.creating = creating


class Histogram:
    """Keeps what it was told."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append(seconds)


class Health:
    put_callback = Histogram()
    puts = 0


class Notify:
    def __init__(self) -> None:
        self.results: list[bool] = []

    def complete(self, ok: bool) -> None:
        self.results.append(ok)


@pytest.fixture
def setup():
    links = [Link(0), Link(1)]
    errors: list = []

    def error(kind, reason, pv=None, shard=None, client=None):
        errors.append((kind, pv, shard, client))

    return Requests(links, Table(), Health(), error), links, errors


def test_an_answer_fails_the_earlier_requests_its_shard_lost(setup):
    requests, _, errors = setup
    pv, first, second = PV("a"), Notify(), Notify()
    lost, _ = requests.expect(0, pv, "a", first, ("host", "user"))
    kept, _ = requests.expect(0, pv, "a", second, None)
    other, _ = requests.expect(1, None, "b", None, None)
    assert lost < kept < other and requests.in_flight(pv) == 2
    requests.answered(1, other)  # one numbering, but each shard answers only for its own
    assert first.results == [] and second.results == []
    requests.answered(0, kept)
    assert first.results == [False] and second.results == []
    assert errors == [("shard_down", "a", 0, ("host", "user"))]
    requests.finish(0, kept, True)
    assert second.results == [True] and requests.in_flight(pv) == 0
    assert list(requests.unanswered[1]) == [other]  # answered() leaves ``req`` itself


def test_a_put_counts_once_its_shard_applied_it(setup):
    requests, _, _ = setup
    health = requests._health
    refused, _ = requests.expect(0, PV("a"), "a", Notify(), None, put=True)
    applied, _ = requests.expect(0, None, "a", Notify(), None, put=True)
    field, _ = requests.expect(0, PV("a"), "a", Notify(), None)  # a field put, say
    requests.finish(0, refused, False)  # a put the shard refused: no put of the relay's
    assert health.puts == 0
    requests.finish(0, applied, True)
    requests.finish(0, field, True)
    assert health.puts == 1
    expired, _ = requests.expect(1, None, "b", Notify(), None, put=True)
    requests.expire(1, time.monotonic() + PUT_TIMEOUT + 1)
    assert health.puts == 1


def test_a_creation_stays_reserved_until_its_last_request_ends(setup):
    requests, _, _ = setup
    pv = PV("a")
    pv.creating = True
    one, _ = requests.expect(0, pv, "a", None, None)
    two, _ = requests.expect(0, pv, "a", None, None)
    requests.finish(0, one, True)
    assert pv.creating and requests.in_flight(pv) == 1
    requests.finish(0, two, False)
    assert not pv.creating and requests.in_flight(pv) == 0


def test_a_link_down_orphans_its_requests_and_frees_their_pvs_at_once(setup):
    requests, _, errors = setup
    pv, notify = PV("a"), Notify()
    pv.creating = True
    req, expires = requests.expect(0, pv, "a", notify, None)
    assert expires < time.time() + PUT_TIMEOUT
    requests.link_down(0, gone=False)
    # Free for new requests, yet the orphan may still be answered on its old socket.
    assert requests.in_flight(pv) == 0 and not pv.creating
    assert not requests.any_unanswered() and requests.waiter(0, req) is not None
    requests.expire(0, time.monotonic())
    assert notify.results == []
    requests.expire(0, time.monotonic() + PUT_TIMEOUT + 1)
    assert notify.results == [False] and errors[-1][:3] == ("shard_down", "a", 0)
    assert not requests.orphans[0]


def test_a_shard_that_closed_its_connection_fails_what_it_owed_now(setup):
    requests, _, _ = setup
    early, late = Notify(), Notify()
    requests.expect(0, PV("a"), "a", early, None)
    requests.link_down(0, gone=False)
    requests.expect(0, PV("b"), "b", late, None)
    requests.link_down(0, gone=True)
    assert early.results == [False] and late.results == [False]
    assert not requests.orphans[0] and not requests.unanswered[0]


def test_requests_that_cannot_be_sent_fail_and_lost_writes_mark_the_link(setup):
    requests, links, errors = setup
    pv, notify = PV("a"), Notify()
    req, _ = requests.expect(0, pv, "a", notify, None)
    links[0].unsent = [Write("a", req, 1.0, np.array([1.0]))]
    requests.send(links[0])
    assert notify.results == [False] and links[0].lost_writes
    assert requests.in_flight(pv) == 0 and errors[-1][0] == "shard_down"


def test_parked_puts_go_when_their_shard_is_back_and_fail_after_the_grace(setup):
    requests, links, errors = setup
    now = time.monotonic()
    links[0].usable = links[1].usable = False
    links[0].down_since = links[1].down_since = now
    assert requests.put_waits(0)
    back, late = PV("a"), PV("b")
    requests.park(back, "x", None, 0)
    requests.park(late, "y", None, 1, ("host", "user"))
    requests.unpark(now)
    assert back.resumed == [] and late.resumed == [] and len(requests.parked) == 2
    links[0].usable = True
    requests.unpark(now + PUT_RECONNECT_GRACE)
    assert back.resumed == [("x", True)] and late.resumed == [("y", False)]
    assert not requests.parked and errors[-1] == ("shard_down", "b", 1, ("host", "user"))


def test_a_put_refused_by_a_shard_that_no_longer_serves_the_connection_waits_for_the_next(
    setup,
):
    """A shard that took the broker for hung refuses what its old connection brings: a put
    waits for the new connection, uncompleted and uncounted, and so do the puts that come
    meanwhile; a request that is no put (a FOLLOW) ends as refused."""
    requests, links, errors = setup
    pv, notify = PV("a"), Notify()
    put, _ = requests.expect(0, pv, "a", notify, ("host", "user"), put=True, retry=(pv, "x"))
    follow, _ = requests.expect(0, PV("b"), "b", None, None, quiet=True)
    assert requests.repark(0, put) and not requests.repark(0, follow)
    assert notify.results == [] and requests._health.puts == 0 and requests.in_flight(pv) == 0
    assert pv.waiting_put and errors == []
    links[0].not_served = "silent"
    assert requests.put_waits(0)  # new puts wait too, not sent through that connection
    requests.unpark(time.monotonic())
    assert pv.resumed == []  # not through the old connection
    links[0].not_served, links[0].usable = "", False  # the loop took it down
    requests.unpark(time.monotonic())
    assert pv.resumed == []
    links[0].usable = True  # reconnected
    requests.unpark(time.monotonic())
    assert pv.resumed == [("x", True)] and not requests.parked


def test_a_reparked_put_fails_when_no_new_connection_comes_in_time(setup):
    requests, links, errors = setup
    pv = PV("a")
    put, _ = requests.expect(0, pv, "a", Notify(), ("h", "u"), put=True, retry=(pv, "x"))
    assert requests.repark(0, put)
    links[0].usable = False
    links[0].down_since = time.monotonic()
    requests.unpark(time.monotonic() + PUT_RECONNECT_GRACE + 0.1)
    assert pv.resumed == [("x", False)] and errors == [("shard_down", "a", 0, ("h", "u"))]


def test_an_orphan_refused_unapplied_goes_back_before_the_puts_made_after_it(setup):
    """The link went down at the first refusal of its connection (a heartbeat's), and a put
    made since waits for the next one; the refusal of an earlier put, an orphan by then,
    puts it back before that one: the later put's value is the one that stays."""
    requests, links, _ = setup
    pv, notify = PV("a"), Notify()
    first, _ = requests.expect(0, pv, "a", notify, None, put=True, retry=(pv, "x"))
    links[0].usable, links[0].down_since = False, time.monotonic()
    requests.link_down(0, gone=False)
    requests.park(pv, "y", None, 0)  # made while the link is down
    assert requests.repark(0, first) and not requests.orphans[0]
    links[0].usable = True
    requests.unpark(time.monotonic())
    assert pv.resumed == [("x", True), ("y", True)] and notify.results == []


def test_a_quiet_request_fails_as_nobodys_error(setup):
    # A FOLLOW: a read that waited for its answer goes on; a hung shard during a resync
    # must not log (or count) one error per PV a broker follows.
    requests, _, errors = setup
    pv = PV("a")
    lost, _ = requests.expect(0, pv, "a", None, None, quiet=True)
    late, _ = requests.expect(0, pv, "b", None, None, quiet=True)
    answered, _ = requests.expect(0, None, "c", None, None)
    requests.answered(0, late)  # ``lost`` was lost by the shard
    requests.expire(0, time.monotonic() + PUT_TIMEOUT + 1)  # ``late`` and ``answered``
    assert errors == [("shard_down", "c", 0, None)]
    assert requests.in_flight(pv) == 0 and not requests.any_unanswered()


def test_a_field_change_or_deletion_goes_again_in_a_parked_puts_place(setup):
    """forward._Again stands for the PV of a field change, a deletion or a put without
    callback that a shard refused unapplied: sent again when its shard is back, failed
    when it cannot go."""
    from carelay.broker.forward import _Again

    requests, links, _ = setup
    sent = []
    again = _Again("a", lambda: sent.append("a") or True)
    notify = Notify()
    req, _ = requests.expect(0, PV("a"), "a", notify, None, retry=(again, None))
    assert requests.repark(0, req)
    requests.unpark(time.monotonic())
    assert sent == ["a"] and notify.results == []  # it completes with its new request
    failing = Notify()
    _Again("b", lambda: False).resume(None, failing, True)
    _Again("c", lambda: True).resume(None, failing, False)
    assert failing.results == [False, False]
    # Without callback: nobody to tell.
    plain, _ = requests.expect(0, PV("d"), "d", None, None, put=True, retry=(again, None))
    assert requests.repark(0, plain)
    requests.unpark(time.monotonic())
    assert sent == ["a", "a"]
    _Again("e", lambda: False).resume(None, None, True)


def test_a_process_held_up_gives_its_requests_the_time_back(setup):
    # The broker stopped (SIGSTOP, a paused VM) past a put's deadline while its shard
    # applied and answered it: the answer waits, unread.  The loop that runs again must
    # not fail the put before it has read the answer.
    requests, _, errors = setup
    requests._health.put_callback = clock = Histogram()
    live, orphan = Notify(), Notify()
    put, _ = requests.expect(0, PV("a"), "a", live, None, put=True)
    lost, _ = requests.expect(1, PV("b"), "b", orphan, None)
    requests.link_down(1, gone=False)  # its link went down meanwhile: an orphan
    held = PUT_TIMEOUT + 3
    resumed = time.monotonic() + held
    requests.held_up(held)
    for shard in (0, 1):
        requests.expire(shard, resumed)
    assert live.results == [] and orphan.results == [] and not errors
    requests.answered(0, put)
    requests.finish(0, put, True)
    assert live.results == [True] and requests._health.puts == 1
    # Its time to answer is measured from its send, not from a deadline that moved (no
    # time passed here: the process was held up only as far as Requests was told).
    assert len(clock.seen) == 1 and 0 <= clock.seen[0] < 1.0
    # Unanswered still when the time given back is up: it fails as before.
    requests.expire(1, resumed + PUT_TIMEOUT + 1)
    assert orphan.results == [False] and errors[-1][:3] == ("shard_down", "b", 1)


def test_a_loop_turn_that_took_longer_than_its_sleep_gives_the_time_back(setup):
    from carelay.broker.loop import HELD_UP, took_longer

    requests, _, _ = setup
    notify = Notify()
    requests.expect(0, PV("a"), "a", notify, None)
    (request,) = requests.unanswered[0].values()
    deadline = request.deadline
    took_longer(requests, started=100.0, slept=1.0, now=101.0 + HELD_UP / 2)  # busy, not held
    assert request.deadline == deadline
    took_longer(requests, started=100.0, slept=1.0, now=108.0)  # 7 s over what it slept
    assert request.deadline == pytest.approx(deadline + 7.0)
