"""Configuration: embedded defaults, one TOML file, command-line overrides.

Every default is a named constant in common/defaults.py, and importable from
here as well; the keys and the checks of their values are in
common/configcheck.py.  ``load_config`` is the one way to build a Config; it
raises ConfigError with a message that names the key and the problem, which
the command line turns into exit status 2.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from carelay.common.configcheck import (
    _TYPES,
    CaDoor,
    ConfigError,
    check_value,
    endpoint_problem,
)
from carelay.common.defaults import *  # noqa: F403 (every default, importable from here too)
from carelay.common.defaults import (
    CA_ARRAY_OVERHEAD,
    CA_BUFFER_SHARE,
    CA_LARGE_BUFFER_EXTRA,
    CA_SMALL_BUFFER,
    CHANNELS_PER_PV,
    DEFAULT_ACCESS_BY_IP,
    DEFAULT_AUTOSAVE_PERIOD,
    DEFAULT_CLIENT_IDLE_TIMEOUT,
    DEFAULT_DATA_DIR,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_NAME_LENGTH,
    DEFAULT_MAX_PVS,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_PREFIX,
    DEFAULT_PVA,
    DEFAULT_SHARDS,
    MAX_CA_ARRAY_BYTES,
    MAX_IPC_PATH,
    MIN_DEFAULT_CHANNELS,
    MIN_DEFAULT_CLIENTS,
)
from carelay.common.keys import is_loopback_endpoint
from carelay.common.naming import PvSpec, parse_pv_name


def configured_ca_port() -> str:
    """The CA server port a broker is given: EPICS_CAS_SERVER_PORT, then the client's
    EPICS_CA_SERVER_PORT, then CA's 5064 (PCAS serves TCP and UDP on it)."""
    return (
        os.environ.get("EPICS_CAS_SERVER_PORT") or os.environ.get("EPICS_CA_SERVER_PORT") or "5064"
    )


def ca_interfaces() -> list[str]:
    """The addresses a broker's CA server listens on, EPICS_CAS_INTF_ADDR_LIST (empty:
    all of them)."""
    return os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "").split()


def available_memory() -> int:
    """The machine's memory, or the container's limit (cgroup v2 or v1) if smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


@dataclass(frozen=True)
class Config:
    """The relay's effective configuration."""

    prefix: str = DEFAULT_PREFIX
    shards: int = DEFAULT_SHARDS
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_pvs: int = DEFAULT_MAX_PVS
    max_name_length: int = DEFAULT_MAX_NAME_LENGTH
    #: Bytes all PV values may take together; None: a quarter of the machine's memory.
    max_bytes: int | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    autosave_period: float = DEFAULT_AUTOSAVE_PERIOD
    #: Field defaults by glob on the name after the prefix: {"temperature_*": {"EGU": "degC"}}.
    fields: dict = field(default_factory=dict, hash=False)
    #: One ZeroMQ endpoint per shard; empty means ipc sockets in run_dir.
    endpoints: tuple[str, ...] = field(default=())
    #: The CA front doors (``[[ca]]``), one broker each; empty: one broker on the port and
    #: interfaces of the EPICS variables.
    ca: tuple[CaDoor, ...] = field(default=())
    #: EPICS access security file (UAG, HAG, ASG, RULE) governing read, write and create.
    access_security: Path | None = None
    #: The access security group of every relay PV.
    access_group: str = "DEFAULT"
    #: HAG entries are matched against the peer address of the client's circuit (their
    #: host names resolved at load and reload); False: against the host name it claims.
    access_by_ip: bool = DEFAULT_ACCESS_BY_IP
    #: Directory of the CurveZMQ certificates (``carelay keys DIR``); None: no encryption.
    keys_dir: Path | None = None
    #: TCP port of the Prometheus ``/metrics`` endpoint; None: not served.
    metrics_port: int | None = None
    #: Address that endpoint listens on.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    #: Most CA circuits the broker holds; None: as many as fit below FD_SETSIZE.
    max_clients: int | None = None
    #: Most channels one CA circuit holds; None: CHANNELS_PER_PV per PV of max_pvs.
    max_channels: int | None = None
    #: Seconds after which a circuit whose client sends and acknowledges nothing is closed.
    client_idle_timeout: float = DEFAULT_CLIENT_IDLE_TIMEOUT
    #: Serve PV Access too: `carelay up` starts and watches `carelay pva`.
    pva: bool = DEFAULT_PVA

    def pv_spec(self, name: str) -> PvSpec:
        """What ``name`` says under this prefix and these limits; InvalidPvName if nothing."""
        return parse_pv_name(name, self.prefix, self.max_elements, self.max_name_length)

    @property
    def run_dir(self) -> Path:
        """Where sockets and status files of a running relay live."""
        return self.data_dir / "run"

    def store_path(self, index: int) -> Path:
        """Shard ``index``'s autosave database."""
        return self.data_dir / f"shard-{index}.sqlite"

    @property
    def pvlist_name(self) -> str:
        return f"{self.prefix}pvlist"

    @property
    def delpv_name(self) -> str:
        return f"{self.prefix}delpv"

    @property
    def pvlist_count(self) -> int:
        """Elements of the pvlist char array: room for max_pvs names and commas."""
        return self.max_pvs * (self.max_name_length + 1)

    @property
    def byte_limit(self) -> int:
        """max_bytes, or a quarter of the memory this process may use."""
        if self.max_bytes is not None:
            return self.max_bytes
        return available_memory() // 4

    @property
    def ca_max_array_bytes(self) -> int:
        largest = max(self.max_elements * 8, self.pvlist_count)
        return largest + CA_ARRAY_OVERHEAD

    @property
    def circuit_bytes(self) -> int:
        """Most bytes of PCAS buffers one CA circuit can pin: a large receive and a large
        send buffer (taken by one large message each way, kept until the circuit closes,
        and then kept by PCAS for later circuits), and the small ones."""
        return 2 * (self.ca_max_array_bytes + CA_LARGE_BUFFER_EXTRA + CA_SMALL_BUFFER)

    @property
    def channel_limit(self) -> int:
        """max_channels, or CHANNELS_PER_PV channels per PV of max_pvs (at least
        MIN_DEFAULT_CHANNELS)."""
        if self.max_channels is not None:
            return self.max_channels
        return max(MIN_DEFAULT_CHANNELS, CHANNELS_PER_PV * self.max_pvs)

    @property
    def memory_client_limit(self) -> int:
        """The circuits whose buffers fit in CA_BUFFER_SHARE of the byte limit."""
        share = int(self.byte_limit * CA_BUFFER_SHARE) // self.circuit_bytes
        return max(MIN_DEFAULT_CLIENTS, share)

    @property
    def brokers(self) -> int:
        """How many CA brokers the relay runs."""
        return max(1, len(self.ca))

    @property
    def front_ends(self) -> int:
        """How many front-ends change PVs through the shards: the CA brokers and PVA."""
        return self.brokers + (1 if self.pva else 0)

    def shard_endpoint(self, index: int) -> str:
        if self.endpoints:
            return self.endpoints[index]
        path = (self.run_dir / f"shard-{index}.sock").resolve()
        if len(str(path)) > MAX_IPC_PATH:
            digest = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
            path = Path(tempfile.gettempdir()) / f"carelay-{digest}" / f"shard-{index}.sock"
        return f"ipc://{path}"


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Defaults, overlaid by the TOML file at ``path``, overlaid by ``overrides``.

    Overrides whose value is None are ignored, so parsed flags can be passed as they are.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in raw.items():
            if key not in _TYPES:
                raise ConfigError(f"{key}: unknown configuration key (in {path})")
            values[key] = check_value(key, value)
    for key, value in overrides.items():
        if key not in _TYPES:
            raise ConfigError(f"{key}: unknown configuration key")
        if value is not None:
            values[key] = check_value(key, value)
    config = Config(**values)
    if config.endpoints and len(config.endpoints) != config.shards:
        raise ConfigError(
            f"endpoints: {len(config.endpoints)} given for {config.shards} shards; give one each"
        )
    open_endpoints = [ep for ep in config.endpoints if not is_loopback_endpoint(ep)]
    if open_endpoints and config.keys_dir is None:
        raise ConfigError(
            f"endpoints: {open_endpoints[0]} listens beyond loopback, where anyone could write "
            "to the shards; set keys_dir to CurveZMQ keys made by `carelay keys DIR`"
        )
    if config.keys_dir is not None:
        for cert in ("shard.key", "broker.key"):
            try:
                there = (config.keys_dir / cert).is_file()
            except OSError as e:  # a directory this user may not read
                why = e.strerror or e
                raise ConfigError(f"keys_dir: cannot read {config.keys_dir}: {why}") from None
            if not there:
                raise ConfigError(f"keys_dir: {config.keys_dir / cert} is missing")
    if len(config.pvlist_name) > config.max_name_length:
        raise ConfigError("prefix: too long for max_name_length")
    if config.ca_max_array_bytes > MAX_CA_ARRAY_BYTES:
        raise ConfigError(
            f"max_pvs: {config.max_pvs} names of up to {config.max_name_length} characters "
            f"make a pvlist larger than CA carries ({MAX_CA_ARRAY_BYTES} bytes); "
            "lower max_pvs or max_name_length"
        )
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """A plain dict of ``config``, for status files and logs."""
    out = {}
    for f in fields(config):
        v = getattr(config, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


__all__ = [
    "CaDoor",
    "Config",
    "ConfigError",
    "load_config",
    "config_to_dict",
    "endpoint_problem",
    "replace",
]
