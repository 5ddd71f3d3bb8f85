"""Unit tests for configuration loading (carelay.common.config)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from carelay.common.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "carelay.toml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.prefix == "RELAY:"
    assert cfg.shards == 2
    assert cfg.data_dir == Path("./carelay-data")
    assert cfg.endpoints == ()
    assert cfg.log_level == "INFO"
    assert cfg.max_elements >= 1
    assert cfg == Config()


def test_toml_file(tmp_path):
    path = write(
        tmp_path,
        'prefix = "5trap:relay:"\nshards = 4\ndata_dir = "/srv/relay"\n'
        "max_elements = 5000\nmax_pvs = 20\nmax_name_length = 64\n"
        'log_level = "debug"\n',
    )
    cfg = load_config(path)
    assert cfg.prefix == "5trap:relay:"
    assert cfg.shards == 4
    assert cfg.data_dir == Path("/srv/relay")
    assert cfg.max_elements == 5000
    assert cfg.max_pvs == 20
    assert cfg.max_name_length == 64
    assert cfg.log_level == "DEBUG"


def test_str_path_accepted(tmp_path):
    path = write(tmp_path, "shards = 3\n")
    assert load_config(str(path)).shards == 3


def test_overrides_overlay_file(tmp_path):
    path = write(tmp_path, 'prefix = "FILE:"\nshards = 4\nlog_level = "ERROR"\n')
    cfg = load_config(path, shards=8, data_dir=str(tmp_path / "d"))
    assert cfg.prefix == "FILE:"
    assert cfg.shards == 8
    assert cfg.data_dir == tmp_path / "d"
    assert cfg.log_level == "ERROR"


def test_none_overrides_ignored(tmp_path):
    path = write(tmp_path, 'prefix = "FILE:"\nshards = 4\n')
    cfg = load_config(path, prefix=None, shards=None, data_dir=None, log_level=None)
    assert cfg.prefix == "FILE:"
    assert cfg.shards == 4
    assert load_config(shards=None) == Config()


def test_overrides_without_file():
    cfg = load_config(prefix="X:", shards=1, max_elements=10)
    assert (cfg.prefix, cfg.shards, cfg.max_elements) == ("X:", 1, 10)


def test_endpoints(tmp_path):
    path = write(tmp_path, 'shards = 2\nendpoints = ["tcp://127.0.0.1:5001", "ipc:///tmp/x"]\n')
    cfg = load_config(path)
    assert cfg.endpoints == ("tcp://127.0.0.1:5001", "ipc:///tmp/x")
    assert cfg.shard_endpoint(0) == "tcp://127.0.0.1:5001"
    assert cfg.shard_endpoint(1) == "ipc:///tmp/x"


# -- errors name the key ----------------------------------------------------------------


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "shards = 2\nshard_count = 3\n")
    with pytest.raises(ConfigError, match="shard_count"):
        load_config(path)


def test_table_in_file_is_unknown_key(tmp_path):
    path = write(tmp_path, "[relay]\nshards = 2\n")
    with pytest.raises(ConfigError, match="relay"):
        load_config(path)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(bogus=1)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('shards = "2"\n', "shards"),
        ("shards = true\n", "shards"),
        ("shards = 2.0\n", "shards"),
        ("max_elements = false\n", "max_elements"),
        ("max_pvs = true\n", "max_pvs"),
        ('max_name_length = "64"\n', "max_name_length"),
        ("prefix = 5\n", "prefix"),
        ("log_level = 10\n", "log_level"),
        ("data_dir = 1\n", "data_dir"),
        ('endpoints = "tcp://a:1"\n', "endpoints"),
        ("endpoints = [1, 2]\n", "endpoints"),
    ],
)
def test_wrong_types_in_file(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("key", "value"),
    [("shards", "2"), ("shards", True), ("max_elements", False), ("max_pvs", 1.5), ("prefix", 3)],
)
def test_wrong_types_in_overrides(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(**{key: value})


@pytest.mark.parametrize("shards", [0, -1, 65, 1000])
def test_shards_out_of_range(shards, tmp_path):
    with pytest.raises(ConfigError, match="shards"):
        load_config(shards=shards)
    with pytest.raises(ConfigError, match="shards"):
        load_config(write(tmp_path, f"shards = {shards}\n"))


@pytest.mark.parametrize("shards", [1, 64])
def test_shards_bounds_accepted(shards):
    assert load_config(shards=shards).shards == shards


@pytest.mark.parametrize("level", ["VERBOSE", "", "trace", "CRITICAL"])
def test_bad_log_level(level):
    with pytest.raises(ConfigError, match="log_level"):
        load_config(log_level=level)


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error"])
def test_log_level_case_insensitive(level):
    assert load_config(log_level=level).log_level == level.upper()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prefix", ""),
        ("prefix", "A B:"),
        ("prefix", "A.B:"),
        ("prefix", "Ä:"),
        ("max_elements", 0),
        ("max_elements", 100_000_001),
        ("max_pvs", 0),
        ("max_name_length", 7),
        ("max_name_length", 1025),
        ("data_dir", ""),
    ],
)
def test_bad_values(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(**{key: value})


def test_prefix_too_long_for_max_name_length():
    with pytest.raises(ConfigError, match="prefix"):
        load_config(prefix="P" * 10, max_name_length=12)


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(missing)
    assert "nope.toml" in str(info.value)


def test_directory_as_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["shards = \n", "shards = 2\nshards = 3\n", "[[x\n", "a b c"])
def test_invalid_toml(tmp_path, text):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, text))


def test_invalid_utf8_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'prefix = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="TOML"):
        load_config(path)


@pytest.mark.parametrize("n", [1, 3])
def test_endpoints_count_not_matching_shards(n):
    eps = [f"tcp://127.0.0.1:{5000 + k}" for k in range(n)]
    with pytest.raises(ConfigError, match="endpoints"):
        load_config(shards=2, endpoints=eps)


def test_endpoints_count_not_matching_shards_from_file(tmp_path):
    path = write(tmp_path, 'shards = 3\nendpoints = ["tcp://a:1", "tcp://a:2"]\n')
    with pytest.raises(ConfigError, match="endpoints"):
        load_config(path)


def test_endpoint_scheme_checked():
    with pytest.raises(ConfigError, match="endpoints"):
        load_config(shards=1, endpoints=["udp://127.0.0.1:5000"])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# -- derived values -----------------------------------------------------------------------


def test_shard_endpoint_ipc_under_run_dir(tmp_path):
    cfg = load_config(data_dir=str(tmp_path), shards=3)
    run = (tmp_path / "run").resolve()
    assert cfg.run_dir == tmp_path / "run"
    for k in range(3):
        ep = cfg.shard_endpoint(k)
        assert ep == f"ipc://{run}/shard-{k}.sock"
        assert len(ep) - len("ipc://") <= 100
    assert len({cfg.shard_endpoint(k) for k in range(3)}) == 3


def test_shard_endpoint_relative_data_dir_is_absolute():
    ep = load_config().shard_endpoint(0)
    path = Path(ep.removeprefix("ipc://"))
    assert ep.startswith("ipc://")
    assert path.is_absolute()
    assert path.parent.name == "run"
    assert path.parent.parent.name == "carelay-data"


def test_shard_endpoint_long_data_dir_falls_back_to_short_temp_path(tmp_path):
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    cfg = load_config(data_dir=str(long_dir), shards=2)
    eps = [cfg.shard_endpoint(k) for k in range(2)]
    paths = [Path(ep.removeprefix("ipc://")) for ep in eps]
    for k, (ep, path) in enumerate(zip(eps, paths, strict=True)):
        assert ep.startswith("ipc://")
        assert len(str(path)) <= 100
        assert path.parent.parent == Path(tempfile.gettempdir())
        assert path.parent.name.startswith("carelay-")
        assert path.name == f"shard-{k}.sock"
        assert str(long_dir) not in ep
    assert eps[0] != eps[1]
    # Deterministic, and distinct for another long data_dir.
    assert cfg.shard_endpoint(0) == eps[0]
    other = load_config(data_dir=str(long_dir) + "x").shard_endpoint(0)
    assert other != eps[0]


@pytest.mark.parametrize("max_elements", [1, 1000, 1_000_000, 100_000_000])
def test_ca_max_array_bytes_covers_largest_array(max_elements):
    cfg = load_config(max_elements=max_elements)
    assert cfg.ca_max_array_bytes >= 8 * max_elements
    assert cfg.ca_max_array_bytes >= cfg.pvlist_count


def test_pv_names_use_prefix():
    cfg = load_config(prefix="5trap:relay:")
    assert cfg.pvlist_name == "5trap:relay:pvlist"
    assert cfg.delpv_name == "5trap:relay:delpv"
