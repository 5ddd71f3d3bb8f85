"""The configuration keys: the type each takes and the check of its value.

``check_value`` turns one value from the TOML file or a flag into what Config
holds, or raises ConfigError with a message naming the key and the problem.
"""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from carelay.common.defaults import (
    BROKER_FD_HEADROOM,
    FD_SETSIZE,
    LOG_LEVELS,
    MAX_CHANNELS,
    MAX_SHARDS,
)
from carelay.common.fields import FieldError, validate_defaults

#: Longest unix socket path the kernel takes (sun_path is 108 bytes with its final NUL).
_MAX_SUN_PATH = 107
#: A DNS host name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class ConfigError(ValueError):
    """An invalid configuration: the message names the key and the problem."""


class CaDoor(NamedTuple):
    """One CA front door (a ``[[ca]]`` table): a broker on ``interfaces`` and ``port``."""

    #: Addresses the broker listens on (EPICS_CAS_INTF_ADDR_LIST); empty: all.
    interfaces: tuple[str, ...]
    port: int


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
    "ca": list,
    "keys_dir": (str, Path),
    "access_security": (str, Path),
    "access_group": str,
    "access_by_ip": bool,
    "pva": bool,
    "metrics_port": int,
    "metrics_address": str,
    "max_clients": int,
    "max_channels": int,
    "client_idle_timeout": (int, float),
}


def check_value(key: str, value: Any) -> Any:
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
    elif key == "max_channels" and not 1 <= value <= MAX_CHANNELS:
        raise ConfigError(f"max_channels: must be from 1 to {MAX_CHANNELS}, got {value}")
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
    elif key == "ca":
        value = tuple(_ca_door(k, door) for k, door in enumerate(value))
        ports = [(d.port, i) for d in value for i in d.interfaces or ("",)]
        for k, used in enumerate(ports):
            if used in ports[:k]:
                raise ConfigError(f"ca: port {used[0]} is given twice on the same interface")
    return value


def _ca_door(k: int, door: Any) -> CaDoor:
    """``[[ca]]`` table number ``k``: ``interfaces`` (a list of addresses) and ``port``."""
    if not isinstance(door, dict):
        raise ConfigError(f"ca: each entry must be a table ([[ca]]), got {door!r}")
    unknown = set(door) - {"interfaces", "port"}
    if unknown:
        raise ConfigError(f"ca: entry {k}: unknown key {sorted(unknown)[0]!r}")
    port = door.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"ca: entry {k}: port must be from 1 to 65535, got {port!r}")
    interfaces = door.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(
        isinstance(a, str) and a and a.isascii() and a.isprintable() and " " not in a
        for a in interfaces
    ):
        raise ConfigError(f"ca: entry {k}: interfaces must be a list of addresses")
    return CaDoor(tuple(interfaces), port)
