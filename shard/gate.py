"""ReadGate: a put with callback completes when every front-end that serves the PV has it.

A PVA server answers a get from the value last posted, with no hook for the front-end to
catch up first; a CA broker takes what its shard sent before it answers a read, but a
change still on its way between the processes when the put completed is not there yet.
So each front-end tells the shard which PVs it serves reads of (WATCH).  An answer that
completes another front-end's put to one of them, and everything after it to that
front-end, then waits: the watching front-end gets a CONFIRM after the change, and
answers it (SHOWN) once it has shown everything before it.  Each answered front-end's
stream stays in order; the others' streams never wait.

A watching front-end that does not answer within ``wait`` seconds (hung, or far behind)
is lagging: the answers go, and later ones no longer wait for it until it has caught up
(answered the newest CONFIRM it was sent).  So a front-end that dies or hangs costs the
others one wait at most, and one that stays behind one wait each time it catches up.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass

from carelay.common.messages import (
    Ack,
    Confirm,
    Deleted,
    FieldChanged,
    Message,
    Shown,
    Update,
    Watch,
)

log = logging.getLogger(__name__)

#: Answers that complete a change (a put, a field change, a deletion) when they carry a
#: request number.
_CHANGES = (Update, Ack, FieldChanged, Deleted)


@dataclass(slots=True)
class _Held:
    """Messages to one front-end that wait, in order, for the CONFIRM ``token`` to be
    answered by each of ``waiting`` (none: they wait only for those held before them)."""

    token: int
    waiting: set[bytes]
    msgs: list[Message]
    deadline: float


class ReadGate:
    """Which front-ends watch which PVs, and the answers held for them (see the module)."""

    def __init__(self, epoch: int, wait: float) -> None:
        self.epoch = epoch
        #: How long an answer waits for a watching front-end (s).
        self.wait = wait
        #: Per front-end, the PVs it watches.
        self.watches: dict[bytes, set[str]] = {}
        #: Watching front-ends that did not answer in time: nothing waits for them.
        self.lagging: set[bytes] = set()
        #: The newest CONFIRM sent to each lagging front-end: answering it ends the lag.
        self._newest: dict[bytes, int] = {}
        #: Per answered front-end, what waits to go to it, oldest first.
        self.held: dict[bytes, collections.deque[_Held]] = {}
        self._token = 0

    @property
    def active(self) -> bool:
        """Whether any answer may wait, or waits: else ``route`` has nothing to do."""
        return bool(self.watches or self.held)

    # -- what the front-ends say ----------------------------------------------------------

    def handlers(self) -> dict:
        """The messages the gate takes, for the request handler (see RequestHandler)."""
        return {
            Watch: lambda peer, m: self.watch(peer, m.name, m.on),
            Shown: lambda peer, m: self.shown(peer, m.token),
        }

    def watch(self, peer: bytes, name: str, on: bool) -> None:
        names = self.watches.get(peer)
        if on:
            if names is None:
                names = self.watches[peer] = set()
            names.add(name)
        elif names is not None:
            names.discard(name)
            if not names:
                del self.watches[peer]

    def shown(self, peer: bytes, token: int) -> None:
        """``peer`` has shown every change before CONFIRM ``token``."""
        if peer in self.lagging and token >= self._newest.get(peer, 0):
            # Caught up: it answered the newest one.  An older answer leaves it lagging,
            # so a front-end that stays behind does not cost every put a wait.
            self.lagging.discard(peer)
            del self._newest[peer]
            log.info("a front-end caught up: answers wait for it again")
        for queue in self.held.values():
            for held in queue:
                if held.token > token:
                    break
                held.waiting.discard(peer)

    def forget(self, peer: bytes) -> None:
        """``peer`` is served no more: nothing waits for it, and nothing is held for it."""
        self.watches.pop(peer, None)
        self.lagging.discard(peer)
        self._newest.pop(peer, None)
        self.held.pop(peer, None)
        for queue in self.held.values():
            for held in queue:
                held.waiting.discard(peer)

    # -- the batch's messages -------------------------------------------------------------

    def route(self, per_peer: dict[bytes, list[Message]], answered, now: float) -> None:
        """Take out of ``per_peer`` what must wait, and add a CONFIRM for each front-end
        that watches a PV whose change an answer completes.  ``answered``: the peers
        whose messages include answers.  What goes to a front-end with messages held
        waits behind them, its CONFIRM too."""
        token = 0
        confirm_to: set[bytes] = set()
        for peer in answered.union(self.held):
            msgs = per_peer.get(peer)
            if not msgs:
                continue
            queue = self.held.get(peer)
            cut = 0 if queue else None
            waiting: set[bytes] = set()
            for k, msg in enumerate(msgs):
                if type(msg) not in _CHANGES or not msg.req:
                    continue
                watchers = self._watchers(msg.name, peer)
                if not watchers:
                    continue
                # A lagging front-end is sent the CONFIRM too: its answer may end its lag.
                confirm_to |= watchers
                token = token or self._next_token()
                if waits_for := watchers - self.lagging:
                    waiting |= waits_for
                    if cut is None:
                        cut = k
            if cut is None:
                continue
            if queue is None:
                queue = self.held[peer] = collections.deque()
            queue.append(_Held(token if waiting else 0, waiting, msgs[cut:], now + self.wait))
            del msgs[cut:]
        if token:
            confirm = Confirm(token, self.epoch)
            for peer in confirm_to:
                if peer in self.lagging:
                    self._newest[peer] = token
                queue = self.held.get(peer)
                if queue:
                    queue[-1].msgs.append(confirm)
                else:
                    per_peer.setdefault(peer, []).append(confirm)

    def release(self) -> list[tuple[bytes, list[Message]]]:
        """What no longer waits, per front-end, in order; taken out of the gate."""
        out = []
        for peer, queue in list(self.held.items()):
            msgs: list[Message] = []
            while queue and not queue[0].waiting:
                msgs += queue.popleft().msgs
            if not queue:
                del self.held[peer]
            if msgs:
                out.append((peer, msgs))
        return out

    def expire(self, now: float) -> bool:
        """The front-ends that did not answer in time are lagging: nothing waits for them.
        True when an answer stopped waiting (``release`` has it)."""
        if self.due() > now:
            return False
        late: set[bytes] = set()
        for queue in self.held.values():
            for held in queue:
                if held.deadline <= now:
                    late |= held.waiting
        log.warning(
            "%d front-end(s) did not show a change within %g s: answers go without "
            "waiting for them until they catch up",
            len(late),
            self.wait,
        )
        for peer in late:
            self._newest[peer] = self._token
        self.lagging |= late
        for queue in self.held.values():
            for held in queue:
                held.waiting -= late
        return True

    def due(self) -> float:
        """When the oldest held answer stops waiting (inf: none waits)."""
        return min(
            (q[0].deadline for q in self.held.values() if q and q[0].waiting), default=math.inf
        )

    def _watchers(self, name: str, peer: bytes) -> set[bytes]:
        return {p for p, names in self.watches.items() if p != peer and name in names}

    def _next_token(self) -> int:
        self._token += 1
        return self._token
