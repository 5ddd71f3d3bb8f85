"""Every configuration key, fed wrong values: each is refused with a ConfigError naming it.

The same table drives the command-line test (tests/system/test_config_cli.py), where
``carelay up`` must exit 2 with one line before it starts anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from carelay.common.config import _TYPES, ConfigError, load_config

#: (key, TOML line) for wrong values of every key; the file also sets ``shards = 1`` unless
#: the line sets shards itself, so that one endpoint is the right count.
BAD_VALUES: list[tuple[str, str]] = [
    ("prefix", "prefix = 5"),
    ("prefix", 'prefix = ""'),
    ("prefix", 'prefix = "A B:"'),
    ("prefix", 'prefix = "A.B:"'),
    ("prefix", 'prefix = "A\\u0000:"'),
    ("prefix", 'prefix = "A\\u0007:"'),
    ("shards", 'shards = "2"'),
    ("shards", "shards = 0"),
    ("shards", "shards = 65"),
    ("shards", "shards = 1.5"),
    ("data_dir", "data_dir = 1"),
    ("data_dir", 'data_dir = ""'),
    ("data_dir", 'data_dir = "a\\u0000b"'),
    ("max_elements", "max_elements = 0"),
    ("max_elements", "max_elements = 100000001"),
    ("max_elements", "max_elements = true"),
    ("max_pvs", "max_pvs = 0"),
    ("max_pvs", "max_pvs = 1e3"),
    ("max_name_length", "max_name_length = 7"),
    ("max_name_length", "max_name_length = 1025"),
    ("max_bytes", "max_bytes = 0"),
    ("max_bytes", 'max_bytes = "1G"'),
    ("log_level", 'log_level = "LOUD"'),
    ("log_level", "log_level = 10"),
    ("autosave_period", "autosave_period = 0"),
    ("autosave_period", "autosave_period = inf"),
    ("autosave_period", "autosave_period = nan"),
    ("autosave_period", 'autosave_period = "1s"'),
    ("fields", "fields = 3"),
    ("fields", 'fields = {"t*" = {NOPE = 1}}'),
    ("fields", 'fields = {"t*" = {PREC = "x"}}'),
    ("ca", "ca = {port = 5064}"),
    ("ca", "ca = [5064]"),
    ("ca", "ca = [{port = 0}]"),
    ("ca", 'ca = [{port = 5064, interfaces = "10.0.1.5"}]'),
    ("ca", "ca = [{port = 5064, intf = []}]"),
    ("ca", 'ca = [{port = 5064, interfaces = ["foo"]}]'),
    ("ca", 'ca = [{port = 5064, interfaces = ["10.0.1.5:5064"]}]'),
    ("ca", 'ca = [{port = 5064, interfaces = ["::1"]}]'),
    ("ca", 'ca = [{port = 5064, interfaces = ["10.0.1"]}]'),
    ("ca", 'ca = [{port = 5064, interfaces = ["224.0.2.1"]}]'),
    ("ca", 'ca = [{port = 5064, interfaces = ["255.255.255.255"]}]'),
    ("ca", "ca = [{port = 5064, interfaces = [5064]}]"),
    ("ca", 'ca = [{port = 5064, interfaces = ["10.0.1.5", "10.0.1.5"]}]'),
    ("ca", 'ca = [{port = 5064, interfaces = ["0.0.0.0", "10.0.1.5"]}]'),
    ("ca", 'ca = [{port = 5064}, {port = 5064, interfaces = ["10.0.1.5"]}]'),
    (
        "ca",
        'ca = [{port = 5064, interfaces = ["10.0.1.5"]}, {port = 5064, interfaces = ["0.0.0.0"]}]',
    ),
    (
        "ca",
        'ca = [{port = 5064, interfaces = ["10.0.1.5", "10.0.2.5"]}, '
        '{port = 5064, interfaces = ["10.0.2.5"]}]',
    ),
    ("ca", "ca = [{port = 5064}, {port = 5064}]"),
    ("endpoints", 'endpoints = "tcp://127.0.0.1:5701"'),
    ("endpoints", "endpoints = [1]"),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:notaport"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:0"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:65536"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:-1"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:"]'),
    ("endpoints", 'endpoints = ["tcp://:5701"]'),
    ("endpoints", 'endpoints = ["tcp://*:5701"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:*"]'),
    ("endpoints", 'endpoints = ["tcp://bad host:5701"]'),
    ("endpoints", 'endpoints = ["tcp://256.0.0.1:5701"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0:5701"]'),
    ("endpoints", 'endpoints = ["tcp://127.0.0.1:5701;127.0.0.1:5702"]'),
    ("endpoints", 'endpoints = ["tcp://[::1:5701"]'),
    ("endpoints", 'endpoints = ["tcp://[nonsense]:5701"]'),
    ("endpoints", 'endpoints = ["ipc://"]'),
    ("endpoints", 'endpoints = ["ipc://*"]'),
    ("endpoints", 'endpoints = ["ipc:///tmp/a\\u0000b"]'),
    ("endpoints", f'endpoints = ["ipc:///tmp/{"x" * 120}"]'),
    ("endpoints", 'endpoints = ["inproc://shard-0"]'),
    ("endpoints", 'endpoints = ["udp://127.0.0.1:5701"]'),
    ("endpoints", 'endpoints = ["127.0.0.1:5701"]'),
    ("endpoints", 'shards = 2\nendpoints = ["tcp://127.0.0.1:5701", "tcp://127.0.0.1:5701"]'),
    ("endpoints", 'shards = 2\nendpoints = ["tcp://127.0.0.1:5701"]'),
    ("keys_dir", "keys_dir = 1"),
    ("keys_dir", 'keys_dir = ""'),
    ("keys_dir", 'keys_dir = "/nonexistent/carelay-keys"'),
    ("access_security", "access_security = 1"),
    ("access_security", 'access_security = "/nonexistent/relay.acf"'),
    ("access_group", "access_group = 1"),
    ("access_group", 'access_group = ""'),
    ("access_group", 'access_group = "A\\nB"'),
    ("access_by_ip", 'access_by_ip = "yes"'),
    ("pva", 'pva = "yes"'),
    ("metrics_port", "metrics_port = 0"),
    ("metrics_port", 'metrics_port = "9100"'),
    ("metrics_address", 'metrics_address = "not an address"'),
    ("metrics_address", 'metrics_address = "127.0.0.1:9100"'),
    ("metrics_address", 'metrics_address = "[::1]"'),
    ("metrics_address", 'metrics_address = "http://127.0.0.1"'),
    ("metrics_address", 'metrics_address = "127.0.0"'),
    ("metrics_address", 'metrics_address = ""'),
    ("max_clients", "max_clients = 0"),
    ("max_clients", "max_clients = 1024"),
    ("max_clients", 'max_clients = "10"'),
    ("max_channels", "max_channels = 0"),
    ("max_channels", "max_channels = 10000001"),
    ("max_channels", "max_channels = 1.5"),
    ("client_idle_timeout", "client_idle_timeout = 0.5"),
    ("client_idle_timeout", "client_idle_timeout = nan"),
    ("client_idle_timeout", 'client_idle_timeout = "10 min"'),
    ("shard_count", "shard_count = 3"),
    ("relay", "[relay]\nshards = 2"),
]


def toml_text(line: str) -> str:
    shards = "" if line.startswith("shards") or "\nshards" in line else "shards = 1\n"
    # A table header must come last: every key after it would belong to the table.
    return f"{shards}{line}\n"


def test_every_key_has_a_wrong_value():
    assert set(_TYPES) <= {key for key, _ in BAD_VALUES}


@pytest.mark.parametrize(("key", "line"), BAD_VALUES, ids=[line for _, line in BAD_VALUES])
def test_wrong_value_is_refused_naming_the_key(tmp_path: Path, key: str, line: str):
    path = tmp_path / "carelay.toml"
    path.write_text(toml_text(line))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{key}:"), message


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5701",
        "tcp://localhost:1",
        "tcp://shard-0.carelay.svc.cluster.local:65535",
        "tcp://10.0.0.5:5701",
        "tcp://[::1]:5701",
        "ipc:///tmp/carelay/shard-0.sock",
        "ipc://shard-0.sock",
        "ipc://@carelay-shard-0",
    ],
)
def test_good_endpoints_are_accepted(endpoint: str, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("shard.key", "broker.key"):
        (keys / name).write_text("")
    config = load_config(shards=1, endpoints=[endpoint], keys_dir=str(keys))
    assert config.endpoints == (endpoint,)


@pytest.mark.parametrize(
    "doors",
    [
        [{"port": 5064, "interfaces": ["10.0.1.5"]}, {"port": 5064, "interfaces": ["10.0.2.5"]}],
        [{"port": 5064}, {"port": 5065, "interfaces": ["10.0.1.5"]}],
        [{"port": 5064, "interfaces": ["0.0.0.0"]}, {"port": 5065}],
        [{"port": 5064, "interfaces": ["127.0.0.1", "10.0.1.5"]}],
    ],
)
def test_good_ca_doors_are_accepted(doors: list[dict]):
    config = load_config(ca=doors)
    assert [door.port for door in config.ca] == [door["port"] for door in doors]


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "metrics.example.org"]
)
def test_good_metrics_addresses_are_accepted(address: str):
    assert load_config(metrics_address=address).metrics_address == address
