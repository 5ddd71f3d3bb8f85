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
``undefined_access_group``), and read again on SIGHUP (``reread_rules``, off the loop:
its host names may take seconds to look up; then ``reinstall_rules``).

CA tells each client, channel by channel, whether it may write, and display tools draw
a widget by it; PCAS grants every channel that joins no group both.  So the broker
always loads a file, its own (``RELAY_ONLY``) where the site configures none, and two
groups of its own after the site's (``with_relay_groups``): the relay's read-only PVs
(``pvlist``, the fields NELM, NORD, SEVR, STAT, NAME, RTYP) join READ_ONLY_GROUP, which
the site's group's readers read, and the health PVs PUBLIC_GROUP, which every client
reads, as before.  No client may write either.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from carelay.broker import acf

__all__ = [
    "ACCESS_DENIED",
    "NO_ADDRESS",
    "PUBLIC_GROUP",
    "READ_ONLY_GROUP",
    "RELAY_ONLY",
    "access_groups",
    "address_token",
    "check_access_security",
    "install_rules",
    "load_rules",
    "prepare_rules",
    "reinstall_rules",
    "reread_rules",
    "resolve",
    "rules_by_address",
    "token_address",
    "undefined_access_group",
    "with_relay_groups",
]

log = logging.getLogger(__name__)

#: What a put that access security refused is, in LAST_ERROR/ERRORS and the log.
ACCESS_DENIED = "access denied (no write access)"

#: The token of a HAG whose host names resolve to nothing: no circuit has it.
NO_ADDRESS = "none"

#: The group of the relay's read-only PVs: the readers of ``access_group`` read them.
READ_ONLY_GROUP = "carelay:read-only"
#: The group of the health PVs: every client reads them.
PUBLIC_GROUP = "carelay:public"
#: The rules where the site configures no file: every client writes the relay's PVs
#: (they join no group), as PCAS grants.
RELAY_ONLY = "ASG(DEFAULT) {\n    RULE(1, WRITE)\n}\n"


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


def with_relay_groups(text: str, group: str) -> str:
    """``text``, an access security file that asLib loads, with the relay's two groups
    after it: READ_ONLY_GROUP, the rules of ``group`` with WRITE read as READ, and
    PUBLIC_GROUP, READ for every client.  AcfError if it cannot be read as asLib reads
    it."""
    text = acf.as_read(text)  # a NUL would end the file before the groups
    read_only = acf.read_only_copy(acf.parse(text), group, READ_ONLY_GROUP)
    public = f'ASG("{PUBLIC_GROUP}") {{\n    RULE({acf.CLIENT_LEVEL}, READ)\n}}\n'
    return f"{text}\n\n# carelay's own groups: no client writes their PVs\n{read_only}{public}"


def load_rules(cas, path: Path | None, by_address: bool, group: str, run_dir: Path) -> bool:
    """Load (or load again) the access security file at ``path`` (None: RELAY_ONLY), with
    the relay's groups (``with_relay_groups``); False if it is invalid, and then the
    rules in force stay.  ``by_address``: HAGs hold peer addresses."""
    text = prepare_rules(path, by_address, group)
    return text is not None and install_rules(cas, text, run_dir)


def prepare_rules(path: Path | None, by_address: bool, group: str) -> str | None:
    """The text asLib is to load for the access security file at ``path`` (None:
    RELAY_ONLY), or None if it is invalid (logged).  With ``by_address`` it looks up the
    HAGs' host names, which may take seconds: a reload runs it off the loop (OffLoop)."""
    if path is None:
        text, group = RELAY_ONLY, "DEFAULT"
    else:
        try:
            text = acf.read_acf(path)
        except OSError as e:
            log.error("cannot read access security file %s: %s", path, e.strerror or e)
            return None
    try:
        if by_address:
            text, unresolved = rules_by_address(text)
            for host in unresolved:
                log.warning("access security: host %s of %s has no IPv4 address", host, path)
        return with_relay_groups(text, group)
    except acf.AcfError as e:
        log.error("access security file %s cannot be read as EPICS reads it: %s", path, e)
        return None


def install_rules(cas, text: str, run_dir: Path) -> bool:
    """Have asLib load ``text`` (``prepare_rules``); False if it refuses it, and then the
    rules in force stay.  On the thread that runs PCAS."""
    # asLib reads the file at once, and each broker of a relay writes its own (they share
    # the run directory).
    try:
        with tempfile.NamedTemporaryFile(
            "wb", dir=run_dir, prefix="access-", suffix=".acf", delete=False
        ) as f:
            f.write(text.encode("utf-8", "surrogateescape"))
    except OSError as e:
        log.error("cannot write the access rules in %s: %s", run_dir, e.strerror or e)
        return False
    try:
        return cas.asInitFile(f.name, "") == 0
    finally:
        os.unlink(f.name)


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
    groups = access_groups(text)
    for ours in (READ_ONLY_GROUP, PUBLIC_GROUP):
        if ours in groups:
            return f"{path} defines ASG({ours}), a group the relay keeps for its own PVs"
    if group in groups:
        return None
    if group == "DEFAULT":
        return f"{path} defines no ASG(DEFAULT): every client would be denied everything"
    return f"{path} defines no ASG({group}): the relay's PVs would get the rules of ASG(DEFAULT)"


def reread_rules(config) -> str | None:
    """The access security file read again (SIGHUP, ``carelay reload-acf``), its HAGs'
    host names looked up again, as text for ``reinstall_rules``; None if it is not to be
    loaded (logged), and the rules in force stay.  Off the loop (OffLoop): the look-ups
    may take seconds."""
    if config.access_security is None:
        log.warning("access security not reloaded: none is configured")
        return None
    problem = undefined_access_group(config.access_security, config.access_group)
    if problem is not None:
        _not_reloaded(problem)
        return None
    text = prepare_rules(config.access_security, config.access_by_ip, config.access_group)
    if text is None:
        _not_reloaded(f"access security file {config.access_security} is invalid")
    return text


def reinstall_rules(cas, config, text: str | None) -> None:
    """On the loop thread: the rules ``reread_rules`` gave are in force from now."""
    if text is None:
        return
    if not install_rules(cas, text, config.run_dir):
        _not_reloaded(f"access security file {config.access_security} is invalid")
        return
    log.info("access security reloaded from %s", config.access_security)


def _not_reloaded(problem: str) -> None:
    log.error("access security not reloaded, the rules in force stay: %s", problem)
