"""``[[ca]]``: the CA front doors, one broker each."""

from __future__ import annotations

from pathlib import Path

import pytest

from carelay.common.config import CaDoor, ConfigError, load_config
from carelay.common.configcheck import check_doors_here
from carelay.supervisor.cli import main

TWO_DOORS = """
[[ca]]
interfaces = ["10.0.1.5"]
port = 5064

[[ca]]
interfaces = ["10.0.2.5"]
port = 5064
"""


def test_each_ca_table_is_a_broker(tmp_path: Path):
    path = tmp_path / "carelay.toml"
    path.write_text(TWO_DOORS)
    config = load_config(path)
    assert config.ca == (CaDoor(("10.0.1.5",), 5064), CaDoor(("10.0.2.5",), 5064))
    assert config.brokers == 2


def test_without_ca_tables_there_is_one_broker():
    config = load_config()
    assert config.ca == () and config.brokers == 1


def test_a_broker_index_beyond_the_tables_is_refused(tmp_path: Path, capsys):
    path = tmp_path / "carelay.toml"
    path.write_text(TWO_DOORS)
    data = str(tmp_path / "data")
    assert main(["broker", "--config", str(path), "--data-dir", data, "--index", "2"]) == 2
    assert "broker index 2 not in 0..1" in capsys.readouterr().err


#: An address of no host (TEST-NET-1, RFC 5737): never one of this host's.
ELSEWHERE = "192.0.2.1"


def test_a_door_on_an_address_of_another_host_is_refused_here():
    doors = (CaDoor((ELSEWHERE,), 5064), CaDoor(("127.0.0.1",), 5064))
    with pytest.raises(ConfigError) as info:
        check_doors_here(doors, range(len(doors)))
    assert str(info.value).startswith(f"ca: entry 0: interface {ELSEWHERE!r}"), info.value
    assert "not an address of this host" in str(info.value)


def test_only_the_doors_this_host_serves_are_checked():
    # `carelay broker --index 1` on this host: door 0 is another host's.
    doors = (CaDoor((ELSEWHERE,), 5064), CaDoor(("127.0.0.1",), 5064), CaDoor((), 5065))
    check_doors_here(doors, [1, 2])
    check_doors_here(doors, [])


@pytest.mark.parametrize("command", [["up"], ["broker", "--index", "0"]])
def test_up_and_a_broker_refuse_a_door_on_another_hosts_address(tmp_path: Path, capsys, command):
    path = tmp_path / "carelay.toml"
    path.write_text(f'[[ca]]\ninterfaces = ["{ELSEWHERE}"]\nport = 5064\n')
    data = str(tmp_path / "data")
    assert main([*command, "--config", str(path), "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert f"interface {ELSEWHERE!r} is not an address of this host" in err, err
    assert not (tmp_path / "data" / "run").exists()  # nothing started


def test_up_with_pva_and_no_p4p_is_refused_before_anything_starts(
    tmp_path: Path, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "p4p" else real(name, *a)
    )
    data = str(tmp_path / "data")
    assert main(["up", "--pva", "true", "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert "PV Access needs p4p: pip install 'carelay[pva]'" in err, err
    assert not (tmp_path / "data" / "run").exists()  # nothing started
