"""Configuration: embedded defaults, one TOML file, command-line overrides.

Every default lives here as a named constant.  ``load_config`` is the one
way to build a Config; it raises ConfigError with a message that names the
key and the problem, which the command line turns into exit status 2.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from carelay.common.fields import FieldError, validate_defaults
from carelay.common.keys import is_loopback_endpoint
from carelay.common.naming import PvSpec, parse_pv_name

DEFAULT_PREFIX = "RELAY:"
DEFAULT_SHARDS = 2
DEFAULT_DATA_DIR = "./carelay-data"
DEFAULT_MAX_ELEMENTS = 1_000_000
DEFAULT_MAX_PVS = 10_000
DEFAULT_MAX_NAME_LENGTH = 128
DEFAULT_LOG_LEVEL = "INFO"
#: HAG membership by the peer address of a client's circuit, not the host name it claims.
DEFAULT_ACCESS_BY_IP = True
#: Seconds between value flushes of each shard's autosave.
DEFAULT_AUTOSAVE_PERIOD = 1.0
#: A shard's autosave writes the values changed in a period in parts of about this many
#: bytes, one after the other: each part is copied for the autosave thread (buffers change
#: under later puts), and the copies must not add up to a second copy of the shard.
AUTOSAVE_PART_BYTES = 8 * 1024 * 1024
MAX_SHARDS = 64
#: Copies of a PV's values the relay holds: the owning shard's and the broker's mirror.
#: ``max_bytes`` charges each PV its values at full capacity times this, so that it bounds
#: what all the relay's processes together hold (README, "what a client can cost you").
VALUE_COPIES = 2
#: malloc arenas per process (glibc M_ARENA_MAX): threads (the autosave) share them
#: instead of each keeping freed memory of its own.
MALLOC_ARENAS = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Seconds between heartbeats on every broker-shard link, both ways.
HEARTBEAT_INTERVAL = 0.5
#: Missed heartbeats after which a peer counts as gone.
HEARTBEAT_LIVENESS = 4
#: Reconnect back-off of the broker's shard links (seconds).
RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 5.0
#: How long a put with callback waits for its shard before it fails.
PUT_TIMEOUT = 5.0
#: A request that waits for an answer carries a wall-clock expiry this many seconds before
#: the broker's own deadline (PUT_TIMEOUT); a shard drops what reaches it later, so that a
#: put the broker has failed is never applied.  It covers the time from the shard's apply
#: to the broker's reading of the answer, and the clock difference of two hosts.
EXPIRY_MARGIN = 1.0
#: How long a CA read waits for puts in flight to that PV before it answers.
READ_SYNC_TIMEOUT = 1.0
#: How long after its shard's link went down a put still waits for the shard to be back
#: (a restart) before it fails (seconds).
PUT_RECONNECT_GRACE = 2.0
#: Restart back-off of the supervisor (seconds), doubling up to the cap.
RESTART_BACKOFF_INITIAL = 0.25
RESTART_BACKOFF_MAX = 10.0
#: A child that ran this long is healthy again: its back-off resets.
RESTART_RESET_AFTER = 30.0
#: Grace period for children on shutdown before SIGKILL.
STOP_GRACE = 3.0
#: How often processes write their status file.
STATUS_INTERVAL = 1.0
#: A process whose status file is this many intervals old does not answer.
STATUS_STALE_INTERVALS = 5
#: Seconds a (re)started process may take before ``carelay status`` expects it to answer:
#: its first status file, and the broker's link, which retries after up to RECONNECT_MAX.
STARTUP_GRACE = (
    RECONNECT_MAX
    + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
    + STATUS_INTERVAL * STATUS_STALE_INTERVALS
)
#: Seconds between updates of the health PVs (``<prefix>relay:``) and of ``/metrics``.
HEALTH_INTERVAL = 1.0
#: Refusals and failures kept for ``relay:ERRORS`` (newest last), and the longest line.
ERRORS_KEPT = 50
ERROR_LINE_MAX = 256
#: Where ``/metrics`` listens when ``metrics_port`` is set: loopback unless told.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
#: ``relay:MAX_BYTES_USED`` alarm limits (percent of max_bytes).
MAX_BYTES_HIGH = 80.0
MAX_BYTES_HIHI = 95.0
#: ``relay:FD_FREE`` alarm limits, as iocStats sets them.
FD_FREE_LOW = 20
FD_FREE_LOLO = 5
#: ``relay:shard<K>:FLUSH_AGE`` alarm limits, in autosave periods.
FLUSH_AGE_HIGH_PERIODS = 5
FLUSH_AGE_HIHI_PERIODS = 20
#: A shard that restarted this many times within the window (seconds) and is not in sync
#: is FAILING (it keeps dying), not merely NOT_ANSWERING.
SHARD_FAILING_RESTARTS = 3
SHARD_FAILING_WINDOW = 60.0
#: In a data directory: the lock that one relay holds while it runs (its pid inside),
#: the lock of a broker started alone, and the token of processes started alone.
RUN_LOCK_FILE = "carelay.lock"
BROKER_LOCK_FILE = "broker.lock"
TOKEN_FILE = "carelay.token"
#: Seconds a starting broker keeps quiet about each shard getting in sync before it says
#: which shards it still waits for (when all are in sync sooner, its ready line says it).
STARTUP_QUIET = 2.0
#: Seconds between two progress lines of a long resharding or import.
PROGRESS_INTERVAL = 5.0
#: PVs that a resharding or an import into stopped stores commits at a time.
TRANSFER_CHUNK = 500
#: Seconds ``carelay import`` waits for a PV of the running relay to connect or a put
#: with callback to complete.
IMPORT_CA_TIMEOUT = 10.0
#: Seconds between two log lines about peers refused for want of the relay's token.
REFUSED_PEER_LOG_INTERVAL = 10.0
#: Bytes of memory the broker keeps refused names in (each logged once while remembered); a
#: long name is kept as a digest, so the oldest are forgotten by bytes, not by count.
REFUSED_MEMORY_BYTES = 1 << 20
#: Characters of a client's name that a log line carries at most.
LOGGED_NAME_CHARS = 128
#: Refusals logged one by one per REFUSAL_LOG_WINDOW; beyond them, one summary line.
REFUSAL_LOG_LINES = 100
REFUSAL_LOG_WINDOW = 60.0
#: What the broker's C code (PCAS) writes to stderr becomes log lines: at most
#: C_LOG_LINES per C_LOG_WINDOW seconds, each at most C_LINE_CHARS long; the rest counted.
C_LOG_LINES = 20
C_LOG_WINDOW = 60.0
C_LINE_CHARS = 200
#: PCAS waits in select(), which ignores descriptors from FD_SETSIZE on: the broker keeps
#: its soft RLIMIT_NOFILE there, so that every circuit PCAS accepts is one it serves.
FD_SETSIZE = 1024
#: Descriptors kept free for the broker's own sockets (ZeroMQ reconnects, status files)
#: beyond those it holds at start; max_clients defaults to what is left.
BROKER_FD_HEADROOM = 64
#: Default of client_idle_timeout: a circuit whose client neither sends nor acknowledges
#: anything for this long (seconds) is closed, as an IOC drops a silent client.
DEFAULT_CLIENT_IDLE_TIMEOUT = 600.0
#: A circuit that sent more than a small CA message and then fell silent (no data, no
#: acknowledgement) for this long (seconds) is closed: it may hold a large receive buffer
#: for a message it never finishes.  Live CA clients send an echo after 30 s of quiet.
CLIENT_STALL_TIMEOUT = 60.0
#: A circuit that has sent no byte this long (seconds) after connecting is no CA client
#: yet: when circuits are over max_clients, such circuits go first.
CLIENT_SILENT_GRACE = 1.0
#: Seconds between two log lines about circuits refused or closed (counted meanwhile).
CIRCUIT_LOG_INTERVAL = 10.0
#: Seconds between two full scans of the broker's circuits while nothing changes.
CIRCUIT_SCAN_INTERVAL = 1.0
#: Bytes of PCAS's small per-circuit buffers: a message larger than this makes PCAS take a
#: large buffer (EPICS_CA_MAX_ARRAY_BYTES) for the circuit, kept until the circuit closes.
CA_SMALL_BUFFER = 16384
#: PCAS's large buffer: EPICS_CA_MAX_ARRAY_BYTES plus room for a CA extended header.
CA_LARGE_BUFFER_EXTRA = 24
#: Share of the byte limit (max_bytes) that the CA buffers of all circuits may pin when
#: max_clients is not set; max_clients then defaults to what that share holds ...
CA_BUFFER_SHARE = 0.25
#: ... but never to fewer circuits than this.
MIN_DEFAULT_CLIENTS = 16
#: Bytes per CA array beyond the payload, for EPICS_CA_MAX_ARRAY_BYTES.
CA_ARRAY_OVERHEAD = 16384
#: Longest unix socket path (sun_path less a margin).
_MAX_IPC_PATH = 100
#: Longest unix socket path the kernel takes (sun_path is 108 bytes with its final NUL).
_MAX_SUN_PATH = 107
#: A DNS host name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
#: Largest EPICS_CA_MAX_ARRAY_BYTES that PCAS starts with (a signed 32-bit size).
_MAX_CA_ARRAY_BYTES = 2**31 - 1


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


class ConfigError(ValueError):
    """An invalid configuration: the message names the key and the problem."""


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
    #: Seconds after which a circuit whose client sends and acknowledges nothing is closed.
    client_idle_timeout: float = DEFAULT_CLIENT_IDLE_TIMEOUT

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
    def memory_client_limit(self) -> int:
        """The circuits whose buffers fit in CA_BUFFER_SHARE of the byte limit."""
        share = int(self.byte_limit * CA_BUFFER_SHARE) // self.circuit_bytes
        return max(MIN_DEFAULT_CLIENTS, share)

    def shard_endpoint(self, index: int) -> str:
        if self.endpoints:
            return self.endpoints[index]
        path = (self.run_dir / f"shard-{index}.sock").resolve()
        if len(str(path)) > _MAX_IPC_PATH:
            digest = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
            path = Path(tempfile.gettempdir()) / f"carelay-{digest}" / f"shard-{index}.sock"
        return f"ipc://{path}"


def _numeric_host_ok(host: str) -> bool:
    """A name whose last label is a number is an IPv4 address, and must be a valid one."""
    if not host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        return True
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot link the broker to a shard, or None if it can.

    The shard binds the endpoint and the broker connects to the very same
    string, so it must name one place both can reach: ``tcp://HOST:PORT`` with
    a host name or address (not ``*``) and a port from 1 to 65535, or
    ``ipc://PATH``.  ``inproc://`` joins threads of one process, and the
    broker and the shards are separate processes.
    """
    if endpoint.startswith("tcp://"):
        rest = endpoint[len("tcp://") :]
        if ";" in rest:
            return "a tcp source address (HOST;HOST:PORT) is not supported"
        if rest.startswith("["):
            host, bracket, port = rest[1:].partition("]")
            if not bracket or not port.startswith(":"):
                return "an IPv6 address goes in brackets: tcp://[ADDRESS]:PORT"
            port = port[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                return f"{host!r} is not an IPv6 address"
        else:
            host, colon, port = rest.rpartition(":")
            if not colon:
                return "needs a port: tcp://HOST:PORT"
            if host == "*":
                return "the broker connects to it too: name the shard's host, not '*'"
            if not _HOSTNAME.fullmatch(host) or not _numeric_host_ok(host):
                return f"{host!r} is not a host name or address"
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {port!r} is not a number from 1 to 65535"
        return None
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path or path == "*":
            return "needs a socket path: ipc:///PATH"
        if "\0" in path:
            return "the path holds a NUL character"
        if len(path.encode()) > _MAX_SUN_PATH:
            return f"the path is longer than {_MAX_SUN_PATH} bytes, which unix sockets allow"
        return None
    if endpoint.startswith("inproc://"):
        return "inproc:// joins threads of one process; shards are separate processes"
    return "must be tcp://HOST:PORT or ipc://PATH"


_TYPES: dict[str, type | tuple[type, ...]] = {
    "prefix": str,
    "shards": int,
    "data_dir": (str, Path),
    "max_elements": int,
    "max_pvs": int,
    "max_name_length": int,
    "max_bytes": int,
    "log_level": str,
    "autosave_period": (int, float),
    "fields": dict,
    "endpoints": list,
    "keys_dir": (str, Path),
    "access_security": (str, Path),
    "access_group": str,
    "access_by_ip": bool,
    "metrics_port": int,
    "metrics_address": str,
    "max_clients": int,
    "client_idle_timeout": (int, float),
}


def _check(key: str, value: Any) -> Any:
    expected = _TYPES[key]
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, expected):
        label = {
            "data_dir": "text",
            "keys_dir": "text",
            "access_security": "text",
            "autosave_period": "a number",
            "client_idle_timeout": "a number",
        }.get(key)
        label = label or expected.__name__
        raise ConfigError(f"{key}: expected {label}, got {value!r}")
    if key == "prefix":
        if (
            not value
            or not value.isascii()
            or any(c.isspace() or not c.isprintable() or c == "." for c in value)
        ):
            raise ConfigError(
                f"prefix: must be non-empty printable ASCII without spaces or '.', got {value!r}"
            )
    elif key == "shards" and not 1 <= value <= MAX_SHARDS:
        raise ConfigError(f"shards: must be from 1 to {MAX_SHARDS}, got {value}")
    elif key in ("max_elements", "max_pvs", "max_bytes") and value < 1:
        raise ConfigError(f"{key}: must be at least 1, got {value}")
    elif key == "max_elements" and value > 100_000_000:
        raise ConfigError(f"max_elements: must be at most 100000000, got {value}")
    elif key == "max_name_length" and not 8 <= value <= 1024:
        raise ConfigError(f"max_name_length: must be from 8 to 1024, got {value}")
    elif key == "fields":
        try:
            value = validate_defaults(value)
        except FieldError as e:
            raise ConfigError(f"fields: {e}") from None
    elif key == "autosave_period":
        if isinstance(value, bool) or math.isnan(value) or not 0.01 <= value <= 3600:
            raise ConfigError(f"autosave_period: must be from 0.01 to 3600 seconds, got {value!r}")
        value = float(value)
    elif key == "max_clients" and not 1 <= value <= FD_SETSIZE - BROKER_FD_HEADROOM:
        raise ConfigError(
            f"max_clients: must be from 1 to {FD_SETSIZE - BROKER_FD_HEADROOM} "
            f"(CA circuits live below FD_SETSIZE, {FD_SETSIZE}), got {value}"
        )
    elif key == "client_idle_timeout":
        if isinstance(value, bool) or math.isnan(value) or not 1 <= value <= 86400:
            raise ConfigError(
                f"client_idle_timeout: must be from 1 to 86400 seconds, got {value!r}"
            )
        value = float(value)
    elif key == "log_level":
        value = value.upper()
        if value not in LOG_LEVELS:
            raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    elif key in ("data_dir", "keys_dir", "access_security"):
        if not str(value):
            raise ConfigError(f"{key}: must not be empty")
        if "\0" in str(value):
            raise ConfigError(f"{key}: the path holds a NUL character, got {str(value)!r}")
        value = Path(value)
        if key == "access_security" and not value.is_file():
            raise ConfigError(f"access_security: {value} is not a readable file")
    elif key == "metrics_port" and not 1 <= value <= 65535:
        raise ConfigError(f"metrics_port: must be from 1 to 65535, got {value}")
    elif key == "metrics_address" and not (value and value.isascii() and value.isprintable()):
        raise ConfigError(f"metrics_address: must be a host name or address, got {value!r}")
    elif key == "access_group" and not (value and value.isascii() and value.isprintable()):
        raise ConfigError(f"access_group: must be a group name, got {value!r}")
    elif key == "endpoints":
        for k, ep in enumerate(value):
            if not isinstance(ep, str):
                raise ConfigError(f"endpoints: each must be a tcp:// or ipc:// string, got {ep!r}")
            problem = endpoint_problem(ep)
            if problem is not None:
                raise ConfigError(f"endpoints: {ep!r} (shard {k}): {problem}")
            if ep in value[:k]:
                raise ConfigError(
                    f"endpoints: {ep!r} is given for shards {value.index(ep)} and {k}; "
                    "each shard needs its own"
                )
        value = tuple(value)
    return value


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
            values[key] = _check(key, value)
    for key, value in overrides.items():
        if key not in _TYPES:
            raise ConfigError(f"{key}: unknown configuration key")
        if value is not None:
            values[key] = _check(key, value)
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
            if not (config.keys_dir / cert).exists():
                raise ConfigError(f"keys_dir: {config.keys_dir / cert} is missing")
    if len(config.pvlist_name) > config.max_name_length:
        raise ConfigError("prefix: too long for max_name_length")
    if config.ca_max_array_bytes > _MAX_CA_ARRAY_BYTES:
        raise ConfigError(
            f"max_pvs: {config.max_pvs} names of up to {config.max_name_length} characters "
            f"make a pvlist larger than CA carries ({_MAX_CA_ARRAY_BYTES} bytes); "
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


__all__ = ["Config", "ConfigError", "load_config", "config_to_dict", "replace"]
