"""With several front-ends (CA brokers, PVA), each keeps the creations it has in flight
to its share of what is left of max_pvs and max_bytes (PvTable.over_share): what another
front-end is creating is not among the PVs it has seen."""

from __future__ import annotations

import pytest

from carelay.broker.table import charge
from carelay.common.config import load_config
from tests.unit.test_attached_count import PREFIX, made_real, serving


def config_of(tmp_path, **kw):
    return load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path), **kw)


def creating(broker, name: str):
    """A creation sent to its shard and not answered yet."""
    pv = broker.table.pvs.get(name) or broker.table.new_pv(name)
    broker.table.reserve(pv, True)
    return pv


def name(k: int, tail: str = "f1") -> str:
    return f"{PREFIX}c{k}_{tail}"


def spec(broker, n: str):
    return broker.table.spec_and_shard(n)[0]


def test_alone_a_front_end_may_create_up_to_the_limit_at_once(tmp_path):
    broker = serving(config_of(tmp_path, max_pvs=10))
    assert broker.table.doors == 1
    for k in range(9):
        creating(broker, name(k))
    assert broker.table.over_limits(spec(broker, name(9)), creation=True) is None
    creating(broker, name(9))
    assert "max_pvs (10) reached" in broker.table.over_limits(spec(broker, name(10)), True)


def test_one_of_two_front_ends_keeps_its_creations_to_half_of_what_is_left(tmp_path):
    broker = serving(config_of(tmp_path, max_pvs=10, pva=True))
    table = broker.table
    assert table.doors == 2
    for k in range(4):
        made_real(broker, name(k))
    # 6 left: 3 may be on their way from this front-end at once.
    for k in range(4, 7):
        assert table.over_limits(spec(broker, name(k)), creation=True) is None, k
        creating(broker, name(k))
    why = table.over_limits(spec(broker, name(7)), creation=True)
    left = "2 front-ends share the 6 PVs left, and this one is creating 3"
    assert why == f"max_pvs (10) nearly reached: {left}"
    # A search is still answered: only the creation waits for its share.
    assert table.over_limits(spec(broker, name(7))) is None
    # Two done: 4 left, 1 in flight, so 1 more may go.
    for k in (4, 5):
        table.reserve(table.pvs[name(k)], False)
        made_real(broker, name(k))
    assert table.n_creating == 1
    assert table.over_limits(spec(broker, name(7)), creation=True) is None


def test_with_none_in_flight_one_creation_goes_up_to_the_limit(tmp_path):
    """A client that creates one PV at a time is never refused short of the limits."""
    broker = serving(config_of(tmp_path, max_pvs=3, pva=True))
    for k in range(2):
        made_real(broker, name(k))
    assert broker.table.over_limits(spec(broker, name(2)), creation=True) is None
    creating(broker, name(2))
    assert "max_pvs (3) reached" in broker.table.over_limits(spec(broker, name(3)), True)


def test_bytes_in_flight_keep_to_the_share_of_max_bytes(tmp_path):
    big = "F10000"  # 160 kB charged
    broker = serving(
        config_of(tmp_path, max_pvs=100, max_elements=10_000, max_bytes=1_000_000, pva=True)
    )
    table = broker.table
    each = charge(spec(broker, name(0, big)))
    assert each == 160_000
    for k in range(3):
        creating(broker, name(k, big))
    # 1,000,000 left but for its own 480,000: half is 500,000, and a fourth passes it.
    why = table.over_limits(spec(broker, name(3, big)), creation=True)
    assert why is not None and why.startswith("max_bytes (1000000) nearly reached: 2 front-ends")
    assert table.over_limits(spec(broker, name(2)), creation=True) is None  # a small one fits


@pytest.mark.parametrize("brokers", [2, 3])
def test_every_ca_broker_is_a_door_and_pva_one_more(tmp_path, brokers):
    ca = [{"port": 5064 + k, "interfaces": ["127.0.0.1"]} for k in range(brokers)]
    assert serving(config_of(tmp_path, ca=ca)).table.doors == brokers
    assert serving(config_of(tmp_path, ca=ca, pva=True)).table.doors == brokers + 1
