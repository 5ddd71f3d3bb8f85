"""The count of PVs with CA channels (relay:CA_CONN_CNT) is kept as channels come and go,
not walked at each health sample: after any sequence of attaches, last channels going
away, deletions and re-creations it says what a walk of every PV says."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from carelay.broker.app import Broker
from carelay.broker.link import LinkState
from carelay.common.config import load_config

PREFIX = "A:"


def walked(broker: Broker) -> int:
    """What the count was before it was kept: every PV the broker serves, walked."""
    t, h = broker.table, broker.health_pvs
    every = [t.pvs, t.field_pvs, broker.controls, h.pvs, h.field_pvs]
    return sum(1 for pvs in every for pv in pvs.values() if pv.attached)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path_factory.mktemp("data")))


def serving(config) -> Broker:
    broker = Broker(config, None)
    broker.links[0].state = LinkState.LIVE
    broker.ready = True  # the control PVs are served
    return broker


def made_real(broker: Broker, name: str) -> None:
    """A first put applied by the shard, as ShardSync._update does it."""
    pv = broker.table.pvs.get(name) or broker.table.new_pv(name)
    broker.table.set_real(pv, True)
    pv.apply(np.array([1], dtype=pv.spec.dtype), time.time(), append=False)


_OPS = st.sampled_from(["attach", "destroy", "real", "forget"])


@given(st.lists(st.tuples(_OPS, st.integers(0, 7), st.sampled_from([0, 1])), max_size=40))
def test_the_kept_count_is_what_a_walk_counts(config, steps):
    broker = serving(config)
    health = broker.health_pvs.base
    names = [
        f"{PREFIX}a_f1",
        f"{PREFIX}b_i1",
        f"{PREFIX}a_f1.EGU",
        f"{PREFIX}b_i1.HIGH",
        broker.pvlist.name,
        f"{health}HEARTBEAT",
        f"{health}PV_CNT.DESC",
        f"{PREFIX}c_F4",
    ]
    attached: dict[str, object] = {}
    for op, which, again in steps:
        name = names[which]
        base = name.partition(".")[0]
        if op == "attach":
            pv = broker.attach(name)
            assert pv is not None
            attached[name] = pv
            if again:  # PCAS asks again for a PV it already holds
                assert broker.attach(name) is pv
        elif op == "destroy" and name in attached:
            pv = attached.pop(name)
            pv.destroy()
            if again:  # told twice that the last channel went
                pv.destroy()
        elif op == "real" and base in names[:4] + names[7:]:
            made_real(broker, base)
        elif op == "forget":
            broker.table.forget(base)
        broker.table.graveyard.clear()
        assert broker.attached_count() == walked(broker)
    for pv in attached.values():
        pv.destroy()
    assert broker.attached_count() == walked(broker) == 0
