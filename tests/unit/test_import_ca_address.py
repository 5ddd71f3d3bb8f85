"""``carelay import`` into a running relay: its CA client searches where the relay's
broker serves (the door in the broker's status file), not where this shell says.

Stand-in processes play the supervisor, one shard and the brokers, as in
test_status_brokers.py.
"""

from __future__ import annotations

import os

import pytest

from carelay.common.config import load_config
from carelay.supervisor.transfer import _ca_environment, find_relay
from tests.unit.test_status_brokers import files
from tests.unit.test_status_view import stand_ins

CA_VARIABLES = (
    "EPICS_CA_ADDR_LIST",
    "EPICS_CA_AUTO_ADDR_LIST",
    "EPICS_CA_SERVER_PORT",
    "EPICS_CAS_INTF_ADDR_LIST",
)


@pytest.fixture
def config(tmp_path):
    config = load_config(data_dir=str(tmp_path / "data"), shards=1)
    config.run_dir.mkdir(parents=True)
    return config


@pytest.fixture
def environment(monkeypatch):
    """This process's CA variables, as the test sets them, restored afterwards."""
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def searched(config) -> tuple[str, str, str]:
    source = find_relay(config)
    assert source.running
    _ca_environment(source)
    return (
        os.environ["EPICS_CA_ADDR_LIST"],
        os.environ.get("EPICS_CA_SERVER_PORT", "-"),
        os.environ["EPICS_CA_AUTO_ADDR_LIST"],
    )


@pytest.fixture
def one_broker():
    with stand_ins("up", "shard", "broker") as pids:
        yield pids


@pytest.mark.parametrize(
    ("interfaces", "shell", "address"),
    [
        # Bound to one interface: only that address answers.
        (["10.0.1.5"], None, "10.0.1.5"),
        (["10.0.1.5"], "10.9.9.9", "10.0.1.5"),
        (["10.0.1.5", "10.0.2.5"], None, "10.0.1.5"),
        # Every interface: this host's loopback answers, whatever this shell says.
        ([], "10.9.9.9", "127.0.0.1"),
        (["0.0.0.0"], "10.9.9.9", "127.0.0.1"),
        (["10.0.1.5", "0.0.0.0"], None, "127.0.0.1"),
    ],
)
def test_the_search_goes_where_the_broker_serves(
    config, one_broker, environment, interfaces, shell, address
):
    if shell is not None:
        environment.setenv("EPICS_CAS_INTF_ADDR_LIST", shell)
    files(config.run_dir, one_broker, doors=[(interfaces, 5071)])
    assert searched(config) == (address, "5071", "NO")


@pytest.mark.parametrize(
    ("shell", "address"), [(None, "127.0.0.1"), ("10.9.9.9 0.0.0.0", "10.9.9.9")]
)
def test_a_broker_that_does_not_say_its_door_is_searched_as_before(
    config, one_broker, environment, shell, address
):
    if shell is not None:
        environment.setenv("EPICS_CAS_INTF_ADDR_LIST", shell)
    files(config.run_dir, one_broker, doors=[(None, 5071)])
    assert searched(config) == (address, "5071", "NO")


def test_with_several_brokers_a_ready_one_is_searched(config, environment):
    with stand_ins("up", "shard", "broker", "broker") as pids:
        doors = [(["10.0.1.5"], 5071), (["10.0.2.5"], 5072)]
        files(config.run_dir, pids, doors=doors)
        assert searched(config) == ("10.0.1.5", "5071", "NO")
        files(config.run_dir, pids, (False, True), doors=doors)
        assert searched(config) == ("10.0.2.5", "5072", "NO")
