"""What the broker does with each kind of message a shard may send (ShardSync.handle),
without a shard: typed fields in, the mirror and the health figures out."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from carelay.broker.app import Broker
from carelay.common.config import load_config
from carelay.common.messages import Deleted, Hello, Pong, Put, Update

PREFIX = "M:"


@pytest.fixture
def broker(tmp_path):
    broker = Broker(load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path)), None)
    yield broker
    for link in broker.links:
        link.close(linger=0)


@pytest.mark.parametrize(
    "msg", [Put(f"{PREFIX}a_f1", 5, 1.0, np.array([1.0])), Hello(5, "t", "b")], ids=repr
)
def test_a_kind_only_a_broker_sends_is_dropped_with_a_line(broker, msg, caplog):
    broker.links[0].synced(epoch=1, pvs=0)  # a live link looks at each message's epoch
    with caplog.at_level(logging.WARNING):
        broker.sync.handle(broker.links[0], msg)
    assert f"shard 0: unexpected {type(msg).__name__} dropped" in caplog.text
    assert f"{PREFIX}a_f1" not in broker.table.pvs


def test_updates_deletions_and_pongs_reach_the_mirror_and_the_figures(broker):
    link = broker.links[0]
    name = f"{PREFIX}a_f1"
    broker.sync.handle(link, Update(name, 0, 1, 2.5, np.array([4.0]), created=True))
    pv = broker.table.pvs[name]
    assert pv.real and broker.health.creations == 1
    # A restatement that the PV is gone is no deletion; a deletion is.
    broker.sync.handle(link, Deleted(name, 0, 1, restate=True))
    assert name not in broker.table.pvs and broker.health.deletions == 0
    broker.sync.handle(link, Update(name, 0, 2, 3.5, np.array([5.0]), created=True))
    broker.sync.handle(link, Deleted(name, 0, 3))
    assert broker.health.deletions == 1
    flush = {"buckets": [0.1], "counts": [1, 0], "sum": 0.05}
    broker.sync.handle(link, Pong(0, 3, 7, "disk full", 1234, 9, 5.0, flush, 4096))
    figures = broker.health.shards[0]
    assert (link.pvs, figures.pid, figures.puts, figures.store_bytes) == (7, 1234, 9, 4096.0)
    assert figures.saved_at == 5.0 and figures.flush.count == 1
    assert broker.store_errors[0] == "disk full"


def test_a_resync_forgets_only_what_its_shard_no_longer_holds(tmp_path):
    """The snapshot of one shard is compared with that shard's real PVs alone (kept per
    shard: a relay of 300,000 PVs was walked whole for each resync)."""
    from carelay.common.messages import Snapshot, SnapshotBegin, SnapshotEnd
    from carelay.common.sharding import shard_for

    broker = Broker(load_config(prefix=PREFIX, shards=2, data_dir=str(tmp_path)), None)
    try:
        names = ([], [])
        for k in range(40):
            name = f"{PREFIX}r{k}_f1"
            names[shard_for(name, 2)].append(name)
        table = broker.table
        for shard, link in enumerate(broker.links):
            for name in names[shard]:
                broker.sync.handle(link, Update(name, 0, 1, 1.0, np.array([1.0]), created=True))
        assert [set(d) for d in table.real_by_shard] == [set(names[0]), set(names[1])]
        kept, gone = names[0][:3], names[0][3:]
        link = broker.links[0]
        broker.sync.handle(link, SnapshotBegin(1, 10, 0))
        for name in kept:
            broker.sync.handle(link, Snapshot(name, 2.0, np.array([2.0]), {}, 0))
        broker.sync.handle(link, SnapshotEnd(1, 10, "", 0))
        assert [set(d) for d in table.real_by_shard] == [set(kept), set(names[1])]
        assert all(name not in table.pvs for name in gone)
        assert {n for n, pv in table.pvs.items() if pv.real} == set(kept) | set(names[1])
        assert table.n_real == len(kept) + len(names[1])
    finally:
        for link in broker.links:
            link.close(linger=0)
