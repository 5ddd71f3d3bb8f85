"""The shard process: a ZeroMQ ROUTER loop around a ShardStore and its autosave.

The loop takes a batch of messages, applies them in order and collects the
replies; if the batch created or deleted PVs, it commits those to the
autosave first (one transaction for the batch) and only then sends the
replies, so a creation or deletion is durable before it is acknowledged.
Changed values are flushed every ``autosave_period`` and on a clean stop.

A store that cannot be written (a full disk, a file size limit) is a fault of
its own: the values stay held in memory and the write is tried again every
``autosave_period``.  Once it has failed for longer than that, the shard
refuses puts with callback (it could not keep the promise of their
acknowledgement) and tells the broker, in every PONG, so that its PVs carry an
alarm; it all clears with the first write that succeeds.  Creations,
deletions and field changes are refused while they cannot be made durable.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import random
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zmq

from carelay.common import exits
from carelay.common.config import (
    AUTOSAVE_PART_BYTES,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    REFUSED_PEER_LOG_INTERVAL,
    STATUS_INTERVAL,
    Config,
)
from carelay.common.histogram import FLUSH_BUCKETS, Histogram
from carelay.common.keys import SHARD_CERT, KeysError, load_keys
from carelay.common.lifecycle import (
    StopFlag,
    bound_malloc,
    die_with_parent,
    first_start_under_supervisor,
    return_freed_memory,
    write_status,
)
from carelay.common.protocol import (
    Message,
    Op,
    ProtocolError,
    WriteRun,
    batches,
    decode_batch,
    encode_batch,
    send_frames,
)
from carelay.common.runlock import holders, run_token
from carelay.shard.persist import ShardDatabase, StoreDamaged, lock_path, lock_store
from carelay.shard.store import Change, Rejected, ShardStore

log = logging.getLogger("carelay.shard")

#: About the most messages handled before one commit and the replies.
_BATCH = 1000
#: Seconds between refreshes of the store's good copy (each after an integrity check).
GOOD_COPY_INTERVAL = 300.0
#: On a clean stop, how long the shard waits for more messages before its last flush (ms).
_STOP_DRAIN_MS = 50
#: zmq.POLLIN as a plain int: ``events & zmq.POLLIN`` would build a flag object each time.
_POLLIN = int(zmq.POLLIN)
#: Exit status of a shard that cannot open its store (the supervisor shows it failing).
EXIT_STORE_FAILED = exits.STORE_FAILED
#: Exit status of a shard that stopped with values it could not save.
EXIT_UNSAVED = exits.UNSAVED
#: While the store cannot be written, how often the ERROR is said again (seconds).
STORE_ERROR_REPEAT = 60.0
#: Most PV names one log line lists.
_NAMES_LOGGED = 20
#: Peers (ROUTER identities) remembered as admitted; a broker that reconnects is a new one.
_ADMITTED_MAX = 16
_NOT_OURS = "not a broker of this relay: no token, or the wrong one"
_FENCED = "sent before the broker reconnected"
#: Fenced connections remembered (see ShardServer._admit).
_FENCED_MAX = 64
#: Requests that a shard drops once they expired (HELLO and PING never expire).
_EXPIRING = frozenset({Op.PUT, Op.WRITE, Op.SET_FIELD, Op.DELETE})
_EXPIRED = "expired: the broker has failed it already"
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
        #: What a peer presents in its HELLO before it is served (None: every peer is).
        self.token = token
        #: The peers (ROUTER identities) served, newest last, each with the broker it is
        #: (the id in its HELLO; "" where none came).
        self._admitted: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        #: Earlier connections of a broker that has said HELLO again (see ``_admit``).
        self._fenced: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._refused = 0
        self._refused_logged = -REFUSED_PEER_LOG_INTERVAL
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
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None
        self._broker_seen = 0.0
        self._broker_alive = False
        self._broker_peer: bytes | None = None
        self._out: list[tuple[bytes, Message]] = []
        # Values are written by a thread of their own, so that the loop goes on serving
        # during the write and its fsync; creations and deletions stay on the loop.
        self._saver: ThreadPoolExecutor | None = None
        self._saving: Future | None = None
        self._saving_names: list[str] = []
        #: Names changed in the period whose values are being written, part by part
        #: (AUTOSAVE_PART_BYTES), and are not yet taken.
        self._to_save: list[str] = []
        self.status_path = config.run_dir / f"shard-{index}.json"
        # The store's write state: the last write's error (None: it worked), since when
        # (POSIX and monotonic time), and, once that is longer than autosave_period, why
        # puts with callback are refused ("" while they are not).
        self.store_error: Exception | None = None
        self.store_failed_since: float | None = None
        self._failed_at = 0.0
        self._failures = 0
        self._error_logged = 0.0
        self.refusing = ""
        self._status_due = False
        #: Values written by the clean stop (changed since the last flush).
        self.saved_on_stop = 0
        #: For the broker's health figures (PONG): puts applied, how long value flushes
        #: took, and since when (wall clock) every value applied is saved.
        self.puts_applied = 0
        self.flush_times = Histogram(FLUSH_BUCKETS)
        self.saved_at = time.time()
        self._saving_since = 0.0

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

    def bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        sock = self._ctx.socket(zmq.ROUTER)
        if self.config.keys_dir is not None:
            self._secure(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(self.endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        log.debug("listening on %s (epoch %x)", self.endpoint, self.epoch)

    def _secure(self, sock: zmq.Socket) -> None:
        """CurveZMQ server: encrypted, and only peers holding a key from keys_dir get in."""
        from zmq.auth.thread import ThreadAuthenticator

        keys_dir = self.config.keys_dir
        public, secret = load_keys(keys_dir, SHARD_CERT)
        if secret is None:
            raise KeysError(f"{keys_dir / (SHARD_CERT + '.key_secret')} is missing")
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(keys_dir))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        log.info("CurveZMQ keys from %s", keys_dir)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._poller = None
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
            self._auth = None

    # -- message handling ---------------------------------------------------

    def _reply(self, peer: bytes, msg: Message) -> None:
        msg.epoch = self.epoch
        self._out.append((peer, msg))

    def _send_replies(self) -> None:
        """Send the collected replies in order, batched per peer."""
        out, self._out = self._out, []
        runs: list[tuple[bytes, list[Message]]] = []
        for peer, msg in out:
            if runs and runs[-1][0] == peer:
                runs[-1][1].append(msg)
            else:
                runs.append((peer, [msg]))
        for peer, msgs in runs:
            for batch in batches(msgs):
                frames = encode_batch(batch)
                try:
                    send_frames(self._sock, [peer, *frames])
                except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or queue full
                    log.warning(
                        "cannot send %d replies to the broker: %s",
                        len(batch),
                        e,
                    )

    def handle(self, peer: bytes, frames: list) -> int:
        """Handle one message or batch from ``peer``; returns how many messages.  Bad input
        is logged and dropped whole."""
        try:
            msgs = decode_batch(frames, runs=True)
        except ProtocolError as e:
            log.warning("dropped a malformed message: %s", e)
            return 0
        if peer not in self._admitted and not self._admit(peer, msgs):
            return 0
        self._broker_seen = time.monotonic()
        self._broker_peer = peer
        if not self._broker_alive:
            self._broker_alive = True
            log.debug("broker connected")
        n = 0
        for msg in msgs:
            if type(msg) is WriteRun:
                self._write_run(peer, msg)
                n += len(msg)
            else:
                self._dispatch(peer, msg)
                n += 1
        return n

    def _admit(self, peer: bytes, msgs: list) -> bool:
        """Whether to serve ``peer``, not yet admitted: a peer that opens with a HELLO that
        presents this relay's token (any peer, where the shard asks for none).

        Else its messages are dropped unanswered (a HELLO gets a REJECT, so that a
        misconfigured broker can say why).  A HELLO with a broker's id fences that
        broker's earlier connections: what still comes through them is refused, so
        that a request the broker sent before it reconnected either came before the
        snapshot it asks for now, or is never applied (a REJECT answers it, on the old
        connection, where the broker may still listen)."""
        if peer in self._fenced:
            self._refuse_fenced(peer, msgs)
            return False
        first = msgs[0]
        hello = type(first) is Message and first.op is Op.HELLO
        if self.token is not None:
            token = first.info.get("token") if hello else None
            if type(token) is not str or not hmac.compare_digest(
                token.encode(), self.token.encode()
            ):
                if hello:
                    self._reply(peer, Message(Op.REJECT, req=first.req, reason=_NOT_OURS))
                self._refused_peer(len(msgs), "a peer without this relay's token")
                return False
        broker = first.info.get("broker", "") if hello else ""
        if type(broker) is str and broker:
            for old in [p for p, b in self._admitted.items() if b == broker]:
                del self._admitted[old]
                self._fenced[old] = None
                if len(self._fenced) > _FENCED_MAX:
                    self._fenced.popitem(last=False)
        self._admitted[peer] = broker if type(broker) is str else ""
        if len(self._admitted) > _ADMITTED_MAX:
            self._admitted.popitem(last=False)
        return True

    def _refuse_fenced(self, peer: bytes, msgs: list) -> None:
        """Refuse what an earlier connection of a broker still brings: a REJECT for each
        request that waits for an answer; plain WRITEs are dropped (the broker has asked
        for the snapshot that shows they did not happen)."""
        for msg in msgs:
            if type(msg) is WriteRun:
                for name, req in zip(msg.names, msg.reqs, strict=True):
                    if req:
                        self._reply(peer, Message(Op.REJECT, name, req=req, reason=_FENCED))
            elif msg.req and msg.op in _EXPIRING:
                self._reject(peer, msg, _FENCED)
        self._refused_peer(len(msgs), "an earlier connection of a broker that reconnected")

    def _refused_peer(self, n: int, who: str) -> None:
        """Count ``n`` refused messages; one log line per REFUSED_PEER_LOG_INTERVAL."""
        self._refused += n
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_PEER_LOG_INTERVAL:
            log.warning("refused %d messages from %s", self._refused, who)
            self._refused = 0
            self._refused_logged = now

    def _dispatch(self, peer: bytes, msg: Message) -> None:
        op = msg.op
        if msg.req and op in _EXPIRING:
            expires = msg.info.get("expires")
            if type(expires) is float and time.time() > expires:
                self._expired(peer, msg)
                return
        if op is Op.WRITE:
            self._write(peer, msg)
        elif op is Op.PUT:
            self._put(peer, msg)
        elif op is Op.PING:
            self._pong(peer, msg.req)
        elif op is Op.DELETE:
            try:
                seq = self.store.delete(msg.name)
            except Rejected as e:
                self._reject(peer, msg, str(e))
                return
            log.info("deleted PV %s", msg.name)
            self._reply(peer, Message(Op.DELETED, msg.name, req=msg.req, seq=seq))
        elif op is Op.SET_FIELD:
            self._set_field(peer, msg)
        elif op is Op.HELLO:
            self._snapshot(peer, msg.req)
        else:
            log.warning("unexpected operation %s dropped", op.name)

    def _pong(self, peer: bytes, req: int) -> None:
        info = {
            "pvs": len(self.store),
            "store_error": self.refusing,
            "pid": os.getpid(),
            "puts": self.puts_applied,
            "saved_at": self.saved_at,
            "flush": self.flush_times.as_dict(),
        }
        if self.db is not None:
            info["store_bytes"] = self.db.size()
        self._reply(peer, Message(Op.PONG, req=req, seq=self.store.seq, info=info))

    def _put(self, peer: bytes, msg: Message) -> None:
        if msg.data is None:
            self._reject(peer, msg, "put without data")
            return
        if self.refusing and msg.info.get("callback"):
            log.warning("refused put to %s: %s", msg.name, self.refusing)
            self._reject(peer, msg, self.refusing)
            return
        try:
            change = self.store.put(msg.name, msg.data, msg.stamp)
        except Rejected as e:
            log.warning("refused put to %s: %s", msg.name, e)
            self._reject(peer, msg, str(e))
            return
        self.puts_applied += 1
        if change.created:
            log.info("created PV %s", msg.name)
        self._reply_change(peer, msg.req, change, {"created": 1} if change.created else {})

    def _write(self, peer: bytes, msg: Message) -> None:
        """A put the broker has already applied to its mirror (see ``_written``)."""
        try:
            if msg.data is None:
                raise Rejected("put without data")
            if self.refusing and msg.req:
                raise Rejected(self.refusing)
            outcome = self.store.put(msg.name, msg.data, msg.stamp, create=False).seq
            self.puts_applied += 1
        except Rejected as e:
            outcome = e
        self._written(peer, msg.name, msg.req, outcome)

    def _expired(self, peer: bytes, msg: Message) -> None:
        """Drop a request that the broker has failed already (see ``_EXPIRED``)."""
        if msg.op is Op.WRITE:
            self._written(peer, msg.name, msg.req, Rejected(_EXPIRED))
            return
        log.warning("dropped %s of %s: %s", msg.op.name, msg.name, _EXPIRED)
        self._reject(peer, msg, _EXPIRED)

    def _write_run(self, peer: bytes, run: WriteRun) -> None:
        """A run of one-element WRITEs: each as ``_write`` takes it, column by column.  Past
        the run's expiry, the WRITEs that wait for an answer are dropped, the others (which
        no client waits for) applied."""
        write = self.store.write_one
        values, stamps, reqs = run.values, run.stamps, run.reqs
        refusing = self.refusing
        if run.expires and time.time() > run.expires:
            for k, name in enumerate(run.names):
                if reqs[k]:
                    self._written(peer, name, reqs[k], Rejected(_EXPIRED))
                    continue
                try:
                    write(name, values[k : k + 1], stamps[k])
                except Rejected as e:
                    self._written(peer, name, 0, e)
            return
        for k, name in enumerate(run.names):
            if refusing and reqs[k]:
                self._written(peer, name, reqs[k], Rejected(refusing))
                continue
            try:
                outcome = write(name, values[k : k + 1], stamps[k])
            except Rejected as e:
                outcome = e
            else:
                self.puts_applied += 1
                if not reqs[k]:
                    continue  # the commonest WRITE of all: applied, and nothing to say
            self._written(peer, name, reqs[k], outcome)

    def _written(self, peer: bytes, name: str, req: int, outcome: int | Rejected) -> None:
        """Answer a WRITE that came to ``outcome`` (its seq, or why it was refused).  A
        WRITE is silent unless it asked for an answer (``req``, a put with callback: an ACK)
        or was refused: a REJECT, then the PV as it stands here for the broker's mirror."""
        if isinstance(outcome, Rejected):
            log.warning("refused put to %s: %s", name, outcome)
            self._reply(peer, Message(Op.REJECT, name, req=req, reason=str(outcome)))
            self._correct(peer, name)
        elif req:
            self._reply(peer, Message(Op.ACK, name, req=req, seq=outcome))

    def _correct(self, peer: bytes, name: str) -> None:
        """Tell the broker how ``name`` stands here, after a refused WRITE that its mirror
        already shows: not a change, so info "restate" and the current sequence number."""
        store = self.store
        if name not in store:
            self._reply(peer, Message(Op.DELETED, name, seq=store.seq, info={"restate": 1}))
            return
        contents = store.get(name)
        change = Change(name, store.seq, store.stamp(name), contents, len(contents), False)
        self._reply_change(peer, 0, change, {"reset": 1, "restate": 1})

    def _reject(self, peer: bytes, msg: Message, reason: str) -> None:
        self._reply(peer, Message(Op.REJECT, msg.name, req=msg.req, reason=reason))

    def _reply_change(self, peer: bytes, req: int, change, info: dict) -> None:
        """An UPDATE carrying what ``change`` did, as the broker mirrors it."""
        self._reply(
            peer,
            Message(
                Op.UPDATE,
                change.name,
                req=req,
                seq=change.seq,
                stamp=change.stamp,
                length=change.length,
                info=info,
                data=change.data,
            ),
        )

    def _set_field(self, peer: bytes, msg: Message) -> None:
        field, value = msg.info.get("field"), msg.info.get("value")
        try:
            if field == "RES":
                change = self.store.reset(msg.name)
            else:
                seq, value = self.store.set_field(msg.name, str(field), value)
        except Rejected as e:
            log.warning("refused %s.%s: %s", msg.name, field, e)
            self._reject(peer, msg, str(e))
            return
        if field == "RES":
            log.info("emptied buffer %s", msg.name)
            self._reply_change(peer, msg.req, change, {"reset": 1})
            return
        log.info("set %s.%s = %r", msg.name, field, value)
        self._reply(
            peer,
            Message(
                Op.FIELD, msg.name, req=msg.req, seq=seq, info={"field": field, "value": value}
            ),
        )

    def _snapshot(self, peer: bytes, req: int) -> None:
        # A snapshot must not show a creation that is not yet durable.
        self._commit()
        self._reply(peer, Message(Op.SNAPSHOT_BEGIN, req=req, seq=self.store.seq))
        n = 0
        for name, stamp, contents, fields in self.store.snapshot():
            self._reply(
                peer,
                Message(
                    Op.SNAPSHOT,
                    name,
                    stamp=stamp,
                    length=len(contents),
                    info={"fields": fields},
                    data=contents,
                ),
            )
            n += 1
        info = {"pvs": n, "store_error": self.refusing}
        self._reply(peer, Message(Op.SNAPSHOT_END, req=req, seq=self.store.seq, info=info))
        log.debug("sent a snapshot of %d PVs at seq %d", n, self.store.seq)

    # -- durability -------------------------------------------------------------

    def _commit(self) -> None:
        """Make the batch's creations and deletions durable; refuse them if that fails."""
        if self.db is None or not self.store.needs_commit:
            self.store.committed()
            return
        # A value write in flight holds older rows: it lands first, so that it can
        # never bring back a PV deleted here.
        self._collect(wait=True)
        upserts, deletes = self.store.unsaved_changes()
        try:
            self.db.save(upserts, deletes)
        except (sqlite3.Error, OSError) as e:
            self._store_failed(e, quiet=True)  # the line below says it
            names = set(self.store.rollback_unsaved())
            log.error(
                "cannot save %d creations/deletions to %s (%s); refusing them",
                len(names),
                self.db.path,
                e,
            )
            self._out = [
                (peer, msg)
                if msg.name not in names or msg.op in (Op.REJECT, Op.PONG)
                else (
                    peer,
                    Message(
                        Op.REJECT,
                        msg.name,
                        req=msg.req,
                        epoch=self.epoch,
                        reason=f"autosave failed: {e}",
                    ),
                )
                for peer, msg in self._out
            ]
            return
        self._store_written()
        self.store.committed()

    def flush(self) -> int:
        """Write every changed value to the autosave now; returns how many PVs."""
        if self.db is None:
            self.store.dirty.clear()
            return 0
        self._collect(wait=True)
        rows = self.store.dirty_rows()
        if not rows:
            return 0
        started = time.time()
        try:
            self.db.save(rows)
        except (sqlite3.Error, OSError) as e:
            self._store_failed(e, f"autosave of {len(rows)} values failed")
            return 0
        self.flush_times.observe(time.time() - started)
        self.saved_at = started
        self._store_written()
        self.store.dirty.clear()
        self._to_save.clear()
        return len(rows)

    def flush_soon(self) -> int:
        """Start writing the changed values in the autosave thread, the next part of them
        (AUTOSAVE_PART_BYTES) while ``saving_parts``; returns how many PVs (0 also while the
        previous write is still going: the next tick takes them)."""
        if self.db is None:
            self.store.dirty.clear()
            return 0
        if not self._collect(wait=False):
            return 0
        if not self._to_save:
            # A new period: once all its parts are written, every value applied before
            # now is saved (FLUSH_AGE).
            self._to_save = list(self.store.dirty)
            self._saving_since = time.time()
        rows = self.store.take_rows(self._to_save, AUTOSAVE_PART_BYTES)
        if not rows:
            if self.store_error is None:
                self.saved_at = time.time()  # nothing waits to be saved
            else:
                # Nothing waits, but the store failed: a small write tells when it heals.
                self._saving_names = []
                self._saving = self._autosave_thread().submit(self.db.check_writable)
            return 0
        self._saving_names = [row[0] for row in rows]
        self.store.dirty.difference_update(self._saving_names)
        self._saving = self._autosave_thread().submit(self._timed_save, rows)
        return len(rows)

    def _timed_save(self, rows) -> float:
        """In the autosave thread: save ``rows``; returns how long that took (seconds)."""
        started = time.monotonic()
        self.db.save(rows)
        return time.monotonic() - started

    @property
    def saving_parts(self) -> bool:
        """Parts of the period's changed values wait to be written after the one in flight."""
        return bool(self._to_save)

    def _autosave_thread(self) -> ThreadPoolExecutor:
        if self._saver is None:
            self._saver = ThreadPoolExecutor(1, thread_name_prefix=f"shard{self.index}-autosave")
        return self._saver

    def _refresh_good_copy(self) -> None:
        """In the autosave thread: a new good copy, after the integrity check."""
        try:
            self.db.refresh_good_copy()
        except (sqlite3.Error, OSError) as e:
            log.error("cannot refresh the good copy: %s", e)

    def _collect(self, wait: bool) -> bool:
        """Whether no value write is in flight, after taking the result of a finished one
        (``wait``: after waiting for it).  A failed write is made again at the next tick."""
        future = self._saving
        if future is None:
            return True
        if not wait and not future.done():
            return False
        self._saving = None
        try:
            took = future.result()
        except (sqlite3.Error, OSError) as e:
            self.store.dirty.update(self._saving_names)
            n = len(self._saving_names)
            self._store_failed(e, f"autosave of {n} values failed" if n else "write check failed")
        else:
            if self._saving_names:
                self.flush_times.observe(took)
                if not self._to_save:
                    self.saved_at = self._saving_since
            self._store_written()
        self._saving_names = []
        return True

    def _store_failed(self, error: Exception, what: str = "", quiet: bool = False) -> None:
        """A write to the store failed: said at once (ERROR, with the errno and the file),
        then again when the error changes or every STORE_ERROR_REPEAT seconds."""
        now = time.monotonic()
        self._failures += 1
        first = self.store_error is None
        changed = first or str(error) != str(self.store_error)
        self.store_error = error
        if first:
            self.store_failed_since = time.time()
            self._failed_at = now
        else:
            what = (
                f"{what}; the store still cannot be written ({self._failures} failed writes "
                f"in {now - self._failed_at:.0f} s)"
            )
        if self.refusing and changed:
            self.refusing = self._refusal()
            self._status_due = True
        if quiet:
            self._error_logged = now
        elif changed or now - self._error_logged >= STORE_ERROR_REPEAT:
            log.error(
                "%s: %s; %d values held, tried again every %g s",
                what,
                error,
                len(self.store.dirty),
                self.config.autosave_period,
            )
            self._error_logged = now

    def _refusal(self) -> str:
        return f"the store of shard {self.index} cannot be written: {self.store_error}"

    def _store_written(self) -> None:
        """A write to the store succeeded: a fault it was in is over."""
        if self.store_error is None:
            return
        log.warning(
            "the store %s can be written again, after %.1f s; puts with callback "
            "are accepted again",
            self.db.path,
            time.monotonic() - self._failed_at,
        )
        self.store_error = None
        self.store_failed_since = None
        self._failures = 0
        self._error_logged = 0.0
        if self.refusing:
            self.refusing = ""
            self._status_due = True

    def _check_store(self, now: float) -> None:
        """Refuse puts with callback once the store has failed for longer than the
        autosave period (the promise behind their acknowledgement cannot be kept)."""
        if self.refusing or self.store_error is None:
            return
        if now - self._failed_at <= self.config.autosave_period:
            return
        self.refusing = self._refusal()
        self._status_due = True
        log.error(
            "the store has not been written for %.1f s: puts with callback to its "
            "PVs fail, and the PVs carry a WRITE alarm, until it can be",
            now - self._failed_at,
        )

    def close_autosave(self) -> None:
        """Wait for a value write in flight and stop the autosave thread."""
        self._collect(wait=True)
        if self._saver is not None:
            self._saver.shutdown(wait=True)
            self._saver = None

    # -- loop -----------------------------------------------------------------

    def _write_status(self) -> None:
        write_status(
            self.status_path,
            {
                "role": f"shard {self.index}",
                "pvs": len(self.store),
                "seq": self.store.seq,
                "endpoint": self.endpoint,
                "last_flush": self.db.last_flush if self.db else None,
                "store_bytes": self.db.size() if self.db else None,
                "store": str(self.db.path) if self.db else None,
                "store_error": str(self.store_error) if self.refusing else None,
                "store_failed_since": self.store_failed_since if self.refusing else None,
            },
        )

    def serve_once(self, timeout_ms: int = 100) -> int:
        """Handle one batch of messages: apply, commit, reply.  Returns how many."""
        self._check_store(time.monotonic())
        if not self._poller.poll(timeout_ms):
            return 0
        n = 0
        while n < _BATCH:
            if not self._sock.get(zmq.EVENTS) & _POLLIN:
                break
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            n += 1
            if len(frames) >= 2:
                n += self.handle(bytes(frames[0].buffer), frames[1:])
        self._commit()
        self._send_replies()
        return n

    def serve(self, stop: StopFlag) -> bool:
        """Serve until ``stop``; False when the last flush left values unsaved."""
        next_status = 0.0
        next_flush = time.monotonic() + self.config.autosave_period
        next_copy = time.monotonic() + GOOD_COPY_INTERVAL
        quiet_after = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        while not stop.stopping:
            self.serve_once()
            now = time.monotonic()
            if now >= next_flush:
                self.flush_soon()
                next_flush = now + self.config.autosave_period
            elif self.saving_parts:
                self.flush_soon()
            if self.db is not None and now >= next_copy:
                self._autosave_thread().submit(self._refresh_good_copy)
                next_copy = now + GOOD_COPY_INTERVAL
            if self._broker_alive and now - self._broker_seen > quiet_after:
                self._broker_alive = False
                log.warning("broker went quiet")
            if self._status_due and self._broker_peer is not None:
                # The store's state changed: the broker hears it now, not at the next PING.
                self._pong(self._broker_peer, 0)
                self._send_replies()
            if now >= next_status or self._status_due:
                self._status_due = False
                self._write_status()
                next_status = now + STATUS_INTERVAL
                return_freed_memory()
        # What the broker sent before it stopped (it stops first) is applied and saved.
        while self.serve_once(timeout_ms=_STOP_DRAIN_MS):
            pass
        n = self.flush()
        self.close_autosave()
        if self.store.dirty:
            names = sorted(self.store.dirty)
            more = len(names) - _NAMES_LOGGED
            log.error(
                "stopped with %d value%s not saved to %s (%s): %s%s",
                len(names),
                "" if len(names) == 1 else "s",
                self.db.path,
                self.store_error,
                ", ".join(names[:_NAMES_LOGGED]),
                f" and {more} more" if more > 0 else "",
            )
            return False
        self.saved_on_stop = n
        return True


def run_shard(config: Config, index: int) -> int:
    """Entry point of ``carelay shard K``."""
    die_with_parent()
    bound_malloc()
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
        return EXIT_STORE_FAILED
    except zmq.ZMQError as e:
        log.error("cannot listen on %s: %s", server.endpoint, e)
        return 1
    log.log(
        logging.DEBUG if first_start_under_supervisor() else logging.INFO,
        "started (pid %d): %d PVs from %s, listening on %s",
        os.getpid(),
        len(server.store),
        db.path,
        server.endpoint,
    )
    try:
        saved = server.serve(stop)
    finally:
        server.close()
        db.close()
        server.status_path.unlink(missing_ok=True)
    if saved:
        n = server.saved_on_stop
        log.info("stopped, every value saved (%d changed since the last flush)", n)
    else:
        log.info("stopped")
    return 0 if saved else EXIT_UNSAVED
