"""What a shard would send its peers, without a socket: the shard tests' one helper."""

from __future__ import annotations

from carelay.common.protocol import encode_batch
from carelay.shard.server import ShardServer


def handed(server: ShardServer, peer: bytes, msgs: list, peers) -> dict[bytes, list]:
    """Hand ``msgs`` from ``peer`` to the shard and commit; what each of ``peers`` would
    be sent (the loop would send it after the commit)."""
    server.handle(peer, encode_batch(msgs))
    server._commit()
    out: dict[bytes, list] = {p: [] for p in peers}
    for to, msg in server._out:
        out[to].append(msg)
    server._out.clear()
    return out
