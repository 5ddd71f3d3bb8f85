"""CurveZMQ keys for broker-shard links beyond loopback.

``carelay keys DIR`` writes two certificates in pyzmq's format: ``shard``
(the shards' server key) and ``broker`` (the broker's client key).  Every
host gets the directory; shards admit only the broker's public key, and the
broker checks the shards' public key, so a peer without the keys is refused.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

SHARD_CERT = "shard"
BROKER_CERT = "broker"


class KeysError(ValueError):
    """Keys missing or unreadable; the message names the file."""


class KeysExist(Exception):
    """Key files that make_keys would write are there already; the message names them."""


def key_files(directory: Path) -> list[Path]:
    """The files make_keys writes in ``directory``: each certificate's public and secret."""
    return [
        directory / f"{name}{suffix}"
        for name in (SHARD_CERT, BROKER_CERT)
        for suffix in (".key", ".key_secret")
    ]


def make_keys(directory: Path, force: bool = False) -> list[Path]:
    """Create the shard and broker certificates in ``directory`` (secret files mode 0600).

    KeysExist, and nothing written, when any of their files is there, unless ``force``:
    processes that run hold the keys they loaded, and keys replaced under them lock them
    out of the relay at their next start."""
    import zmq.auth

    there = [path for path in key_files(directory) if os.path.lexists(path)]
    if there and not force:
        raise KeysExist(f"{', '.join(str(path) for path in there)} already exist")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    made = []
    for name in (SHARD_CERT, BROKER_CERT):
        public, secret = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret, 0o600)
        made += [Path(public), Path(secret)]
    return made


def load_keys(directory: Path, name: str) -> tuple[bytes, bytes | None]:
    """(public, secret) of certificate ``name``; secret None if only the public part is there."""
    import zmq.auth

    secret_path = directory / f"{name}.key_secret"
    public_path = directory / f"{name}.key"
    path = secret_path if secret_path.exists() else public_path
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read CurveZMQ key {path}: {e}") from None
    return public, secret


def is_loopback_endpoint(endpoint: str) -> bool:
    """ipc/inproc, or tcp on a loopback address; anything else needs keys."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
