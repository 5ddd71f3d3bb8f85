"""The shard process: a ZeroMQ ROUTER loop around a ShardStore."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import zmq

from carelay.common.config import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, STATUS_INTERVAL, Config
from carelay.common.lifecycle import StopFlag, die_with_parent, write_status
from carelay.common.protocol import Message, Op, ProtocolError, decode, encode
from carelay.shard.store import Rejected, ShardStore

log = logging.getLogger("carelay.shard")

#: Most messages handled before the loop looks at signals and timers again.
_BATCH = 1000


class ShardServer:
    """Serves one shard's store to the broker over a ROUTER socket."""

    def __init__(self, config: Config, index: int, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.index = index
        self.endpoint = config.shard_endpoint(index)
        self.store = ShardStore(config.prefix, config.max_elements, config.max_name_length)
        # A start id that differs from any earlier run's: a broker that sees it
        # change knows this shard restarted and resyncs.
        self.epoch = random.getrandbits(62) | 1
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._broker_seen = 0.0
        self._broker_alive = False
        self.status_path = config.run_dir / f"shard-{index}.json"

    def bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(self.endpoint)
        self._sock = sock
        log.info("shard %d listening on %s (epoch %x)", self.index, self.endpoint, self.epoch)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    # -- message handling ---------------------------------------------------

    def _send(self, peer: bytes, msg: Message) -> None:
        msg.epoch = self.epoch
        try:
            self._sock.send_multipart([peer, *encode(msg)], copy=False)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or queue full
            log.warning("shard %d: cannot send %s to broker: %s", self.index, msg.op.name, e)

    def handle(self, peer: bytes, frames: list) -> None:
        """Handle one message from ``peer``; bad input is logged and dropped."""
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("shard %d: dropped a malformed message: %s", self.index, e)
            return
        self._broker_seen = time.monotonic()
        if not self._broker_alive:
            self._broker_alive = True
            log.info("shard %d: broker connected", self.index)
        op = msg.op
        if op is Op.PUT:
            self._put(peer, msg)
        elif op is Op.PING:
            self._send(peer, Message(Op.PONG, seq=self.store.seq, info={"pvs": len(self.store)}))
        elif op is Op.DELETE:
            try:
                seq = self.store.delete(msg.name)
            except Rejected as e:
                self._send(peer, Message(Op.REJECT, msg.name, req=msg.req, reason=str(e)))
                return
            log.info("deleted PV %s (shard %d)", msg.name, self.index)
            self._send(peer, Message(Op.DELETED, msg.name, req=msg.req, seq=seq))
        elif op is Op.HELLO:
            self._snapshot(peer)
        else:
            log.warning("shard %d: unexpected operation %s dropped", self.index, op.name)

    def _put(self, peer: bytes, msg: Message) -> None:
        if msg.data is None:
            self._send(peer, Message(Op.REJECT, msg.name, req=msg.req, reason="put without data"))
            return
        try:
            change = self.store.put(msg.name, msg.data)
        except Rejected as e:
            log.warning("refused put to %s (shard %d): %s", msg.name, self.index, e)
            self._send(peer, Message(Op.REJECT, msg.name, req=msg.req, reason=str(e)))
            return
        if change.created:
            log.info("created PV %s (shard %d)", msg.name, self.index)
        self._send(
            peer,
            Message(
                Op.UPDATE,
                change.name,
                req=msg.req,
                seq=change.seq,
                stamp=change.stamp,
                length=change.length,
                info={"created": 1} if change.created else {},
                data=change.data,
            ),
        )

    def _snapshot(self, peer: bytes) -> None:
        self._send(peer, Message(Op.SNAPSHOT_BEGIN, seq=self.store.seq))
        n = 0
        for name, stamp, contents in self.store.snapshot():
            self._send(
                peer, Message(Op.SNAPSHOT, name, stamp=stamp, length=len(contents), data=contents)
            )
            n += 1
        self._send(peer, Message(Op.SNAPSHOT_END, seq=self.store.seq, info={"pvs": n}))
        log.info("shard %d: sent a snapshot of %d PVs at seq %d", self.index, n, self.store.seq)

    # -- loop -----------------------------------------------------------------

    def _write_status(self) -> None:
        write_status(
            self.status_path,
            {
                "role": f"shard {self.index}",
                "pvs": len(self.store),
                "seq": self.store.seq,
                "endpoint": self.endpoint,
            },
        )

    def serve(self, stop: StopFlag) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_status = 0.0
        quiet_after = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        while not stop.stopping:
            if poller.poll(timeout=100):
                for _ in range(_BATCH):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if len(frames) < 2:
                        continue
                    self.handle(bytes(frames[0].buffer), frames[1:])
            now = time.monotonic()
            if self._broker_alive and now - self._broker_seen > quiet_after:
                self._broker_alive = False
                log.warning("shard %d: broker went quiet", self.index)
            if now >= next_status:
                self._write_status()
                next_status = now + STATUS_INTERVAL


def run_shard(config: Config, index: int) -> int:
    """Entry point of ``carelay shard K``."""
    die_with_parent()
    stop = StopFlag()
    config.run_dir.mkdir(parents=True, exist_ok=True)
    server = ShardServer(config, index)
    try:
        server.bind()
    except zmq.ZMQError as e:
        log.error("shard %d: cannot listen on %s: %s", index, server.endpoint, e)
        return 1
    log.info("shard %d started (pid %d)", index, os.getpid())
    try:
        server.serve(stop)
    finally:
        server.close()
        server.status_path.unlink(missing_ok=True)
    log.info("shard %d stopped", index)
    return 0
