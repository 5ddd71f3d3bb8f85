"""Access security over PV Access: the relay's ACF applied to each PVA put.

The CA brokers hand the access security file to PCAS (broker/access.py).  The PVA
front-end has no PCAS: it reads the same file as EPICS's access security library does
(broker/acf.py: asLib's scanner, grammar and rule evaluation, the client at the level
pcaspy gives every CA client), once asLib itself accepted it (``check_access_security``,
in a child process: pcaspy and p4p never share one), so that the two sides load the same
files and grant the same.  It evaluates the rules of the relay's group
(``access_group``; ``DEFAULT`` if the file lacks it, as EPICS does) for the client of
each operation:

- a HAG holds addresses: each of its host names becomes the IPv4 addresses it resolves
  to (at load and at each reload), and the operation's peer address (``op.peer()``) is
  matched against them, whatever ``access_by_ip`` says (a PVA client claims no host
  name);
- a UAG holds accounts (``op.account()``), and roles as ``role/NAME``
  (``op.roles()``), as p4p's gateway names them;
- ``RULE(1, READ)`` grants reads, ``RULE(1, WRITE)`` reads and writes, a ``RULE(0,
  ...)`` nothing (as on CA); a rule with several conditions needs all of them; a CALC
  condition is never met (the relay reads no INP PVs).

``PvaAccess.check_put`` answers with the reason a put is refused (None: allowed) and
logs each refusal in one line, rate-limited as the CA broker's are.  Reads are
checked once, when a client opens a channel (``may_read``): p4p serves gets and
monitors itself, and names only the peer then, no account.  A client without read
access gets a channel that never connects, so it reads and writes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
import time
from pathlib import Path

from carelay.broker import acf
from carelay.broker.access import ACCESS_DENIED, check_access_security, resolve
from carelay.common.config import REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW
from carelay.common.logbudget import LogBudget, shorten

__all__ = ["PvaAccess", "Rules", "peer_address"]

log = logging.getLogger(__name__)

READ, WRITE = 1, 2
#: What a client without read access is told (it gets a channel that never connects).
NO_READ = "access denied (no read access)"
#: What each access right of asLib grants here.
_GRANTS = {acf.NONE: 0, acf.READ: READ, acf.WRITE: READ | WRITE}


def peer_address(peer: str) -> str:
    """The IP address in a peer as pvxs writes it (``host:port``, ``[v6]:port``); an
    IPv4-mapped IPv6 address is its IPv4 address."""
    text = str(peer).strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class Rules:
    """The rules of one ASG of an ACF, ready to answer what a client may do."""

    def __init__(self, text: str, group: str) -> None:
        self.acf = acf.parse(text)
        self.group = group
        #: Which UAGs each member (an account, ``role/NAME``) is in.
        self.uag_of: dict[str, set[str]] = {}
        for name, members in self.acf.uags.items():
            for member in members:
                self.uag_of.setdefault(member, set()).add(name)
        #: Which HAGs each address is in; host names that resolved to none.
        self.hag_of: dict[str, set[str]] = {}
        self.unresolved: list[str] = []
        for name, hosts in self.acf.hags.items():
            for host in hosts:
                addresses = resolve(host)
                if not addresses:
                    self.unresolved.append(host)
                for address in addresses:
                    self.hag_of.setdefault(address, set()).add(name)

    def allows(self, address: str, account: str, roles=()) -> int:
        """What a client at ``address`` with ``account`` and ``roles`` may do: READ,
        WRITE or'ed (0: nothing)."""
        uags = set(self.uag_of.get(account, ()))
        for role in roles:
            uags |= self.uag_of.get(f"role/{role}", set())
        hags = self.hag_of.get(address, set())
        return _GRANTS[self.acf.access(self.group, uags, hags)]


class PvaAccess:
    """The ACF in force on the PVA side (None configured: everything is allowed)."""

    def __init__(self, config, clock=time.monotonic) -> None:
        self.config = config
        self.rules: Rules | None = None
        #: The file is configured but never loaded: nothing is allowed.
        self.closed = config.access_security is not None
        self.budget = LogBudget(
            REFUSAL_LOG_LINES,
            REFUSAL_LOG_WINDOW,
            f"refused {{count}} more PVA puts in the last {{window:.0f}} s: {ACCESS_DENIED}, "
            "not logged one by one, e.g. {example}",
            log,
            clock,
        )
        self.read_budget = LogBudget(
            REFUSAL_LOG_LINES,
            REFUSAL_LOG_WINDOW,
            f"refused {{count}} more PVA channels in the last {{window:.0f}} s: {NO_READ}, "
            "not logged one by one, e.g. {example}",
            log,
            clock,
        )

    def load(self) -> bool:
        """Read the access security file (again); False if it cannot be read or parsed,
        and then the rules in force stay."""
        if self.config.access_security is None:
            return True
        rules = self._read()
        if rules is None:
            return False
        self.rules, self.closed = rules, False
        return True

    def _read(self) -> Rules | None:
        """The rules of the file, its HAGs' host names looked up (which may take
        seconds); None if it cannot be read or parsed (logged)."""
        path = self.config.access_security
        try:
            rules = Rules(_checked_text(Path(path), self.config.run_dir), self.config.access_group)
        except Exception as e:
            stays = "PVA clients get no access" if self.closed else "the rules in force stay"
            log.error("access security file %s not loaded, %s: %s", path, stays, e)
            return None
        for host in rules.unresolved:
            log.warning("access security: host %s of %s has no IPv4 address", host, path)
        return rules

    def reread(self) -> Rules | None:
        """SIGHUP, ``carelay reload-acf``: the file's rules read again, for ``install``;
        None if there are none to put in force (logged).  Off the loop (OffLoop)."""
        if self.config.access_security is None:
            log.warning("access security not reloaded: none is configured")
            return None
        return self._read()

    def install(self, rules: Rules | None) -> bool:
        """On the loop thread: ``rules`` (``reread``) in force from now; whether they are."""
        if rules is None:
            return False
        self.rules, self.closed = rules, False
        log.info("access security reloaded from %s", self.config.access_security)
        return True

    def reload(self) -> bool:
        """``reread`` and ``install`` at once; whether new rules are in force."""
        return self.install(self.reread())

    def allows(self, address: str, account: str, roles=()) -> int:
        if self.config.access_security is None:
            return READ | WRITE
        if self.rules is None:
            return 0
        return self.rules.allows(address, account, roles)

    def check_put(self, name: str, shard, op) -> str | None:
        """Why the put ``op`` to PV ``name`` is refused (None: it may go); a refusal is
        logged, one line per put up to the rate the other refusals have."""
        if self.config.access_security is None:
            return None
        address, account, roles = _client_of(op)
        if self.allows(address, account, roles) & WRITE:
            return None
        where = f"shard {shard}" if shard is not None else "no shard"
        # A log line carries the start of a long name or account, as on CA.
        name, account = shorten(name), shorten(account)
        if self.budget.allow(f"{name} from {account}@{address}"):
            log.warning(
                "refused PVA put to %s (%s) from %s@%s: %s",
                name,
                where,
                account,
                address,
                ACCESS_DENIED,
            )
        return ACCESS_DENIED

    def may_read(self, peer: str) -> bool:
        """Whether a client at ``peer`` may open a channel.  Runs on a p4p thread: it
        reads the rules in force, nothing else.  pvxs names no account when a channel
        is made, so a rule that needs a UAG grants no read here."""
        if self.config.access_security is None:
            return True
        return bool(self.allows(peer_address(peer), "") & READ)

    def refused_read(self, name: str, peer: str) -> None:
        """Log a channel refused by ``may_read`` (on the loop thread)."""
        address, name = peer_address(peer), shorten(name)
        if self.read_budget.allow(f"{name} from {address}"):
            log.warning("refused PVA channel %s to %s: %s", name, address, NO_READ)

    def tick(self) -> None:
        self.budget.tick()
        self.read_budget.tick()


def _checked_text(path: Path, run_dir: Path) -> str:
    """The text of the ACF at ``path`` once EPICS's own library has loaded it: the very
    bytes read here, from a copy, so that a file edited meanwhile is not read unchecked.
    AcfError if EPICS does not load it."""
    raw = path.read_bytes()
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=run_dir, prefix="pva-", suffix=".acf") as copy:
        copy.write(raw)
        copy.flush()
        problem = check_access_security(copy.name)
    if problem is not None:
        raise acf.AcfError(f"EPICS does not load it: {problem}")
    return raw.decode("utf-8", "surrogateescape")


def _client_of(op) -> tuple[str, str, list[str]]:
    """(peer address, account, roles) of a p4p server operation; "?" where it says none."""
    try:
        address = peer_address(op.peer())
    except Exception:
        address = "?"
    try:
        account = str(op.account())
    except Exception:
        account = "?"
    try:
        roles = [str(r) for r in op.roles()]
    except Exception:
        roles = []
    return address, account, roles
