"""Refused names: each logged once while remembered, within bounds of memory and log.

A client can search for any number of names of up to about 64 kB each.  What the
broker keeps of them is bounded by bytes (a long name is kept as a digest), a log
line carries at most the first LOGGED_NAME_CHARS characters of a name, and above
REFUSAL_LOG_LINES per window the refusals are counted and summarised in one line.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import socket
import struct
import sys
import time

from carelay.common.config import (
    LOGGED_NAME_CHARS,
    REFUSAL_LOG_LINES,
    REFUSAL_LOG_WINDOW,
    REFUSED_MEMORY_BYTES,
)
from carelay.common.logbudget import LogBudget, shorten

log = logging.getLogger(__name__)

#: What one remembered name costs besides its key: the ordered dict's entry and links.
_ENTRY_OVERHEAD = 100
#: caNetAddr: its type (casnaInet for an IPv4 address), then a struct sockaddr_in.
_NET_ADDR = struct.Struct("=iHH4s")  # native int and family; port, address in network order
_CASNA_INET = 1
#: Names longer than this are remembered as a digest of DIGEST_SIZE bytes.
_DIGEST_SIZE = 16


def client_address(addr) -> str | None:
    """ "address:port" of a searching client, from PCAS's caNetAddr (a SWIG object); None
    if it holds no IPv4 address.

    Read from the object itself (a type, then a sockaddr_in, as caNetAddr.h lays them
    out): its stringConvert looks the address up in DNS, which may block the server."""
    try:
        raw = ctypes.string_at(int(addr.this), _NET_ADDR.size)
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    kind, family, port, address = _NET_ADDR.unpack(raw)
    if kind != _CASNA_INET or family != socket.AF_INET:
        return None
    return f"{socket.inet_ntoa(address)}:{socket.ntohs(port)}"


def _key(name: str) -> str:
    if len(name) <= LOGGED_NAME_CHARS:
        return name
    raw = name.encode("utf-8", "surrogatepass")
    return "#" + hashlib.blake2b(raw, digest_size=_DIGEST_SIZE).hexdigest()


class RefusalLog:
    """Remembers refused names by bytes and logs each once, up to a rate."""

    def __init__(
        self,
        memory_bytes: int = REFUSED_MEMORY_BYTES,
        lines: int = REFUSAL_LOG_LINES,
        window: float = REFUSAL_LOG_WINDOW,
        clock=time.monotonic,
    ) -> None:
        self.memory_bytes = memory_bytes
        self._seen: collections.OrderedDict[str, int] = collections.OrderedDict()
        #: What the remembered names cost, by _cost.
        self.bytes = 0
        self.budget = LogBudget(
            lines,
            window,
            "refused {count} more PV names in the last {window:.0f} s, not logged one by one, "
            "e.g. {example}",
            log,
            clock,
        )

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, name: str) -> bool:
        return _key(name) in self._seen

    def refuse(self, name: str, why: str, client: str | None = None) -> bool | None:
        """Note that ``name`` was refused for ``why`` (a search from ``client``, if known):
        None if it was known already; otherwise whether its line was logged (False: over
        the budget, counted for the summary)."""
        key = _key(name)
        if key in self._seen:
            return None
        cost = sys.getsizeof(key) + _ENTRY_OVERHEAD
        self._seen[key] = cost
        self.bytes += cost
        while self.bytes > self.memory_bytes and self._seen:
            self.bytes -= self._seen.popitem(last=False)[1]
        line = f"{shorten(name)}: {shorten(why)}"
        if client:
            line += f" (client {client})"
        if self.budget.allow(line):
            log.warning("refused PV name %s", line)
            return True
        return False

    def tick(self) -> None:
        """At the end of a window, the summary of what was not logged one by one."""
        self.budget.tick()
