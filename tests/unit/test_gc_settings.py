"""The garbage collector after start-up: start-up objects frozen, young collections rarer."""

from __future__ import annotations

import gc
import signal

import pytest

from carelay.common.config import GC_YOUNG_THRESHOLD, load_config
from carelay.common.lifecycle import settle_gc
from carelay.shard import server as shard_server


@pytest.fixture
def gc_restored():
    before = gc.get_threshold()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    gc.unfreeze()
    gc.set_threshold(*before)
    for s, h in handlers.items():
        signal.signal(s, h)


def test_settle_gc_freezes_what_exists_and_raises_the_young_threshold(gc_restored):
    kept = [{"a": i} for i in range(100)]
    gc.unfreeze()
    settle_gc()
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700
    assert gc.get_freeze_count() >= len(kept)
    assert not any(x is kept for x in gc.get_objects())  # frozen: no generation holds it


def test_shard_serves_with_gc_settled(tmp_path, monkeypatch, gc_restored):
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    seen = {}

    def serve(self, stop):
        seen["threshold"] = gc.get_threshold()[0]
        seen["frozen"] = gc.get_freeze_count()
        seen["pvs"] = len(self.store)
        return True

    monkeypatch.setattr(shard_server, "die_with_parent", lambda: None)
    monkeypatch.setattr(shard_server.ShardServer, "serve", serve)
    config = load_config(prefix="U:", shards=1, data_dir=str(tmp_path))
    assert shard_server.run_shard(config, 0) == 0
    assert seen["threshold"] == GC_YOUNG_THRESHOLD
    assert seen["frozen"] > 0


def test_a_large_snapshot_is_kept_out_of_the_collectors_walks(tmp_path, gc_restored):
    """What a resync of many PVs gathers and then mirrors lives on: frozen as it comes, it
    no longer makes the broker's full collections long (one took 398 ms of a loop turn
    while 150,000 PVs resynced)."""
    import numpy as np

    from carelay.broker import sync as sync_module
    from carelay.broker.app import Broker
    from carelay.common.messages import Snapshot, SnapshotBegin, SnapshotEnd

    broker = Broker(load_config(prefix="G:", shards=1, data_dir=str(tmp_path)), None)
    try:
        link = broker.links[0]
        n = sync_module._FREEZE_EVERY
        gc.unfreeze()
        broker.sync.handle(link, SnapshotBegin(1, 10, 1))
        for k in range(n):
            broker.sync.handle(link, Snapshot(f"G:s{k}_f1", 1.0, np.array([1.0]), {}, 1))
        gathered = gc.get_freeze_count()
        assert gathered >= n  # each entry's tuple, frozen when the n-th came
        broker.sync.handle(link, SnapshotEnd(1, 10, "", 1))
        pv = broker.table.pvs[f"G:s{n - 1}_f1"]
        assert gc.get_freeze_count() > gathered
        assert not any(x is pv for x in gc.get_objects())  # the new mirror, frozen too
    finally:
        for link in broker.links:
            link.close(linger=0)
