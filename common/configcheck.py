"""The configuration keys: the type each takes and the check of its value.

``check_value`` turns one value from the TOML file or a flag into what Config
holds, or raises ConfigError with a message naming the key and the problem.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import re
import socket
from collections.abc import Iterable, Sequence
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
#: The interface that stands for every interface of the host.
_EVERY_INTERFACE = "0.0.0.0"


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


def _host_ok(host: str) -> bool:
    """A host name, an IPv4 address or an IPv6 address (without brackets)."""
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host)) and _numeric_host_ok(host)
    return True


def interface_problem(address: Any) -> str | None:
    """Why a CA broker cannot listen on ``address``, or None if it can.

    PCAS listens on the IPv4 addresses of EPICS_CAS_INTF_ADDR_LIST, each on the port
    of the door (a multicast address there is a group it joins, not an interface),
    and aborts on one it cannot attach; 0.0.0.0 is every interface.
    """
    if not isinstance(address, str):
        return "must be an IPv4 address in quotes"
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return "is not an IPv4 address (CA listens on IPv4 only; the port goes in port)"
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "is a multicast or broadcast address, not an interface of this host"
    return None


def check_doors_here(doors: Sequence[CaDoor], indices: Iterable[int]) -> None:
    """ConfigError when a door that this host serves (``doors[k]`` for each k of
    ``indices``) names an address this host does not have: PCAS aborts on it.

    Only the doors this host starts: ``carelay up`` starts them all, ``carelay broker
    --index K`` door K alone, and the other doors may be other hosts' addresses.
    Binding a UDP socket to the address (port 0: no port is taken) says it at once.
    """
    for k in indices:
        for address in doors[k].interfaces:
            if address == _EVERY_INTERFACE:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((address, 0))
                except OSError as e:
                    if e.errno != errno.EADDRNOTAVAIL:
                        continue
                    raise ConfigError(
                        f"ca: entry {k}: interface {address!r} is not an address of this "
                        "host, so its broker cannot listen there"
                    ) from None


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
    elif key == "metrics_address" and not _host_ok(value):
        raise ConfigError(
            f"metrics_address: must be a host name or address (the port is metrics_port), "
            f"got {value!r}"
        )
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
        _check_door_overlap(value)
    return value


def _check_door_overlap(doors: tuple[CaDoor, ...]) -> None:
    """ConfigError when two doors would listen on one port of one interface: the
    second broker's PCAS would move to another port without a word.  A door without
    interfaces, or with 0.0.0.0, listens on every interface, so on each of the others."""
    for k, door in enumerate(doors):
        every = not door.interfaces or _EVERY_INTERFACE in door.interfaces
        for j, other in enumerate(doors[:k]):
            if other.port != door.port:
                continue
            shared = sorted(set(door.interfaces) & set(other.interfaces))
            if shared:
                where = shared[0]
            elif every or not other.interfaces or _EVERY_INTERFACE in other.interfaces:
                where = f"entry {k if every else j} listens on every interface"
            else:
                continue
            raise ConfigError(
                f"ca: entries {j} and {k}: port {door.port} is given twice on the same "
                f"interface ({where})"
            )


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
    if not isinstance(interfaces, list):
        raise ConfigError(f"ca: entry {k}: interfaces must be a list of addresses")
    for n, address in enumerate(interfaces):
        problem = interface_problem(address)
        if problem is not None:
            raise ConfigError(f"ca: entry {k}: interface {address!r} {problem}")
        if address in interfaces[:n]:
            raise ConfigError(f"ca: entry {k}: interface {address!r} is given twice")
    if _EVERY_INTERFACE in interfaces and len(interfaces) > 1:
        raise ConfigError(
            f"ca: entry {k}: interface {_EVERY_INTERFACE!r} is every interface already; "
            "give it alone"
        )
    return CaDoor(tuple(interfaces), port)
