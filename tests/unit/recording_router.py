"""A stand-in for a shard's ROUTER socket that records what the shard sends."""

from __future__ import annotations

import zmq

from carelay.common.config import load_config
from carelay.common.protocol import decode_batch, encode_batch
from carelay.shard.server import ShardServer


class RecordingRouter:
    """Records what a ROUTER would be given: (peer, decoded messages) per multipart."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list]] = []
        self._frames: list = []

    def send(self, frame, flags=0, copy=True) -> None:
        self._frames.append(bytes(frame))
        if not flags & zmq.SNDMORE:
            peer, *frames = self._frames
            self._frames = []
            self.sent.append((peer, decode_batch(frames)))

    def to(self, peer: bytes) -> list:
        """Everything sent to ``peer`` so far, in order."""
        return [m for p, msgs in self.sent if p == peer for m in msgs]


def recorded_shard(tmp_path, prefix: str, hellos: dict) -> ShardServer:
    """A real ShardServer whose sends a RecordingRouter records, serving the peers of
    ``hellos`` (peer: its HELLO) already; what they were sent for it is forgotten."""
    config = load_config(prefix=prefix, shards=1, data_dir=str(tmp_path))
    server = ShardServer(config, 0)
    server._sock = RecordingRouter()
    for peer, hello in hellos.items():
        batch(server, peer, [hello])
    server._sock.sent.clear()
    return server


def batch(server: ShardServer, peer: bytes, msgs: list) -> None:
    """``msgs`` from ``peer``, handled as one batch: applied, committed, answered."""
    server.handle(peer, encode_batch(msgs))
    server._commit()
    server._send_replies()
