"""The access security file (ACF): loaded, checked, reloaded, and matched by address.

Every relay PV joins the configured access group; pcaspy's channels check each read and
write against the rules.  CA carries the user and host names that a client claims, and
the PCAS that pcaspy ships (EPICS 3.14) hands the claimed host name to the access
security library, which has no ``asCheckClientIP``.  So the broker does what EPICS 7
does with it, in two halves:

- the access security file is rewritten before it is loaded: each host name of a HAG
  becomes the addresses it resolves to (at load, and again at each reload), each
  written as a short token that names one IPv4 address (``address_token``);
- every CA circuit's HOST_NAME message is rewritten, on its way into PCAS, to the token
  of the circuit's peer address (broker/sockethooks.py): whatever a client claims, the
  rules see where it connects from.

The file is checked before it governs the relay (``check_access_security``,
``undefined_access_group``), and read again on SIGHUP (``reload_rules``).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

from carelay.broker import acf

__all__ = [
    "ACCESS_DENIED",
    "NO_ADDRESS",
    "access_groups",
    "address_token",
    "check_access_security",
    "load_rules",
    "reload_rules",
    "resolve",
    "rules_by_address",
    "token_address",
    "undefined_access_group",
]

log = logging.getLogger(__name__)

#: What a put that access security refused is, in LAST_ERROR/ERRORS and the log.
ACCESS_DENIED = "access denied (no write access)"

#: The token of a HAG whose host names resolve to nothing: no circuit has it.
NO_ADDRESS = "none"


def address_token(address: str) -> str:
    """The host name that access rules see for a client at IPv4 ``address``.

    Seven characters (base32 of the four bytes, lower case): it fits the smallest
    HOST_NAME payload that libca sends (eight bytes, the NUL included)."""
    packed = ipaddress.IPv4Address(address).packed
    return base64.b32encode(packed).decode().rstrip("=").lower()


def token_address(token: str) -> str | None:
    """The IPv4 address that ``address_token`` made ``token`` of; None if it is none."""
    if len(token) != 7:
        return None
    try:
        packed = base64.b32decode(token.upper() + "=")
    except ValueError:
        return None
    return str(ipaddress.IPv4Address(packed))


def resolve(host: str) -> set[str]:
    """The IPv4 addresses of ``host`` (an address stays itself); empty if it has none."""
    try:
        return {str(ipaddress.IPv4Address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return set()
    return {info[4][0] for info in infos}


def rules_by_address(text: str) -> tuple[str, list[str]]:
    """``text`` with each HAG's host names replaced by the tokens of their addresses, and
    the host names that resolved to none (which then match no client).  The file is read
    as asLib reads it (broker/acf.py), so that no comment, quoted name or rule condition
    is taken for a HAG; AcfError if it cannot be read so."""
    unresolved: list[str] = []

    def hosts_of(hosts: list[str]) -> list[str]:
        tokens: set[str] = set()
        for raw in hosts:
            host = raw.strip()
            if not host:
                continue
            addresses = resolve(host)
            if not addresses:
                unresolved.append(host)
            tokens.update(address_token(a) for a in addresses)
        return sorted(tokens) or [NO_ADDRESS]

    return acf.rewrite_hags(text, hosts_of), unresolved


def load_rules(cas, path: Path, by_address: bool, run_dir: Path) -> bool:
    """Load (or load again) the access security file at ``path``; False if it is invalid,
    and then the rules in force stay.  ``by_address``: HAGs hold peer addresses."""
    if not by_address:
        return cas.asInitFile(str(path), "") == 0
    try:
        text = acf.read_acf(path)
    except OSError as e:
        log.error("cannot read access security file %s: %s", path, e.strerror or e)
        return False
    try:
        rewritten, unresolved = rules_by_address(text)
    except acf.AcfError as e:
        log.error("access security file %s cannot be read as EPICS reads it: %s", path, e)
        return False
    for host in unresolved:
        log.warning("access security: host %s of %s has no IPv4 address", host, path)
    loaded = run_dir / "access-by-address.acf"
    try:
        loaded.write_bytes(rewritten.encode("utf-8", "surrogateescape"))
    except OSError as e:
        log.error("cannot write %s: %s", loaded, e.strerror or e)
        return False
    return cas.asInitFile(str(loaded), "") == 0


def check_access_security(path) -> str | None:
    """Why the access security file at ``path`` does not load, or None if it does.

    Loaded in a child process, so that ``carelay up`` can refuse a bad file before
    it starts anything: EPICS prints its complaints on the C streams, where the
    child's output catches them.
    """
    code = "import sys; from pcaspy import cas; sys.exit(cas.asInitFile(sys.argv[1], '') != 0)"
    r = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )
    if r.returncode == 0:
        return None
    return " ".join((r.stderr + r.stdout).split()) or f"exit status {r.returncode}"


#: ``ASG(name)`` or ``ASG("name")`` in an access security file.
_ASG = re.compile(r'\bASG\s*\(\s*(?:"([^"]*)"|([^\s")]+))\s*\)')


def access_groups(text: str) -> set[str]:
    """The groups (ASG) that the access security file ``text`` defines, read as asLib reads
    it (no group in a comment, whatever ends its line; none in a quoted name)."""
    try:
        return set(acf.parse(text).asgs)
    except acf.AcfError:
        # Not a file EPICS loads either: the groups that look defined, for the message.
        return {q or b for q, b in _ASG.findall(acf.strip_comments(text))}


def undefined_access_group(path, group: str) -> str | None:
    """Why the valid access security file at ``path`` cannot govern the relay's PVs,
    which all join ``group``; None if it defines the group.

    EPICS puts a member of an undefined group into DEFAULT, and an undefined DEFAULT
    allows nothing: a relay would quietly run on other rules than the site wrote."""
    try:
        text = acf.read_acf(path)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    if group in access_groups(text):
        return None
    if group == "DEFAULT":
        return f"{path} defines no ASG(DEFAULT): every client would be denied everything"
    return f"{path} defines no ASG({group}): the relay's PVs would get the rules of ASG(DEFAULT)"


def reload_rules(cas, config) -> None:
    """Read the access security file again (SIGHUP, ``carelay reload-acf``): its rules,
    and the addresses of its HAGs' host names.  An invalid file leaves the rules in
    force."""
    if config.access_security is None:
        log.warning("access security not reloaded: none is configured")
        return
    problem = undefined_access_group(config.access_security, config.access_group)
    if problem is None and not load_rules(
        cas, config.access_security, config.access_by_ip, config.run_dir
    ):
        problem = f"access security file {config.access_security} is invalid"
    if problem is not None:
        log.error("access security not reloaded, the rules in force stay: %s", problem)
        return
    log.info("access security reloaded from %s", config.access_security)
