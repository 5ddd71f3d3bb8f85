"""Requests: the one record of what the broker asked the shards and still waits for.

Every message to a shard that is answered carries a number: puts with a round trip,
field changes and deletions, and also HELLO and PING.  A shard answers in number order,
so an answer also tells which earlier requests it lost.  A request that waits for its
answer is kept here, with the PV it holds in flight (its reads wait for it, its puts
take the round trip) and the client callback it completes, until it is answered, fails,
or passes its deadline.  Puts parked while their shard restarts (PUT_RECONNECT_GRACE)
wait here too.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import time
from dataclasses import dataclass
from typing import Any

from carelay.broker.clock import ShardClock
from carelay.common.config import EXPIRY_MARGIN, PUT_RECONNECT_GRACE, PUT_TIMEOUT
from carelay.common.messages import Write
from carelay.common.protocol import WriteRun

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request:
    """A request sent to a shard and waiting for its answer."""

    #: The PV it holds in flight, or None (a WRITE, or an orphan).
    pv: Any
    name: str
    shard: int
    deadline: float
    #: Told ``complete(ok)`` when the request ends (a put with callback), or None.
    notify: Any
    #: (host, user) of the client that waits for the answer, for ``relay:ERRORS``.
    client: tuple[str, str] | None = None
    #: Its failure is nobody's error (a FOLLOW: a read that waited for it goes on).
    quiet: bool = False
    #: A client's put: counted in the broker's puts (Health.puts) once it is applied.
    put: bool = False
    #: (PV, payload) of a put with callback, to go again if the shard refuses it unapplied
    #: because it no longer serves this connection (see ``repark``); for a field change, a
    #: deletion or a put without callback, an object in the PV's place that sends it
    #: again (forward._Again).
    retry: Any = None
    #: Seconds its deadline was put off while this process was held up (``held_up``).
    held: float = 0.0


@dataclass(slots=True)
class ParkedPut:
    """A put that waits for its shard to be back (PUT_RECONNECT_GRACE)."""

    pv: Any
    payload: Any
    notify: Any
    shard: int
    deadline: float
    #: Who put it (as ``Requests.expect`` takes it), for ``relay:ERRORS`` if it fails.
    client: Any = None
    #: Its place among the puts: a number from the sequence that numbers the requests.
    order: int = 0


#: Where a parked put goes among the others.
_ORDER = operator.attrgetter("order")


class Requests:
    """Request numbers, the requests in flight per shard and per PV, their deadlines,
    and the parked puts."""

    def __init__(self, links: list, table, health, error) -> None:
        self._links = links
        self._table = table
        self._health = health
        self._error = error
        self._numbers = itertools.count(1)
        #: Per shard: requests sent and not yet answered, in number (= sending) order.
        self.unanswered: list[dict[int, Request]] = [{} for _ in links]
        #: Per shard: requests that were in flight when its link went down; they wait for
        #: their deadline (see ``link_down``), in number order.
        self.orphans: list[dict[int, Request]] = [{} for _ in links]
        #: How many requests each PV has in flight (PVs with none are absent).
        self._in_flight: dict = {}
        #: Puts waiting for their shard to be back, in the order they were made.
        self.parked: list[ParkedPut] = []
        #: Per shard: how far its wall clock is from ours, which expiries are said in.
        self.clocks = [ShardClock() for _ in links]

    # -- numbers and what waits for them -------------------------------------------

    def number(self) -> int:
        """A number for a message whose answer only orders the others (HELLO, PING)."""
        return next(self._numbers)

    def expect(
        self,
        shard: int,
        pv,
        name: str,
        notify,
        client,
        quiet: bool = False,
        put: bool = False,
        retry=None,
    ) -> tuple[int, float]:
        """A new request number, whose answer ``shard`` now owes, and the request's
        expiry.  The broker fails the request at its deadline (PUT_TIMEOUT); the expiry, in
        the shard's wall-clock time (as far as its PONGs show its clock to be off ours:
        ShardClock), comes EXPIRY_MARGIN earlier, and a shard that the request reaches
        later drops it: a put reported failed is never applied later.

        What the margin cannot cover: a shard that applied the request in time but
        answers only past the deadline (stopped between applying and answering, or a
        commit slower than the margin) has it reported failed though applied."""
        req = next(self._numbers)
        deadline = time.monotonic() + PUT_TIMEOUT
        self.unanswered[shard][req] = Request(
            pv, name, shard, deadline, notify, client, quiet, put, retry
        )
        if pv is not None:
            self._in_flight[pv] = self._in_flight.get(pv, 0) + 1
        return req, self.clocks[shard].to_shard(time.time() + (PUT_TIMEOUT - EXPIRY_MARGIN))

    def in_flight(self, pv) -> int:
        """How many requests for ``pv`` its shard has not answered yet."""
        return self._in_flight.get(pv, 0)

    def any_unanswered(self) -> bool:
        return any(self.unanswered)

    def waiter(self, shard: int, req: int) -> Request | None:
        """The request ``req`` to ``shard``, if one still waits for its answer."""
        if not req:
            return None
        return self.unanswered[shard].get(req) or self.orphans[shard].get(req)

    # -- how requests end ------------------------------------------------------------

    def finish(self, shard: int, req: int, ok: bool) -> None:
        """Request ``req`` to ``shard`` ends: applied (``ok``) or failed."""
        p = self.unanswered[shard].pop(req, None)
        if p is None:
            p = self.orphans[shard].pop(req, None)
            if p is None:
                return
        self._let_go(p)
        if ok and p.put:
            self._health.puts += 1
        if p.notify is not None:
            sent = p.deadline - p.held - PUT_TIMEOUT
            self._health.put_callback.observe(time.monotonic() - sent)
            p.notify.complete(ok)

    def _let_go(self, p: Request) -> None:
        """``p`` no longer holds its PV in flight."""
        if p.pv is not None:
            n = self._in_flight.pop(p.pv, 1) - 1
            if n:
                self._in_flight[p.pv] = n
            else:
                self._table.reserve(p.pv, False)

    def repark(self, shard: int, req: int) -> bool:
        """Request ``req``, sent through the current connection to ``shard``, was refused
        unapplied: the shard no longer serves that connection (it took this process for
        hung after a stall: common.messages.NOT_SERVED), and the loop reconnects.  A put,
        field change or deletion then waits for the new connection, as a put waits for a
        restarting shard (``park``), rather than failing a client that did nothing wrong
        (or, without callback, being lost unknown to it).  False if ``req`` is none of
        those: it ends as refused.  An orphan goes again too: the link went down at an
        earlier refusal of the same connection (ShardSync._orphan_refused)."""
        waiting = self.unanswered[shard]
        if req not in waiting:
            waiting = self.orphans[shard]
        p = waiting.get(req)
        if p is None or p.retry is None:
            return False
        del waiting[req]
        self._let_go(p)
        pv, payload = p.retry
        pv.waiting_put = True  # the PV's later puts wait behind it
        self.park(pv, payload, p.notify, shard, p.client, order=req)
        return True

    def answered(self, shard: int, req: int) -> None:
        """``shard`` answered request ``req``.  It answers in order, so every request to it
        numbered below ``req`` and still unanswered was lost (a shard that restarted):
        those fail now rather than at their timeout, and never succeed falsely."""
        if not req:
            return
        waiting = self.unanswered[shard]
        while waiting:
            first = next(iter(waiting))
            if first >= req:
                break
            p = waiting[first]
            if not p.quiet:
                why = "the shard lost the request"
                if self._error("shard_down", why, p.name, shard, p.client):
                    log.warning("shard %d lost the request for %s; failing it", shard, p.name)
            self.finish(shard, first, False)

    def held_up(self, seconds: float) -> None:
        """This process did not run for ``seconds`` (it was stopped, or its loop was held
        up): every request in flight waits that much longer for its answer.  A shard that
        answered meanwhile was not late: its answer waits, unread, in this process (the
        loop and ZeroMQ's I/O thread run again together, and the loop may look before the
        answer is in), and the request's expiry at the shard (``expect``) still drops it
        if it reached the shard too late.  So waiting longer never has a put reported
        failed that was applied, and never lets one be applied after it was."""
        for waiting in (*self.unanswered, *self.orphans):
            for p in waiting.values():
                p.deadline += seconds
                p.held += seconds

    def expire(self, shard: int, now: float) -> None:
        """Fail the requests to ``shard`` whose deadline has passed."""
        # Requests are kept in sending order with one timeout, so the expired ones are
        # at the front.
        for waiting in (self.orphans[shard], self.unanswered[shard]):
            while waiting:
                req, p = next(iter(waiting.items()))
                if p.deadline >= now:
                    break
                if not p.quiet:
                    why = "no answer from the shard in time"
                    if self._error("shard_down", why, p.name, shard, p.client):
                        log.warning(
                            "no answer from shard %d for %s; failing the request", shard, p.name
                        )
                self.finish(shard, req, False)

    def link_down(self, shard: int, gone: bool) -> None:
        """The link to ``shard`` went down.  ``gone``: the shard process closed the
        connection, so what it has not answered it never applies: those fail now."""
        if gone:
            for waiting in (self.unanswered[shard], self.orphans[shard]):
                for req in list(waiting):
                    self.finish(shard, req, False)
        # The requests in flight may still reach the shard (a shard that was stopped, a
        # connection that delivers late).  They become orphans: answered on their old
        # socket, which the link keeps (parked) for them, or failed at their deadline, when
        # the shard drops them if they come; never failed before the shard is sure to drop
        # them.  Their PVs are free for new requests at once: the reconnect's snapshot
        # shows whatever the orphans did.
        unanswered = self.unanswered[shard]
        for p in unanswered.values():
            if p.pv is not None:
                self._in_flight.pop(p.pv, None)
                self._table.reserve(p.pv, False)
                p.pv = None
        self.orphans[shard].update(unanswered)
        unanswered.clear()

    def fail_orphans(self, shard: int) -> None:
        """A new process of ``shard``: what the old one had not applied died with it."""
        orphans = self.orphans[shard]
        if orphans:
            log.warning("shard %d restarted; failing %d requests sent before", shard, len(orphans))
            for req in list(orphans):
                self.finish(shard, req, False)

    def send(self, link) -> None:
        """Send ``link``'s queued messages; the requests among those that cannot go fail
        now."""
        failed = link.send_queued()
        if not failed:
            return
        msgs = [m for msg in failed for m in (msg.messages() if type(msg) is WriteRun else [msg])]
        log.warning(
            "shard %d not accepting; failing %d requests (%s, ...)",
            link.index,
            len(msgs),
            msgs[0].name,
        )
        why = f"shard not accepting; failed {len(msgs)} requests"
        self._error("shard_down", why, msgs[0].name, link.index)
        for msg in msgs:
            if type(msg) is Write:
                # The mirror shows puts the shard will never see: the link goes down
                # (COMM alarm) at the next tick and the reconnect resyncs the mirror.
                link.lost_writes = True
            self.finish(link.index, msg.req, False)

    # -- puts that wait for their shard ------------------------------------------------

    def put_waits(self, shard: int) -> bool:
        """Whether a put for ``shard`` is to wait for it: its link is down, and went down
        less than PUT_RECONNECT_GRACE ago (a shard being restarted)."""
        link = self._links[shard]
        if link.not_served:
            return True  # its connection is taken down at the loop's next turn
        return (
            not link.usable
            and link.ever_synced
            and time.monotonic() < link.down_since + PUT_RECONNECT_GRACE
        )

    def park(self, pv, payload, notify, shard: int, client=None, order: int = 0) -> None:
        """Keep a put for ``shard`` until the shard is back or the grace is over; the PV
        has started an asynchronous write, which ``pv.resume`` ends.  ``order``: the
        number of the request it was sent as (``repark``); it goes back among the parked
        puts in that place, before those made after it.  0: a put made now."""
        link = self._links[shard]
        # A link not down yet (``repark``) goes down now: the grace counts from now.
        since = link.down_since if not link.usable else time.monotonic()
        deadline = since + PUT_RECONNECT_GRACE
        put = ParkedPut(pv, payload, notify, shard, deadline, client, order or self.number())
        bisect.insort(self.parked, put, key=_ORDER)

    def unpark(self, now: float) -> None:
        """Send on the parked puts whose shard is back; fail those whose grace is over."""
        waiting = []
        for p in self.parked:
            link = self._links[p.shard]
            if link.usable and not link.not_served:
                p.pv.resume(p.payload, p.notify, True)
            elif now >= p.deadline:
                log.warning(
                    "put to %s failed: shard %d unreachable for %.1f s",
                    p.pv.name,
                    p.shard,
                    PUT_RECONNECT_GRACE,
                )
                why = f"put failed: shard unreachable for {PUT_RECONNECT_GRACE:.1f} s"
                self._error("shard_down", why, p.pv.name, p.shard, p.client)
                p.pv.resume(p.payload, p.notify, False)
            else:
                waiting.append(p)
        self.parked = waiting

    def fail_parked(self) -> None:
        """The broker stops: the parked puts fail."""
        for p in self.parked:
            p.pv.resume(p.payload, p.notify, False)
        self.parked.clear()
