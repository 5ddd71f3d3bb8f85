"""Which shard owns a PV: rendezvous (highest random weight) hashing.

Changing the shard count from N to N+1 moves only the names whose new
highest-weight shard is the added one, about 1/(N+1) of them.
"""

from __future__ import annotations

import hashlib


def _weight(name: str, shard: int) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_for(name: str, n_shards: int) -> int:
    """Index of the shard that owns ``name`` among ``n_shards``."""
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    return max(range(n_shards), key=lambda k: _weight(name, k))
