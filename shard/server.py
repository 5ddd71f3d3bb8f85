"""The shard process: a ZeroMQ ROUTER loop around a ShardStore and its autosave.

The loop takes a batch of messages, lets the admission drop what comes from peers it
does not serve, hands the rest to the request handler in order and collects the
replies; if the batch created or deleted PVs, it commits those to the autosave first
(one transaction for the batch) and only then sends the replies, so a creation or
deletion is durable before it is acknowledged.  Changed values are flushed every
``autosave_period`` and on a clean stop.

Every applied change goes to each broker served, in the order applied, whichever one
asked for it (its sender gets the answer, the others the change with no request number),
on the one ROUTER socket: one ordered stream per broker, with its HELLO and snapshot.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from carelay.common import exits, protocol
from carelay.common.config import (
    HEARTBEAT_INTERVAL,
    PEER_SILENCE,
    REFUSAL_LOG_LINES,
    REFUSAL_LOG_WINDOW,
    SHARD_FD_LIMIT,
    SHARD_HANDSHAKE_MS,
    SHOWN_WAIT,
    Config,
)
from carelay.common.keys import (
    BROKER_CERT,
    HANDSHAKE_FAILED,
    SHARD_CERT,
    FailedHandshakes,
    KeysError,
    load_keys,
)
from carelay.common.lifecycle import (
    FreedMemory,
    StopFlag,
    bound_malloc,
    die_with_parent,
    drain_wakeup_fd,
    first_start_under_supervisor,
    fit_fd_limit,
    settle_gc,
    signal_wakeup_fd,
    write_status,
)
from carelay.common.logbudget import LogBudget, shorten
from carelay.common.messages import Applied, Message, Ping, Write
from carelay.common.runlock import holders, run_token
from carelay.shard.admission import Admission
from carelay.shard.autosave import Autosave, StoreHealth
from carelay.shard.follow import Follows
from carelay.shard.gate import ReadGate
from carelay.shard.handler import RequestHandler
from carelay.shard.outbox import Outbox
from carelay.shard.persist import ShardDatabase, StoreDamaged, lock_path, lock_store
from carelay.shard.store import ShardStore
from carelay.shard.timers import BUSY_WAIT_MS, ShardTimers, wait_ms

log = logging.getLogger(__name__)

#: Messages queued for one front-end (its ZeroMQ pipe) before it is taken for gone: a
#: front-end that reads nothing (hung, stopped, its host vanished) is dropped there, and
#: must resync once it reads again; the shard never waits for it.
SEND_HWM = 100_000

#: About the most messages handled before one commit and the replies.
_BATCH = 1000
#: On a clean stop, how long the shard waits for more messages before its last flush (ms).
_STOP_DRAIN_MS = 50
#: ... and how long it reads them in all (s): a front-end that goes on sending (a broker
#: on another host, which the supervisor does not stop first) must not keep the shard
#: from its last flush past STOP_GRACE, when it is killed with what it has not saved.
_STOP_DRAIN_LIMIT = 0.5
#: zmq.POLLIN as a plain int: ``events & zmq.POLLIN`` would build a flag object each time.
_POLLIN = int(zmq.POLLIN)
#: Exit status of a shard that cannot open its store (the supervisor shows it failing).
EXIT_STORE_FAILED = exits.STORE_FAILED
#: Exit status of a shard that stopped with values it could not save.
EXIT_UNSAVED = exits.UNSAVED
#: Exit status of a shard whose store another process holds.
EXIT_IN_USE = exits.REFUSED


class ShardServer:
    """Serves one shard's store to the broker over a ROUTER socket."""

    def __init__(
        self,
        config: Config,
        index: int,
        ctx: zmq.Context | None = None,
        db: ShardDatabase | None = None,
        token: str | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.endpoint = config.shard_endpoint(index)
        self.store = ShardStore(
            config.prefix,
            config.max_elements,
            config.max_name_length,
            field_defaults=config.fields,
        )
        self.db = db
        # A start id that differs from any earlier run's: a broker that sees it
        # change knows this shard restarted and resyncs.
        self.epoch = random.getrandbits(62) | 1
        self.health = StoreHealth(index, config.autosave_period, db.path if db else None)
        #: When the socket was last read empty, and the next look for hung front-ends
        #: (monotonic s; see ``drop_silent_peers``).
        self.drained_at = time.monotonic()
        self._next_peer_check = 0.0
        #: The socket's monitor, which tells of a failed CurveZMQ handshake (see bind).
        self._handshake_monitor: zmq.Socket | None = None
        self.handshakes = FailedHandshakes(
            log,
            "a connection failed its CurveZMQ handshake (%s): a front-end whose keys_dir "
            "holds keys of another `carelay keys`, or no front-end",
            "{count} more connections failed their handshake in the last {window:.0f} s",
        )
        #: Malformed messages, which any peer that reaches the socket can send.
        self.malformed_log = LogBudget(
            REFUSAL_LOG_LINES,
            REFUSAL_LOG_WINDOW,
            "dropped {count} more malformed messages in the last {window:.0f} s, not logged "
            "one by one, e.g. {example}",
            log,
        )
        self.autosave = Autosave(self.store, db, self.health, index)
        self.gate = gate = ReadGate(self.epoch, SHOWN_WAIT)
        follows = Follows(self.epoch)
        self.outbox = Outbox(lambda: self.admission.peers(), self._lost, self.epoch, gate, follows)
        self.admission = Admission(
            token, self.outbox.reply, self.epoch, follows, required=config.keys_dir is None
        )
        self.admission.on_drop = gate.forget
        self.requests = RequestHandler(
            self.store,
            self.autosave,
            self.health,
            self.outbox.reply,
            self._commit,
            self.epoch,
            publish=self.outbox.publish,
            others={**gate.handlers(), **follows.handlers()},
        )
        follows.answer, self.requests.heard = self.requests.restate, follows.heard
        follows.tell, follows.peers = self.outbox.reply, self.admission.peers
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None
        self.timers = ShardTimers(config.autosave_period, good_copy=db is not None)
        #: Batches of messages other than a lone PING: what returning freed memory follows.
        self.work = 0
        self.freed = FreedMemory()
        #: (seq, PVs, last flush) when the status file was last written.
        self._status_said: tuple | None = None
        self._broker_peer: bytes | None = None
        #: The pipe signals write to (``wake_on_signals``): a stop ends a wait at once.
        self._wake_fd: int | None = None
        #: Told to stop: its front-ends stop first, and a broker gone is no surprise.
        self.stopping = False
        self.status_path = config.run_dir / f"shard-{index}.json"

    def load(self) -> None:
        """Take the PVs saved in the autosave."""
        if self.db is None:
            return
        rows = self.db.open()
        rows.reverse()
        # Each row is let go of once taken: the autosave and the store are not both held.
        skipped = self.store.load(rows.pop() for _ in range(len(rows)))
        for name in skipped:
            log.warning(
                "%s in %s is not served under this configuration; kept as is",
                name,
                self.db.path,
            )
        log.debug("loaded %d PVs from %s", len(self.store), self.db.path)

    # -- the socket -------------------------------------------------------------

    def bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        sock = self._ctx.socket(zmq.ROUTER)
        if self.config.keys_dir is not None:
            self._auth = _curve_server(self._ctx, sock, self.config.keys_dir)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.HANDSHAKE_IVL, SHARD_HANDSHAKE_MS)
        sock.bind(self.endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        if self.config.keys_dir is not None:
            # A front-end with other keys fails its handshake before any message: only
            # the socket's monitor tells.
            self._handshake_monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
            self._poller.register(self._handshake_monitor, zmq.POLLIN)
        log.debug("listening on %s (epoch %x)", self.endpoint, self.epoch)

    def close(self) -> None:
        if self._handshake_monitor is not None:
            self._sock.disable_monitor()
            self._handshake_monitor.close(linger=0)
            self._handshake_monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._poller = None
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
            self._auth = None

    # -- messages in, replies out -------------------------------------------------

    def handle(self, peer: bytes, frames: list) -> int:
        """Handle one message or batch from ``peer``; returns how many messages.  Bad input
        is logged and dropped whole."""
        try:
            msgs = protocol.decode_batch(frames, to_shard=True)
        except protocol.ProtocolError as e:
            if self.malformed_log.allow(shorten(str(e))):
                log.warning("dropped a malformed message: %s", e)
            return 0
        admission = self.admission
        if peer not in admission:
            if not admission.admit(peer, msgs):
                late = admission.take_late()
                if late:
                    self.requests.write_late(peer, late)
                    self.work += 1
                return 0
            fanout = len(admission) > 1
            if fanout and not self.requests.fanout:
                self._tell_writes_applied()
            self.requests.fanout = fanout
        self._broker_peer = peer
        now = time.monotonic()
        admission.heard(peer, now)
        if self.timers.heard(now):
            log.debug("broker connected")
        requests = self.requests
        if len(msgs) > 1 or type(msgs[0]) is not Ping:
            self.work += 1
        n = writes = 0
        pinged = False
        for msg in msgs:
            kind = type(msg)
            if kind is protocol.WriteRun:
                requests.write_run(peer, msg)
                n += len(msg)
                writes += len(msg)
            else:
                requests.dispatch(peer, msg)
                n += 1
                writes += kind is Write
                pinged = pinged or kind is Ping
        if writes:
            total = admission.wrote(peer, writes)
            if requests.fanout:
                self.outbox.applied(peer, Applied(total, self.store.seq, self.epoch))
        if pinged and not requests.fanout:
            # Alone, a front-end hears with its PONGs which of its WRITEs are applied, so
            # that it can forget them (ShardSync._applied); else its record of them kept
            # every name it ever wrote.
            written = admission.written(peer)
            if written:
                self.outbox.applied(peer, Applied(written, self.store.seq, self.epoch))
        return n

    def drop_silent_peers(self) -> None:
        """Stop serving the front-ends that sent nothing for PEER_SILENCE before the socket
        was last read empty.  A front-end PINGs twice a second: one that sends nothing
        is hung (stopped, its host gone), and what is published to it waits in this
        process's memory, as much as the others' puts bring (a stopped PVA front-end
        following a 100,000-element array grew its shard by 1 GB in 20 s).  Measured to
        the last time every message that had come was read, not to now: after a stall of
        the shard's own, the PINGs waiting on its socket say the front-ends are alive.
        It resyncs when it comes back (its PINGs are not answered, and it reconnects)."""
        admission = self.admission
        silent = admission.silent(self.drained_at - PEER_SILENCE)
        for peer in silent:
            admission.drop_silent(peer)
            log.warning(
                "a broker sent nothing for %.0f s, not even a PING: no longer served (what "
                "is published to a hung one waits in this shard's memory); it resyncs when "
                "it comes back",
                PEER_SILENCE,
            )
        if silent:
            self.requests.fanout = len(admission) > 1

    def _tell_writes_applied(self) -> None:
        """A second front-end is served now: each one that wrote while alone hears that
        its WRITEs so far are applied (none was told, with no one to publish to), before
        any change of the newcomer's reaches it; else it would take such a change for one
        older than its own writes, and skip it (see ShardSync._change)."""
        admission = self.admission
        for peer in admission.peers():
            written = admission.written(peer)
            if written:
                self.outbox.applied(peer, Applied(written, self.store.seq, self.epoch))

    @property
    def _out(self) -> list[tuple[bytes, Message]]:
        """The replies and published changes of the batch, not sent yet."""
        return self.outbox.items

    def _commit(self) -> None:
        """Make the batch's creations, deletions and field changes durable before their
        replies go; the replies about those that could not be become REJECTs.  A PV deleted
        and created again in the batch, both undone, is restated to every front-end: one
        that wrote to the new PV through its mirror then shows what the shard holds."""
        unsaved = self.autosave.commit()
        if unsaved is None:
            self.requests.log_created()
            self.requests.process_after_fields()
            return
        self.outbox.refuse(unsaved.undone, unsaved.error)
        self.requests.log_created(unsaved.names)
        self.requests.process_after_fields(unsaved.names)
        for name in unsaved.restate:
            for peer in self.admission.peers():
                self.requests.restate(peer, name)

    def _send_replies(self) -> None:
        self.outbox.send(self._sock)

    def _lost(self, peer: bytes, n: int, error: zmq.ZMQError) -> None:
        """``n`` messages could not go to ``peer``: it has missed changes, so it is no
        longer served (see Admission.drop)."""
        if peer in self.admission:
            self.admission.drop(peer)
            self.requests.fanout = len(self.admission) > 1
            if self.stopping or getattr(error, "errno", None) == zmq.EHOSTUNREACH:
                # Its connection closed: a broker that stopped (on a clean stop the brokers
                # go first) or died, which the supervisor tells of.  Said, not warned of.
                log.info("a broker is gone (%s): no longer served until it connects again", error)
            else:
                log.warning("cannot send %d messages to a broker (%s); it must resync", n, error)

    # -- the loop -----------------------------------------------------------------

    def _write_status(self) -> None:
        write_status(self.status_path, _status(self))

    def wake_on_signals(self) -> None:
        """A signal ends the wait for messages at once (main thread, after ``bind``)."""
        self._wake_fd = signal_wakeup_fd()
        self._poller.register(self._wake_fd, zmq.POLLIN)

    def serve_once(self, timeout_ms: int = BUSY_WAIT_MS) -> int:
        """Handle one batch of messages: apply, commit, reply.  Returns how many."""
        self.health.check(time.monotonic())
        events = self._poller.poll(timeout_ms)
        if not events:
            return 0
        # Only when a signal wrote: a look at an empty pipe costs a system call per batch.
        if self._wake_fd is not None and any(s == self._wake_fd for s, _ in events):
            drain_wakeup_fd(self._wake_fd)
        monitor = self._handshake_monitor
        if monitor is not None and any(s is monitor for s, _ in events):
            self._failed_handshakes()
        n = 0
        # The poll found the socket readable: its first receive need not ask (each
        # question costs system calls: libzmq looks at the socket's commands first).
        sock = self._sock
        ready = any(s is sock for s, _ in events)
        while n < _BATCH:
            if not ready and not sock.get(zmq.EVENTS) & _POLLIN:
                self.drained_at = time.monotonic()
                break
            ready = False
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.drained_at = time.monotonic()
                break
            n += 1
            if len(frames) >= 2:
                n += self.handle(bytes(frames[0].buffer), frames[1:])
        self._commit()
        self._send_replies()
        return n

    def _failed_handshakes(self) -> None:
        """Say, within a log budget, that connections failed their CurveZMQ handshake."""
        while True:
            try:
                event = recv_monitor_message(self._handshake_monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handshakes.heard(event)

    def serve(self, stop: StopFlag) -> bool:
        """Serve until ``stop``; False when the last flush left values unsaved."""
        autosave = self.autosave
        timers = self.timers
        timers.start(time.monotonic())
        timeout_ms = 0
        while not stop.stopping:
            self.serve_once(timeout_ms)
            now = time.monotonic()
            # The summaries of log budgets whose window is over, with no message to wait for.
            self.malformed_log.tick()
            self.requests.tick()
            if now >= self._next_peer_check:
                self._next_peer_check = now + HEARTBEAT_INTERVAL
                self.drop_silent_peers()
            if timers.flush_due(now) or autosave.saving_parts:
                autosave.flush_soon()
            if timers.copy_due(now):
                autosave.refresh_good_copy_soon()
            if timers.went_quiet(now):
                log.warning("broker went quiet")
            if self.health.status_due and self._broker_peer is not None:
                # The store's state changed: the brokers hear it now, not at the next PING.
                for peer in self.admission.peers():
                    self.requests.pong(peer, 0)
                self._send_replies()
            if self.gate.expire(now):
                self._send_replies()
            flushed = self.db.last_flush if self.db else None
            said = (self.store.seq, len(self.store), flushed, self.admission.follows.count)
            if timers.status_due(now, self.health.status_due, said != self._status_said):
                self.health.status_due = False
                self._status_said = said
                self._write_status()
                # Only after work: a heartbeat frees nothing worth giving back.
                self.freed.after(self.work)
            # A failed store's refusal is timed, a flush in parts goes on by itself, and
            # without the signal pipe a stop is seen only after the wait.
            busy = bool(self._wake_fd is None or self.health.store_error or autosave.saving_parts)
            timeout_ms = wait_ms(now, min(timers.due(autosave.unsaved), self.gate.due()), busy)
        self.stopping = True
        # What the broker sent before it stopped (it stops first) is applied and saved;
        # what a front-end still sends after the limit is not read (its puts fail).
        end = time.monotonic() + _STOP_DRAIN_LIMIT
        while self.serve_once(timeout_ms=_STOP_DRAIN_MS) and time.monotonic() < end:
            pass
        return autosave.stop()


class _FrontEndKey:
    """Admits a CurveZMQ peer holding the front-ends' key (``broker.key``) alone (a peer
    refused is said by the socket's monitor: see ShardServer.bind).  Called on the
    authenticator's thread."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


def _curve_server(ctx: zmq.Context, sock: zmq.Socket, keys_dir: Path):
    """Make ``sock`` a CurveZMQ server: encrypted, and only peers holding the front-ends'
    key from ``keys_dir`` get in.  Returns the authenticator, which runs until stopped."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_keys(keys_dir, SHARD_CERT)
    if secret is None:
        raise KeysError(f"{keys_dir / (SHARD_CERT + '.key_secret')} is missing")
    front_end_key = load_keys(keys_dir, BROKER_CERT)[0]
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve_callback(domain="*", credentials_provider=_FrontEndKey(front_end_key))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    except BaseException:
        auth.stop()
        raise
    log.info("CurveZMQ keys from %s", keys_dir)
    return auth


def _status(server: ShardServer) -> dict:
    """What a shard's status file says."""
    health, db = server.health, server.db
    refusing = bool(health.refusing)
    return {
        "role": f"shard {server.index}",
        "pvs": len(server.store),
        "seq": server.store.seq,
        "endpoint": server.endpoint,
        "last_flush": db.last_flush if db else None,
        "store_bytes": db.size() if db else None,
        "store": str(db.path) if db else None,
        "store_error": str(health.store_error) if refusing else None,
        "store_failed_since": health.store_failed_since if refusing else None,
        # PVs whose puts wait for a front-end that shows them (PVA): see ReadGate.
        "watched": sum(len(names) for names in server.gate.watches.values()),
        "followed": server.admission.follows.count,
    }


def run_shard(config: Config, index: int) -> int:
    """Entry point of ``carelay shard K``."""
    die_with_parent()
    bound_malloc()
    fit_fd_limit(SHARD_FD_LIMIT)  # see SHARD_HANDSHAKE_MS
    stop = StopFlag()
    config.run_dir.mkdir(parents=True, exist_ok=True)
    store_path = config.store_path(index)
    if lock_store(store_path) is None:
        held = lock_path(store_path)
        pids = ", ".join(map(str, holders(held))) or "unknown"
        log.error("%s is in use by carelay pid %s; not starting", held, pids)
        return EXIT_IN_USE
    db = ShardDatabase(store_path)
    server = ShardServer(config, index, db=db, token=run_token(config))
    try:
        server.load()
    except StoreDamaged as e:
        log.error("cannot start: %s", e)
        return EXIT_STORE_FAILED
    try:
        server.bind()
    except KeysError as e:
        log.error("cannot start: %s", e)
        return exits.CANNOT_START
    except zmq.ZMQError as e:
        log.error("cannot listen on %s: %s", server.endpoint, e)
        return exits.FAILED
    server.wake_on_signals()
    log.log(
        logging.DEBUG if first_start_under_supervisor() else logging.INFO,
        "started (pid %d): %d PVs from %s, listening on %s",
        os.getpid(),
        len(server.store),
        db.path,
        server.endpoint,
    )
    # The PVs just loaded live on: the collector stops walking them.
    settle_gc()
    try:
        saved = server.serve(stop)
    finally:
        server.close()
        db.close()
        server.status_path.unlink(missing_ok=True)
    if saved:
        n = server.autosave.saved_on_stop
        log.info("stopped, every value saved (%d changed since the last flush)", n)
    else:
        log.info("stopped")
    return exits.OK if saved else EXIT_UNSAVED
