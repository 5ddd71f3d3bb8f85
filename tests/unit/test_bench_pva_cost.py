"""bench.pva_cost spreads the clients' PVs evenly over the shards, the same way in
every run."""

from __future__ import annotations

from bench.pva_cost import spread_names
from carelay.common.sharding import shard_for


def test_client_k_puts_to_a_pv_of_shard_k_mod_shards():
    for prefix in ("A:", "B7f3:", "x:y:"):
        names = spread_names(prefix, 5, 2)
        assert len(set(names)) == 5
        assert all(n.startswith(prefix) and n.endswith("_f1") for n in names)
        assert [shard_for(n, 2) for n in names] == [0, 1, 0, 1, 0]
    assert spread_names("A:", 4, 2) == spread_names("A:", 4, 2)
