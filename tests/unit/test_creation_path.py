"""The broker's side of a creation: a name searched and attached is parsed once."""

from __future__ import annotations

import pytest

from carelay.broker.app import Broker
from carelay.broker.link import LinkState
from carelay.broker.table import SPEC_CACHE
from carelay.common.config import Config, load_config
from carelay.common.naming import parse_pv_name
from carelay.common.sharding import shard_for

PREFIX = "C:"


@pytest.fixture
def broker(tmp_path):
    config = load_config(prefix=PREFIX, shards=3, data_dir=str(tmp_path))
    b = Broker(config, None)
    for link in b.links:
        link.state = LinkState.LIVE
    b.ready = True
    return b


@pytest.fixture
def parses(monkeypatch):
    """The names Config.pv_spec parsed, in order."""
    seen: list[str] = []
    parse = Config.pv_spec

    def counted(self, name):
        seen.append(name)
        return parse(self, name)

    monkeypatch.setattr(Config, "pv_spec", counted)
    return seen


def test_search_then_attach_parses_the_name_once(broker, parses):
    names = [f"{PREFIX}n{i}_f1" for i in range(50)]
    for name in names:
        assert broker.claims(name)
    for name in names:
        pv = broker.attach(name)
        assert pv.spec == parse_pv_name(name, PREFIX, 1_000_000, 128)
        assert pv.shard == shard_for(name, 3)
    assert sorted(parses) == sorted(names)


def test_a_field_of_a_new_pv_shares_the_parse(broker, parses):
    name = f"{PREFIX}fld_i1"
    assert broker.claims(f"{name}.EGU")
    assert broker.attach(f"{name}.EGU") is not None
    assert broker.attach(name) is not None
    assert parses == [name]


def test_a_refused_name_is_refused_each_time_and_the_memory_is_bounded(broker, parses):
    bad = f"{PREFIX}no_type_here"
    assert not broker.claims(bad)
    assert not broker.claims(bad)
    assert parses == [bad, bad]
    assert broker.table.spec_and_shard.cache_info().maxsize == SPEC_CACHE
    for i in range(SPEC_CACHE + 10):
        broker.claims(f"{PREFIX}m{i}_f1")
    assert broker.table.spec_and_shard.cache_info().currsize == SPEC_CACHE
