"""ShardLink: the broker's connection to one shard.

A DEALER socket with ZMQ_IMMEDIATE, so nothing queues for a shard that is
not connected and a put to it fails at once.  Heartbeats both ways (PING
answered by PONG), capped exponential back-off on reconnect, and resync by
snapshot (HELLO, then SNAPSHOT_BEGIN / SNAPSHOT... / SNAPSHOT_END, then the
updates that follow in sequence order).
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from carelay.broker.linkstate import LinkState, LinkTimers, WantedPvs
from carelay.common.keys import (
    BROKER_CERT,
    HANDSHAKE_FAILED,
    SHARD_CERT,
    FailedHandshakes,
    KeysError,
    load_keys,
)
from carelay.common.messages import Message, Write
from carelay.common.protocol import (
    BATCH_MAX,
    ProtocolError,
    WriteRun,
    batches,
    decode_batch,
    encode_batch,
    send_frames,
)
from carelay.common.sharding import shard_for

log = logging.getLogger(__name__)

#: zmq.POLLIN as a plain int: ``events & zmq.POLLIN`` would build a flag object each time.
_POLLIN = int(zmq.POLLIN)
#: Names ``own_writes`` holds before an APPLIED walks it for those applied.
OWN_WRITES_MIN = 4096


class ShardLink:
    """One shard's socket, liveness and back-off; knows nothing about CA."""

    def __init__(
        self, ctx: zmq.Context, index: int, endpoint: str, curve: tuple | None = None
    ) -> None:
        self.ctx = ctx
        #: (our public, our secret, the shards' public) CurveZMQ keys, or None.
        self.curve = curve
        self.index = index
        self.endpoint = endpoint
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.handshakes = FailedHandshakes(
            log,
            "shard %d at %s: the CurveZMQ handshake failed (%s): do this host's keys_dir "
            "and the shard's hold the same keys, made by one `carelay keys`?",
            f"shard {index}: {{count}} more failed handshakes in the last {{window:.0f}} s",
            index,
            endpoint,
        )
        #: Sockets of earlier connections whose requests were in flight when the link went
        #: down: kept open so that the shard's answers to them still come (see
        #: Requests.orphans).
        self.parked: list[zmq.Socket] = []
        #: The parked socket of the connection last taken down, until a new one is opened:
        #: what it carried was the link's latest, so a request refused on it unapplied can
        #: still go again in its place (see ShardSync._orphan_refused).
        self.last_parked: zmq.Socket | None = None
        #: Messages (and WriteRuns) waiting for the next ``send_queued``; how many puts they
        #: hold; whether one waits for an answer or puts to a ``wanted`` PV (go at once).
        self.outbox: list = []
        self.queued = 0
        self.urgent = False
        self.wanted = WantedPvs()
        self.state = LinkState.DOWN
        self.epoch = 0
        self.pvs = 0
        #: Back-off, connection deadline, heartbeat.
        self.timers = LinkTimers()
        self.ever_synced = False
        #: When the link last stopped being usable (monotonic): puts wait a grace from then.
        self.down_since = 0.0
        #: WRITEs the mirror shows could not be sent: the link must resync.
        self.lost_writes = False
        #: Why the shard no longer serves this connection (a REJECT said so; see
        #: common.messages.NOT_SERVED): the link must reconnect and resync.  "" if it does.
        self.not_served = ""
        #: WRITEs queued on this connection, and how many of them the shard has applied
        #: (its APPLIED); per PV, the count at its last WRITE.  A change another broker
        #: caused that comes while this broker's own later WRITE is not applied must not
        #: move the mirror back (see ShardSync).
        self.writes = 0
        self.writes_applied = 0
        self.own_writes: dict[str, int] = {}
        #: Past this many names, an APPLIED drops those whose WRITEs are all applied.
        self.own_writes_bound = OWN_WRITES_MIN
        #: PVs whose coming restatement (after a refused WRITE) predates a later WRITE of
        #: this connection's own, which the mirror shows already (see ShardSync._reject).
        self.stale_restate: set[str] = set()
        #: The place among this connection's WRITEs of each WRITE with a request number,
        #: until the shard answers it (an ACK, or a REJECT even past its deadline).
        self.write_places: dict[int, int] = {}

    @property
    def state(self) -> LinkState:
        return self._state

    @state.setter
    def state(self, state: LinkState) -> None:
        # Read for every put and every event: kept as plain attributes.
        self._state = state
        #: The shard is in sync.
        self.live = state is LinkState.LIVE
        #: Requests can be sent: the shard answers, even if a resync is under way.
        self.usable = state in (LinkState.LIVE, LinkState.SYNCING)

    def open(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # Told at once when the shard goes away, instead of at the heartbeat timeout; and
        # of a handshake that fails, which would otherwise look like a shard not there.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        sock.connect(self.endpoint)
        self.sock = sock
        self.last_parked = None
        self.writes = self.writes_applied = 0  # the shard counts per connection
        self.own_writes.clear()
        self.own_writes_bound = OWN_WRITES_MIN
        self.stale_restate.clear()
        self.write_places.clear()
        self.state = LinkState.CONNECTING
        self.timers.connecting(time.monotonic())

    def close(self, linger: int = 0, park: bool = False) -> None:
        """Close the socket; ``linger``: ms that ZeroMQ may take to send what was sent.
        ``park``: keep it open among ``parked``, only to receive."""
        self.outbox.clear()
        self.queued = 0
        self.urgent = False
        if self.sock is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
            self.last_parked = self.sock if park else None
            if park:
                self.parked.append(self.sock)
            else:
                self.sock.close(linger=linger)
            self.sock = None

    def answering(self) -> list[zmq.Socket]:
        """The sockets the shard's answers come on: the link's and the parked ones."""
        socks = [self.sock] if self.sock is not None else []
        return socks + self.parked if self.parked else socks

    @property
    def monitor(self) -> zmq.Socket | None:
        """The socket that tells of the connection breaking (read to the end each tick)."""
        return self._monitor

    def close_parked(self) -> None:
        for sock in self.parked:
            sock.close(linger=0)
        self.parked.clear()
        self.last_parked = None

    @property
    def local(self) -> bool:
        """An ipc endpoint: a connection that closes means the shard process closed it (it
        stopped or died), and it takes nothing more from that connection."""
        return self.endpoint.startswith("ipc://")

    def disconnected(self) -> bool:
        """Whether the connection to the shard broke since the last look."""
        if self._monitor is None:
            return False
        broke = False
        # Cheaper than the zmq.Again that a receive on an empty socket raises.
        while self._monitor.get(zmq.EVENTS) & _POLLIN:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return broke
            if event["event"] == zmq.EVENT_DISCONNECTED:
                broke = True
            elif event["event"] & HANDSHAKE_FAILED:
                self.handshakes.heard(event)
        return broke

    def forget_applied_writes(self) -> None:
        """Drop from ``own_writes`` the PVs whose last WRITE the shard has applied: only a
        later one matters (see ShardSync._change).  Done when the record has doubled since
        the last time, so each name costs a constant share of the walks."""
        applied = self.writes_applied
        self.own_writes = {n: w for n, w in self.own_writes.items() if w > applied}
        self.own_writes_bound = max(OWN_WRITES_MIN, 2 * len(self.own_writes))

    def queue(self, msg: Message) -> None:
        """Queue ``msg`` for the next ``send_queued``, which sends the queue as batches.  A message
        that waits for an answer (``req``) makes the queue urgent."""
        self.outbox.append(msg)
        self.queued += 1
        if msg.req:
            self.urgent = True

    def queue_write(self, name: str, req: int, stamp: float, data, expires: float = 0.0) -> None:
        """Queue a Write message; one-element ones join the run at the end of the queue.  A
        Write that waits for an answer (``req``) carries its ``expires``; a run carries the
        earliest of its Writes'."""
        self.writes += 1
        self.own_writes[name] = self.writes
        if req:  # its place: a refusal's restatement is older than a later WRITE (ShardSync)
            self.write_places[req] = self.writes
        self.urgent = self.urgent or name in self.wanted
        if data.shape[0] != 1:
            self.queue(Write(name, req, stamp, data, expires if req else 0.0))
            return
        run = self.outbox[-1] if self.outbox else None
        if type(run) is not WriteRun or run.dtype != data.dtype or len(run) >= BATCH_MAX:
            run = WriteRun(data.dtype)
            self.outbox.append(run)
        run.add(name, req, stamp, data)
        self.queued += 1
        if req:
            self.urgent = True
            if not run.expires:
                run.expires = expires

    def send_queued(self) -> list:
        """Send everything queued, in order and without blocking; returns the messages
        that could not go (the shard is not connected, or its queue is full)."""
        out, self.outbox = self.outbox, []
        self.queued = 0
        self.urgent = False
        if not out:
            return []
        if self.sock is None:
            return out
        sent = 0
        try:
            for batch in batches(out):
                frames = encode_batch(batch)
                send_frames(self.sock, frames, zmq.NOBLOCK)
                sent += len(batch)
        except zmq.Again:
            pass
        except zmq.ZMQError as e:
            log.warning("shard %d: send failed: %s", self.index, e)
        return out[sent:]

    def send(self, msg: Message) -> bool:
        """Send ``msg`` now, after anything queued; False when it cannot go now."""
        self.queue(msg)
        return not self.send_queued()

    def recv(self, ready: bool = False) -> list[Message] | None:
        """The messages of one batch, or None when nothing is waiting.  Malformed batches
        are dropped whole.  ``ready``: a poll just found the socket readable."""
        if self.sock is None:
            return None
        msgs = self.recv_from(self.sock, ready)
        if msgs is not None:
            self.timers.heard(time.monotonic())
        return msgs

    def recv_from(self, sock: zmq.Socket, ready: bool = False) -> list[Message] | None:
        """The messages of one batch waiting on ``sock`` (the link's socket, or one it keeps
        from an earlier connection), or None when nothing is waiting; a malformed batch is
        dropped whole, with a log line.  ``ready``: a poll just found ``sock`` readable, so
        the first receive need not ask first."""
        while True:
            # Cheaper than the zmq.Again that a receive on an empty socket raises; after
            # a poll that found the socket readable, a question answered already (each
            # costs system calls: libzmq looks at the socket's commands first).
            if not ready and not sock.get(zmq.EVENTS) & _POLLIN:
                return None
            ready = False
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                return decode_batch(frames)
            except ProtocolError as e:
                log.warning("shard %d: dropped a malformed message: %s", self.index, e)

    def went_down(self, why: str, park: bool) -> None:
        """Drop the socket (``park``: keep it for the answers to the requests in flight)
        and schedule a reconnect with back-off."""
        was = self.state
        self.lost_writes = False
        self.not_served = ""
        self.timers.asked_at = None
        self.close(park=park)
        self.state = LinkState.DOWN
        backoff = self.timers.retry_later(time.monotonic())
        level = (
            logging.WARNING
            if self.ever_synced or was is not LinkState.CONNECTING
            else logging.DEBUG
        )
        log.log(level, "shard %d unreachable (%s); retrying in %.2f s", self.index, why, backoff)

    def synced(self, epoch: int, pvs: int) -> None:
        self.state = LinkState.LIVE
        self.epoch = epoch
        self.pvs = pvs
        self.timers.synced()
        self.ever_synced = True

    def tick(self, now: float, in_flight: bool) -> str | None:
        """Advance timers.  Returns "hello" or "ping" when one should be sent, "down" when
        the link just went down (``in_flight``: the shard owes answers, so its socket is
        kept for them), else None."""
        action = self.timers.action(self.state, now)
        if action == "open":
            self.open()
            self.timers.last_heard = now
            return "hello"
        if action == "no heartbeat" and self.waiting():
            # It spoke, and this process has not read it yet: the loop was held up (a
            # large snapshot of another shard), not the shard.  Read at the next poll.
            return None
        if action == "no connection" or action == "no heartbeat":
            self.went_down(action, park=in_flight)
            return "down"
        return action

    def waiting(self) -> bool:
        """Messages from the shard wait on the socket, unread."""
        sock = self.sock
        return sock is not None and bool(sock.get(zmq.EVENTS) & _POLLIN)

    def due(self) -> float:
        """When ``tick`` next has something to do (monotonic); 0.0: at every tick."""
        return self.timers.due(self.state)

    def hello_sent(self) -> None:
        self.state = LinkState.SYNCING
        self.wanted.clear()
        now = time.monotonic()
        self.timers.last_heard = now
        self.timers.asked_at = now  # the snapshot answers it


def shard_links(ctx: zmq.Context, config) -> list[ShardLink]:
    """A front-end's link to each shard of ``config``, with the front-ends' CurveZMQ keys
    where ``keys_dir`` is set (KeysError when the secret key is missing)."""
    curve = None
    if config.keys_dir is not None:
        public, secret = load_keys(config.keys_dir, BROKER_CERT)
        if secret is None:
            raise KeysError(f"{config.keys_dir / (BROKER_CERT + '.key_secret')} is missing")
        curve = (public, secret, load_keys(config.keys_dir, SHARD_CERT)[0])
    return [ShardLink(ctx, k, config.shard_endpoint(k), curve) for k in range(config.shards)]


def link_for(links: list[ShardLink], name: str) -> ShardLink:
    """The link to the shard that owns PV ``name`` (a base name, without a field)."""
    return links[shard_for(name, len(links))]
