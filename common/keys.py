"""CurveZMQ keys for broker-shard links beyond loopback.

``carelay keys DIR`` writes two certificates in pyzmq's format: ``shard``
(the shards' server key) and ``broker`` (the broker's client key).  Every
host gets the directory; shards admit only the broker's public key, and the
broker checks the shards' public key, so a peer without the keys is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

import zmq

from carelay.common.logbudget import LogBudget

SHARD_CERT = "shard"
BROKER_CERT = "broker"


#: ZeroMQ monitor events of a connection whose handshake failed: a CurveZMQ key refused,
#: or two sides that do not hold the same keys (or a peer that is no front-end).
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


#: Seconds between two lines about one socket's failed handshakes (ZeroMQ tries again and
#: again): the first is said at once, the others counted in the next.
HANDSHAKE_LOG_WINDOW = 60.0


class FailedHandshakes:
    """A socket's failed CurveZMQ handshakes, as its monitor tells them (front-end and
    shard alike): ``said % (*args, what failed)`` at most once a window, the others
    counted in ``summary`` (LogBudget's)."""

    def __init__(self, log: logging.Logger, said: str, summary: str, *args) -> None:
        self.log = log
        self.said = said
        self.args = args
        self.budget = LogBudget(1, HANDSHAKE_LOG_WINDOW, summary, log)

    def heard(self, event: dict) -> None:
        if self.budget.allow():
            self.log.warning(self.said, *self.args, handshake_failure(event))


def handshake_failure(event: dict) -> str:
    """What a failed handshake's monitor event says: a key refused (ZAP's status code),
    a ZMTP error, or the connection's errno."""
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the key was refused, status {event['value']}"
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"protocol error {event['value']:#x}"
    return os.strerror(event["value"]) if event["value"] else "no detail"


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
    try:
        path = secret_path if secret_path.exists() else public_path
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read CurveZMQ key {path}: {e}") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_curve_key(key):
            raise KeysError(
                f"{path}: its {what} key is not a CurveZMQ key (40 Z85 characters); "
                "make the keys again with `carelay keys DIR`"
            )
    return public, secret


def _is_curve_key(key: bytes) -> bool:
    """``key`` is a CurveZMQ key as certificates hold it: 32 bytes in Z85."""
    from zmq.utils import z85

    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


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
