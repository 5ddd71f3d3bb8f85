"""The alarm a shard's PVs show while their shard resyncs: COMM/INVALID from when it is
away until its snapshot is in, then the alarm of a shard in sync on the snapshot's own
events.  A restarted shard may hold older values than the mirror (those put after its
last flush are lost): a read must not show them as good meanwhile, and the event that
brings the shard's value must say it is good again."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from carelay.broker.linkstate import LinkState
from carelay.broker.sync import ShardSync
from carelay.common.messages import Snapshot, SnapshotBegin, SnapshotEnd


class FakeLink:
    """A link's state and what ShardSync asks of it."""

    def __init__(self) -> None:
        self.index = 0
        self.state = LinkState.LIVE
        self.epoch = 1
        self.ever_synced = True
        self.pvs = 0
        self.sent: list = []

    @property
    def live(self) -> bool:
        return self.state is LinkState.LIVE

    def synced(self, epoch: int, pvs: int) -> None:
        self.state, self.epoch, self.pvs = LinkState.LIVE, epoch, pvs

    def hello_sent(self) -> None:
        self.state = LinkState.SYNCING

    def send(self, msg) -> bool:
        self.sent.append(msg)
        return True

    def send_queued(self) -> None:
        pass


class FakePV:
    """Records, at each post, whether the broker takes its shard to be in sync."""

    def __init__(self, broker, name: str) -> None:
        self.broker, self.name, self.shard, self.real = broker, name, 0, True
        self.posts: list[tuple[float | None, bool]] = []
        self.value: float | None = None

    def _live(self) -> bool:
        return self.broker.links[self.shard].live

    def post(self, mask: int) -> None:
        self.posts.append((self.value, self._live()))

    def set_fields(self, stored) -> None:
        pass

    def apply(self, data, stamp, append, owned=False) -> None:
        self.value = float(data[0])
        self.post(1)


def _sync():
    link = FakeLink()
    broker = SimpleNamespace(
        links=[link],
        store_errors=[""],
        status_due=False,
        quiet_until=None,
        token="",
        instance=1,
        config=SimpleNamespace(front_ends=1),
        health=SimpleNamespace(restarts=[[]], shard_restarted=lambda k: None),
    )
    table = SimpleNamespace(
        pvs={}, unserved=set(), set_real=lambda pv, real: None, real_by_shard=[{}]
    )
    broker.table = table
    requests = SimpleNamespace(
        answered=lambda k, req: None,
        send=lambda link: None,
        number=iter(range(1, 100)).__next__,
        fail_orphans=lambda k: None,
        clocks=[SimpleNamespace(pinged=lambda req, now: None)],
    )
    broker.requests = requests
    sync = ShardSync(broker)
    pv = FakePV(broker, "a_f1")
    pv.value = 2.0
    table.pvs["a_f1"] = pv
    table.real_by_shard[0]["a_f1"] = pv
    return sync, link, pv


def test_a_restarted_shard_shows_away_until_its_snapshot_then_in_sync():
    sync, link, pv = _sync()
    # The shard answered with another epoch: it restarted under the live link.
    sync.hello(link)
    assert link.state is LinkState.SYNCING
    assert pv.posts == [(2.0, False)]  # the monitors hear it is away (COMM/INVALID)
    sync.handle(link, SnapshotBegin(1, 10, 2))
    sync.handle(link, Snapshot("a_f1", 5.0, np.array([1.0]), {}, 2))
    assert pv.posts == [(2.0, False)]  # nothing shown before the snapshot is whole
    sync.handle(link, SnapshotEnd(1, 10, "", 2))
    # The shard's (older) value, posted as in sync: one event, with the alarm it has.
    assert pv.posts == [(2.0, False), (1.0, True)]
    assert link.live and link.epoch == 2


def test_a_first_sync_posts_its_values_as_in_sync():
    sync, link, pv = _sync()
    link.state, link.ever_synced = LinkState.SYNCING, False
    sync.handle(link, SnapshotBegin(1, 10, 2))
    sync.handle(link, Snapshot("a_f1", 5.0, np.array([3.0]), {}, 2))
    sync.handle(link, SnapshotEnd(1, 10, "", 2))
    assert pv.posts == [(3.0, True)]


def test_the_ca_pvs_take_a_syncing_shard_for_away():
    from carelay.broker.app import Broker

    link = FakeLink()
    broker = SimpleNamespace(links=[link])
    assert Broker.shard_live(broker, 0)
    link.hello_sent()
    assert not Broker.shard_live(broker, 0)
