"""The PVA front-end's loop: the shard links and the inbox, served by one thread.

``PvaSync`` is the CA broker's ShardSync with the inbox's pipe in the same poll
(``wake_fd``), so a PVA put wakes the loop at once; ``PvaLoop`` reuses the CA Loop's
timers (reconnect, heartbeat, request deadlines), its sending of queued puts and its
status writing, with no CA server to serve.
"""

from __future__ import annotations

import logging
import math
import time

from carelay.broker.link import LinkState, link_for
from carelay.broker.loop import Loop, took_longer
from carelay.broker.peers import ca_buffer_bytes
from carelay.broker.sync import ShardSync
from carelay.common.config import PVA_SEARCH_FOLLOW, STATUS_INTERVAL
from carelay.common.fields import split_field
from carelay.common.lifecycle import StopFlag
from carelay.common.messages import Watch
from carelay.common.protocol import BATCH_MAX

log = logging.getLogger(__name__)

#: Longest poll with nothing queued, parked or waiting (ms): the timers run ten times a
#: second.  Otherwise the poll lasts until the next tick: an answer, a message or a
#: queued call ends it at once (the poll sees the shard sockets and the inbox), so the
#: loop needs no short polls to find them.
_QUIET_POLL_MS = 100
#: How often heartbeats, timeouts and link changes are looked at (s).
_TICK = 0.01


class PvaSync(ShardSync):
    """ShardSync whose poll also wakes for the inbox (see front.py), and which tells the
    shards which PVs its channels serve.

    pvxs answers a get from the value last posted to the channel, with no hook for the
    front-end to take what its shard sent first.  So each shard learns which of its PVs
    have a channel here (WATCH), holds the answer to another front-end's put to one of
    them until this front-end has taken the change (it sends a CONFIRM after the change,
    answered by a SHOWN: see shard/gate.py), and a get right after that put completed
    reads the new value."""

    watch_follows = False

    def __init__(self, broker) -> None:
        super().__init__(broker)
        #: Channels that open once their shard has answered their FOLLOW, by the name of
        #: their PV: (what the channel serves, the channel), the PV's own or a field's.
        self._opening: dict[str, list] = {}
        #: How many FOLLOWs of each name wait for their answer (names with none absent).
        self._answering: dict[str, int] = {}
        #: PVs followed since a client searched for them, no channel made yet: when each
        #: is let go (in that order: the wait is the same for all).
        self._searched: dict[str, float] = {}
        #: The inbox's pipe is polled with the shard sockets; ``woken`` says it was
        #: readable: the loop runs the inbox only then, since a look at an empty pipe
        #: costs a system call (and the exception of a read that would block) on each
        #: turn, and a put takes several.
        self.wake_fd = broker.inbox.fd

    def hold(self, pv, channel, target=None) -> None:
        """``channel`` serves ``pv`` (or ``target``, a field of it) from now on: its shard
        sends this front-end the other front-ends' puts to it (FOLLOW: not those to PVs
        no channel holds), and holds the answer to such a put until this front-end has
        shown it (WATCH).  The channel opens once the shard answered every FOLLOW of it
        sent so far with the PV as it stands: a client reads no older value than the
        shard's."""
        name = pv.name
        self._searched.pop(name, None)  # the channel keeps it followed now
        self.watch(name, True)
        self._opening.setdefault(name, []).append((target or pv, channel))
        if not self.follow(name) and not self._answering.get(name):
            self._open(name)  # followed and answered already, or its shard is not in sync

    def searched(self, name: str) -> None:
        """A client searched for ``name``, a PV this front-end serves: it is followed now,
        so that the shard's answer is in, or on its way, when the client makes its
        channel right after (a client that opens many PVs at once waits for their answers
        together, not for one round trip per channel in turn).  No channel made within
        PVA_SEARCH_FOLLOW: let go again."""
        if name in self.followed:
            return
        pv = self.table.pvs.get(name)
        if pv is None or not pv.real:
            return  # a provisional PV: its creating put brings its value
        self.follow(name)
        self._searched[name] = time.monotonic() + PVA_SEARCH_FOLLOW

    def expire_searched(self, now: float) -> None:
        """Let go the PVs searched for whose channel was not made in time."""
        searched = self._searched
        while searched:
            name, due = next(iter(searched.items()))
            if due > now:
                return
            del searched[name]
            if name not in self._opening and not self._held(name):
                self.unfollow(name)

    def let_go(self, name: str, channel) -> None:
        """``channel``, which served PV ``name`` or a field of it, is gone: the PV is
        watched and followed no longer if no other channel serves it or a field of it."""
        opening = self._opening.get(name)
        if opening:
            opening[:] = [(t, c) for t, c in opening if c is not channel]
            if not opening:
                del self._opening[name]
        if not self._held(name):
            self.watch(name, False)
            self.unfollow(name)

    def _held(self, name: str) -> bool:
        """Whether a channel serves PV ``name`` or a field of it."""
        pv = self.table.pvs.get(name)
        return name in self.broker.channels or bool(pv is not None and pv.field_channels)

    def _follow(self, link, name: str, notify=None) -> int:
        """A FOLLOW whose answer opens the channel waiting for it."""
        self._answering[name] = self._answering.get(name, 0) + 1
        return super()._follow(link, name, _Opened(self, name))

    def _answered(self, name: str) -> None:
        """A FOLLOW of ``name`` ended (answered, or failed: the mirror stays as it is, and
        the link's state shows in the alarm)."""
        left = self._answering.pop(name, 1) - 1
        if left:
            self._answering[name] = left
        else:
            self._open(name)

    def _open(self, name: str) -> None:
        for target, channel in self._opening.pop(name, ()):
            if self.broker.channels.get(channel.name) is channel:
                target.bind(channel)

    def watch(self, name: str, on: bool) -> None:
        """A channel of ``name`` now serves it (``on``), or no longer.  A shard not in
        sync hears of it when it is (``_resync``)."""
        link = link_for(self.links, name)
        if link.live:
            link.send(Watch(0, name, on))

    def _resync(self, link, end) -> None:
        """In sync again: the shard (maybe a new process) learns the PVs watched here."""
        super()._resync(link, end)
        with self.broker.channel_lock:
            held = [n for n in self.broker.channels if n not in self.broker.controls]
        for name in {split_field(n)[0] for n in held}:  # a field's channel: its PV
            if link_for(self.links, name) is link:
                link.queue(Watch(0, name, True))
        link.send_queued()


class _Opened:
    """Tells PvaSync when a FOLLOW of ``name`` ends."""

    __slots__ = ("sync", "name")

    def __init__(self, sync: PvaSync, name: str) -> None:
        self.sync, self.name = sync, name

    def complete(self, ok: bool) -> None:
        self.sync._answered(self.name)


class PvaLoop(Loop):
    """Runs the PVA front-end until it is asked to stop."""

    def run(self, stop: StopFlag) -> None:  # type: ignore[override]
        f = self.broker
        links, requests, sync, table, inbox = f.links, f.requests, f.sync, f.table, f.inbox
        next_status = next_tick = 0.0
        while not stop.stopping:
            busy = (
                requests.any_unanswered()
                or requests.parked
                or any(link.outbox or link.state is LinkState.SYNCING for link in links)
            )
            if busy:
                timeout = max(0, math.ceil((next_tick - time.monotonic()) * 1000))
            else:
                timeout = _QUIET_POLL_MS
            started = time.monotonic()
            sync.poll(timeout)
            if sync.woken:
                sync.woken = False
                inbox.run()
            for link in links:
                if link.urgent or link.queued >= BATCH_MAX:
                    requests.send(link)
            f.pvlist.post_if_changed()
            table.graveyard.clear()
            now = time.monotonic()
            took_longer(requests, started, timeout / 1000, now)
            if requests.parked:
                requests.unpark(now)
            f.finish_answered()
            if now < next_tick:
                continue
            next_tick = now + _TICK
            self._tick(now)
            f.finish_answered()  # the requests the tick failed (deadlines, links down)
            if now >= next_status or f.status_due:
                self.write_status()
                next_status = now + STATUS_INTERVAL
                f.other_ca_buffer_bytes = ca_buffer_bytes(f.config.run_dir, f.config.brokers)
                f.sweep_operations()
                # After work, as the CA broker does: what the heap holds free goes back.
                h = f.health
                self.freed.after((h.puts, h.creations, h.deletions))
        self.send_queued()
        requests.fail_parked()
        f.finish_answered()

    def _front_tick(self) -> None:
        """The PVA front-end's part of a tick: refused channels' log, an ACF reload."""
        f = self.broker
        f.access.tick()
        f.sync.expire_searched(time.monotonic())
        if f.reload_due:
            f.reload_due = False
            # Read (and its host names looked up) off the loop: see broker/offloop.py.
            f.acf_reload.submit(f.access.reread, f.reinstall_rules)
        f.acf_reload.poll()

    def _status(self) -> dict:
        f = self.broker
        return {
            "role": "pva",
            "pva_port": f.pva_port,
            "channels": len(f.channels),
            # Which process this is, though a new one had the same pid (its refusals are
            # counted anew by the CA brokers).
            "started": f.health.started,
            **f.health.status(),
        }

    def _became_ready(self) -> None:
        f = self.broker
        f.ready = True
        f.quiet_until = None
        f.table.unserved.discard(None)
        self.write_status()
        log.info(
            "ready: %d PVs, %d shards, prefix %s, PVA port %s, interfaces %s",
            f.table.n_real,
            len(f.links),
            f.config.prefix,
            f.pva_port,
            f.interfaces or "all",
        )
