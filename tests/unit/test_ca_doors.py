"""``[[ca]]``: the CA front doors, one broker each."""

from __future__ import annotations

from pathlib import Path

from carelay.common.config import CaDoor, load_config
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
