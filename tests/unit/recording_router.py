"""A stand-in for a shard's ROUTER socket that records what the shard sends."""

from __future__ import annotations

import zmq

from carelay.common.protocol import decode_batch


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
