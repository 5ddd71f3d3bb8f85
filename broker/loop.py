"""The broker's loop: CA and the shard links served by one thread.

It runs ``cas.process`` and reads the shard sockets in turn, so every pcaspy call stays
on the thread that runs process() (pcaspy is not thread safe).  With the select hook
(broker/wait.py) CA's select() also wakes on a shard's message or a signal, so the loop
sleeps in it until something is due; without it, it alternates short slices with polls
of the shards.  At most every tick it also sends the queued puts, runs the links' timers
(reconnect, heartbeat, request deadlines), posts coalesced events, writes the status
file and samples health; while nothing happens, only when one of those is due.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from carelay.broker.link import LinkState
from carelay.broker.wait import SelectHook, sleep_for
from carelay.common.config import (
    CLOCK_OFFSET_HIGH,
    HEALTH_INTERVAL,
    READ_SYNC_TIMEOUT,
    STARTUP_QUIET,
    STATUS_INTERVAL,
    ca_interfaces,
    configured_ca_port,
)
from carelay.common.lifecycle import FreedMemory, StopFlag, write_status
from carelay.common.protocol import BATCH_MAX

log = logging.getLogger(__name__)

#: process() slice while nothing waits on a shard but puts are queued for one (seconds).
_IDLE_SLICE = 0.005
#: process() slice while nothing is queued or due either: an idle relay wakes up about
#: ten times a second (CA traffic still ends a slice at once).
_QUIET_SLICE = 0.1
#: How long to poll the shards for answers while requests are in flight (ms).
_BUSY_POLL_MS = 1
#: How often heartbeats, timeouts, link changes and coalesced posts are looked at (s).
_TICK = 0.01
#: The longest single poll while a read waits for answers (ms).
_READ_POLL_MS = 50
#: With the select hook, the longest sleep in CA's select() (s): the clock of what has
#: no due time of its own (the refusal log windows).
_LONGEST_WAIT = 1.0
#: A deadline is past only once the clock is beyond it: timers are looked at this late.
_LATE = 0.001
#: A loop turn this much longer than the sleep it asked for (s): the process did not run
#: (stopped, a paused VM) or its loop was held up, and what it waits for waits as long more.
HELD_UP = 0.5


def took_longer(requests, started: float, slept: float, now: float) -> None:
    """A loop turn began at ``started`` and meant to sleep ``slept`` seconds at most; if it
    ended at ``now`` more than HELD_UP later than that, the requests in flight are given
    the time back (Requests.held_up): the answers a shard sent meanwhile are read before
    any of them is failed for want of one."""
    over = now - started - slept
    if over > HELD_UP:
        requests.held_up(over)


def sends_now(link) -> bool:
    """Whether ``link``'s queue goes right after this CA slice.  What waits for an answer
    goes at once, and so do plain puts that another front-end shows (``link.wanted``): it
    hears of a put only once its shard has applied it.  The other plain puts, which this
    broker's mirror already shows, go in batches of BATCH_MAX or at the next tick."""
    return link.urgent or link.queued >= BATCH_MAX


class Loop:
    """Runs the broker until it is asked to stop."""

    def __init__(self, broker) -> None:
        self.broker = broker
        #: PVs with a coalesced event waiting (see RelayPV.post).
        self.due_posts: set = set()
        #: CA's select() watching the shard sockets too (broker/main.py), or None.
        self.wait: SelectHook | None = None
        self.freed = FreedMemory()

    def run(self, stop: StopFlag) -> None:
        b = self.broker
        links, requests, sync, table = b.links, b.requests, b.sync, b.table
        hook = self.wait
        next_status = next_tick = next_health = next_due = 0.0
        handled = taken = 0
        streaming = False
        while not stop.stopping:
            # With no CA channel attached, no CA client sees the mirror until it attaches,
            # and a read takes what its shard sent first (sync.catch_up): while the shards
            # stream changes (another front-end's puts), they are then taken in batches at
            # most every _TICK, rather than each with a wake and a loop turn of its own.
            # The first change after a quiet tick still wakes the loop at once.
            lazy = streaming and hook is not None and not b.attached_count()
            watching = hook is not None and hook.watch(*(_UNWATCHED if lazy else _sockets(links)))
            waiting = requests.any_unanswered() or any(
                link.state is LinkState.SYNCING for link in links
            )
            queued = self.due_posts or b.turn_posts.held or any(link.outbox for link in links)
            # The hook, armed, lets the loop sleep until something is due.  While CA
            # traffic keeps it from sleeping anyway (answers were handled, puts are
            # queued), short slices alternate with polls of the shards, unhooked; so
            # while answers are due (waiting on the hook for them measured slower for
            # puts with callback one after the other than the 1 ms polls).
            armed = watching and not handled and not queued and not waiting
            # After answers were handled, CA has completions and events to send: no sleep
            # in select() before they go.  Unhooked, while answers are due, the shards are
            # polled briefly instead, since select() cannot see them.
            if armed:
                longest = _TICK if lazy else _LONGEST_WAIT
                delay = sleep_for(time.monotonic(), max(next_due, next_tick), longest)
            elif handled or waiting:
                delay = 0.0
            elif queued:
                delay = _IDLE_SLICE
            else:
                delay = _QUIET_SLICE
            # The events held in the last turn go out in this slice (TurnPosts).
            b.turn_posts.flush()
            if watching:
                hook.arm(armed)
            started = time.monotonic()
            b.cas.process(delay)
            woken = False
            if armed:
                woken, hook.woken = hook.woken, False
            if b.circuits is not None:
                self._watch_circuits()
            for link in links:
                if sends_now(link):
                    requests.send(link)
            if not armed:
                handled = sync.poll(_BUSY_POLL_MS if waiting else 0)
            elif woken or lazy:
                handled = sync.poll(0)
            else:
                # A message that came during the slice wakes the next select at once.
                handled = 0
            if handled:
                streaming = True
                taken += handled
            elif armed and lazy:
                streaming = False  # a tick with no change: the next one wakes the loop
            now = time.monotonic()
            took_longer(requests, started, delay, now)
            if requests.parked:
                requests.unpark(now)
            table.graveyard.clear()
            if now < next_tick:
                continue
            # While nothing happens, only when a timer is due.
            if now < next_due and not (handled or woken or _busy(b, self.due_posts)):
                continue
            # At most every _TICK, not every turn: a turn may carry only a few puts.
            next_tick = now + _TICK
            self._tick(now)
            if now >= next_status or b.status_due:
                self.write_status()
                next_status = now + STATUS_INTERVAL
                # After work: puts, creations, deletions, shard messages, CA requests.
                h, received = b.health, b.circuits.received if b.circuits else 0
                self.freed.after((h.puts, h.creations, h.deletions, taken, received))
            if now >= next_health:
                _update_health(self.broker, now)
                next_health = now + HEALTH_INTERVAL
            next_due = _next_due(b, now, min(next_status, next_health))
        # A clean stop: the puts still queued go to the shards, which stop after us.
        self.send_queued()
        requests.fail_parked()

    def _tick(self, now: float) -> None:
        """What a tick does in every front-end's loop: the queued puts sent, the links'
        timers, the refusal log, the front-end's own part (``_front_tick``), the paced
        events, readiness."""
        b = self.broker
        self.send_queued()
        self._timers(now)
        b.table.refusals.tick()
        b.health.put_refusals.tick()
        self._front_tick()
        if self.due_posts:
            self._post_due(now)
        if not b.ready and all(link.live for link in b.links):
            self._became_ready()
        elif b.quiet_until is not None and now >= b.quiet_until:
            _not_ready_yet(b)

    def _front_tick(self) -> None:
        """The CA broker's part of a tick: refused puts' log, an ACF reload, pvlist."""
        b = self.broker
        if b.denied_puts is not None:
            b.denied_puts.tick()
        b.tick_hooks()
        if b.reload_due:
            b.reload_access()
        b.acf_reload.poll()
        b.pvlist.post_if_changed()

    def send_queued(self) -> None:
        """Send whatever is queued for each shard."""
        for link in self.broker.links:
            if link.outbox:
                self.broker.requests.send(link)

    def serve_until(self, shards_waited_for: Callable[[], set[int]], what: str) -> None:
        """Serve the shards until ``shards_waited_for`` names none (bounded by
        READ_SYNC_TIMEOUT): a CA read that waits so that it shows the changes in flight.
        ``what`` names the read in the log line of one that could not wait for them."""
        b = self.broker
        deadline = time.monotonic() + READ_SYNC_TIMEOUT
        while shards := shards_waited_for():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("read of %s answered before shards %s confirmed it", what, shards)
                return
            for k in shards:
                b.requests.send(b.links[k])
            b.sync.poll(min(left * 1000, _READ_POLL_MS))

    def _post_due(self, now: float) -> None:
        for pv in list(self.due_posts):
            if pv.post_due(now):
                self.due_posts.discard(pv)

    def _timers(self, now: float) -> None:
        b = self.broker
        requests, sync = b.requests, b.sync
        for link in b.links:
            k = link.index
            was_usable = link.usable
            gone = False
            # A link that goes down keeps its socket for the answers the shard still owes.
            in_flight = bool(requests.unanswered[k])
            if link.lost_writes:
                link.went_down("puts could not be sent", park=in_flight)
                action = "down"
            elif link.not_served:
                link.went_down(
                    f"it no longer serves this connection: {link.not_served}", park=in_flight
                )
                action = "down"
            elif link.disconnected():
                if link.local:
                    sync.drain(link)  # what the shard answered before it closed
                    gone = True
                link.went_down("disconnected", park=in_flight and not gone)
                action = "down"
            else:
                action = link.tick(now, in_flight)
            if action == "hello":
                sync.hello(link)
            elif action == "ping":
                sync.ping(link)
            elif action == "down" and was_usable:
                sync.link_down(link, gone)
            requests.expire(k, now)
            if link.parked and not requests.orphans[k]:
                link.close_parked()

    def _watch_circuits(self) -> None:
        """Right after each process() slice, so that a circuit over max_clients is closed
        before PCAS reads from it; a failure is logged, never fatal."""
        b = self.broker
        try:
            b.circuits.poll()
        except Exception:
            log.exception("watching the CA circuits failed; they go unwatched")
            b.circuits = None

    # -- status, readiness and health ------------------------------------------------------

    def write_status(self) -> None:
        """The front-end's status file: its own part (``_status``), its PVs, whether it
        is ready, each shard link's state, and the clock of a shard that keeps no time
        with this host's."""
        b = self.broker
        b.status_due = False
        shards = []
        for link in b.links:
            shard = {"index": link.index, "state": link.state.value, "pvs": link.pvs}
            offset = b.requests.clocks[link.index].offset
            # Whole seconds, and only when off: a file rewritten for each PONG's jitter
            # would cost a write a second.
            if abs(offset) > CLOCK_OFFSET_HIGH:
                shard["clock_offset"] = round(offset)
            shards.append(shard)
        status = {
            **self._status(),
            "pvs": b.table.n_real,
            "followed": len(b.sync.followed),
            "ready": b.ready,
            "shards": shards,
        }
        write_status(b.status_path, status)

    def _status(self) -> dict:
        b = self.broker
        door = b.health.peers.door(b.health.snapshot) if b.health.peers else None
        return {"role": "broker", "ca_port": b.ca_port, "door": door}

    def _became_ready(self) -> None:
        """Every shard is in sync: say so, with the CA port the server really listens on
        (PCAS takes another one when the configured port is taken)."""
        b = self.broker
        b.ready = True
        b.quiet_until = None
        b.table.unserved.discard(None)
        ports = _served_ports(b)
        b.ca_port = ports[0] if ports else None
        # Status says so before the log does: who reads "ready:" may ask it at once.
        self.write_status()
        log.info(
            "ready: %d PVs, %d shards, prefix %s, control PVs %s %s, data directory %s, "
            "interfaces %s, CA port %s",
            b.table.n_real,
            len(b.links),
            b.config.prefix,
            b.config.pvlist_name,
            b.config.delpv_name,
            b.config.data_dir.resolve(),
            " ".join(ca_interfaces()) or "all",
            ", ".join(map(str, ports)) or "unknown",
        )
        if b.table.n_real > b.config.max_pvs:
            # Stored before the bound was lowered, or written into stopped stores: all
            # served, and no new one until they are fewer than max_pvs.
            log.warning(
                "%d PVs stored, more than max_pvs (%d): every one is served, and no new PV "
                "is created until fewer are",
                b.table.n_real,
                b.config.max_pvs,
            )


def _update_health(b, now: float) -> None:
    """Take the health figures and set the health PVs (posting only what changed)."""
    b.health_pvs.update(b.health.sample(b, now), b.health.errors)


def _not_ready_yet(b) -> None:
    """Start-up takes long: say which shards it waits for, and from now on each one that
    gets in sync."""
    b.quiet_until = None
    synced = [f"shard {link.index} in sync" for link in b.links if link.live]
    waiting = [f"shard {link.index}" for link in b.links if not link.live]
    log.info(
        "not ready after %g s: %s; waiting for %s",
        STARTUP_QUIET,
        ", ".join(synced) or "no shard in sync",
        ", ".join(waiting),
    )


def _served_ports(b) -> list[int]:
    """The CA ports the broker's server listens on; a warning when the configured one
    was taken."""
    ports = b.ca_ports
    configured = configured_ca_port()
    if not ports:
        ports = [int(configured)] if configured.isdigit() else []
    if ports and str(ports[0]) != configured:
        log.warning("CA port %s is taken; serving on %s", configured, ports[0])
    return ports


#: What the select hook watches of the shards while no CA channel is attached (``lazy``).
_UNWATCHED: tuple[tuple, tuple] = ((), ())


def _sockets(links) -> tuple[tuple, tuple]:
    """The shard sockets the select hook watches: the links' own and parked ones (a send
    may have taken a message's signal), and their monitors."""
    return (
        tuple(sock for link in links for sock in link.answering()),
        tuple(link.monitor for link in links if link.monitor is not None),
    )


def _busy(b, due_posts) -> bool:
    """Whether the tick has work at once (not only at a timer's due time)."""
    return bool(
        due_posts
        or b.requests.parked
        or b.status_due
        or b.reload_due
        or b.acf_reload.busy
        or not b.ready
        or any(
            link.outbox or link.lost_writes or link.not_served or not link.due() for link in b.links
        )
    )


def _next_due(b, now: float, soft: float) -> float:
    """When the tick next has work while nothing happens: the links' timers, the first
    request deadline, or _LONGEST_WAIT from ``now``.  ``soft`` (status, health) waits for
    the next heartbeat's tick, if one comes: an idle broker wakes once for all."""
    due = now + _LONGEST_WAIT
    if not any(link.usable for link in b.links):
        due = min(due, soft)
    for link in b.links:
        due = min(due, link.due() + _LATE)
    for waiting in (*b.requests.unanswered, *b.requests.orphans):
        if waiting:
            due = min(due, next(iter(waiting.values())).deadline + _LATE)
    return due
