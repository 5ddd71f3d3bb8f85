"""The hooks between PCAS and the C library: every CA circuit's byte streams, followed.

The ``recv``, ``send`` and ``accept`` entries of the pcaspy extension's global offset
table point at the functions here (broker/got.py), so that each circuit's streams are
followed (broker/castream.py) on their way into and out of PCAS:

- with access by address, each HOST_NAME message is rewritten, on its way into PCAS, to
  the token of the circuit's peer address (broker/access.py): whatever a client claims,
  the access rules see where it connects from.  A payload too short for the token
  becomes an empty host name, which no HAG holds; a HOST_NAME without payload becomes a
  message that PCAS ignores;
- with or without the rewrite, the puts that PCAS refuses by itself for want of write
  access, which never reach relay code, are handed to the callback of ``watch_denied``
  (``DeniedPuts`` records them up to a rate);
- with or without access security, each circuit's channels are counted, and a circuit
  that asks for one past ``max_channels`` is closed before PCAS reads the request: each
  channel holds memory in PCAS until it is cleared.  ``watch_channel_limit``'s callback
  hears of each such closure;
- a put that PCAS would convert into another value than it says (text that is no
  number, a double that no 32-bit integer holds: broker/writecheck.py) is made into one
  that PCAS refuses, and handed to the callback of ``watch_refused``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable

from carelay.broker.access import ACCESS_DENIED, address_token
from carelay.broker.castream import (
    Channels,
    ClientStream,
    DeniedPut,
    RefusedWrite,
    ServerStream,
    TooManyChannels,
    UnfollowableStream,
)
from carelay.broker.got import find_slots, point_slots
from carelay.common.config import C_LOG_LINES, C_LOG_WINDOW, REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW
from carelay.common.logbudget import LogBudget, shorten

__all__ = [
    "DeniedPuts",
    "install",
    "peer_address",
    "peer_token",
    "watch_channel_limit",
    "watch_denied",
    "watch_refused",
]

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_IO_ARGS = (ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_ACCEPT_ARGS = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
#: The hooks leave errno as the C library set it (through __errno_location).
_IO = ctypes.CFUNCTYPE(*_IO_ARGS)
_ACCEPT = ctypes.CFUNCTYPE(*_ACCEPT_ARGS)
_libc.__errno_location.restype = ctypes.POINTER(ctypes.c_int)
_real_recv = ctypes.CFUNCTYPE(*_IO_ARGS, use_errno=True)(("recv", _libc))
_real_send = ctypes.CFUNCTYPE(*_IO_ARGS, use_errno=True)(("send", _libc))
_real_accept = ctypes.CFUNCTYPE(*_ACCEPT_ARGS, use_errno=True)(("accept", _libc))
#: Each circuit's streams (what PCAS reads, what it writes), by file descriptor; a new
#: circuit on a reused one starts afresh.
_circuits: dict[int, tuple[ClientStream, ServerStream | None]] = {}
_hooks: list = []  # the installed callbacks, kept alive
#: HOST_NAME payloads are rewritten to the peer's token (access by address).
_rewrite_hosts = True
#: Called for each refused put (see watch_denied).
_on_denied: DeniedPut | None = None
#: Called for each put refused for what PCAS would make of it (see watch_refused).
_on_refused: RefusedWrite | None = None
#: Most channels one circuit may hold; None: not bounded.
_max_channels: int | None = None
#: Circuits closed for what they sent: logged within a budget (C_LOG_LINES a window).
_closures = LogBudget(
    C_LOG_LINES,
    C_LOG_WINDOW,
    "closed {count} more CA circuits in the last {window:.0f} s for what they sent, not "
    "logged one by one, e.g. {example}",
    log,
)
#: Called with the peer address of each circuit closed for too many channels.
_on_channel_limit: Callable[[str, int], None] | None = None


def _set_errno(value: int) -> None:
    _libc.__errno_location().contents.value = value


def _view(address: int, n: int) -> memoryview:
    """The ``n`` bytes at ``address``, as a byte view (the quickest of ctypes' ways)."""
    return memoryview((ctypes.c_ubyte * n).from_address(address)).cast("B")


def peer_address(fd: int) -> str:
    """The IPv4 peer address of socket ``fd``; "" if it has none."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return str(ipaddress.IPv4Address(s.getpeername()[0]))
    except (OSError, ValueError, IndexError, TypeError):
        return ""


def peer_token(fd: int) -> bytes:
    """The token of the peer address of socket ``fd``; b"" if it has none."""
    return _token(peer_address(fd))


def _token(address: str) -> bytes:
    return address_token(address).encode() if address else b""


def watch_denied(callback: DeniedPut | None) -> None:
    """Hand each put that PCAS refuses for want of write access to ``callback``, with the
    PV name, the user the client claims, its peer address and whether it was a put with
    callback.  It is called from inside ``cas.process``."""
    global _on_denied
    _on_denied = callback


def watch_channel_limit(callback: Callable[[str, int], None] | None) -> None:
    """Hand the peer address and the limit of each circuit closed for asking for more
    than ``max_channels`` channels to ``callback`` (called from inside ``cas.process``)."""
    global _on_channel_limit
    _on_channel_limit = callback


def watch_refused(callback: RefusedWrite | None) -> None:
    """Hand each put refused for what PCAS would make of it to ``callback``, with the PV
    name, the user, the peer address, whether it was a put with callback and why (called
    from inside ``cas.process``)."""
    global _on_refused
    _on_refused = callback


def _record(callback, name: str, *rest) -> None:
    """Hand a refused put of PV ``name`` to ``callback``, if one is set."""
    if callback is None:
        return
    try:
        callback(name, *rest)
    except Exception:
        # A refusal not recorded is no reason to close the circuit.
        log.exception("cannot record the refused put to %s", shorten(name))


def _refused(name: str, user: str, address: str, notify: bool, reason: str) -> None:
    _record(_on_refused, name, user, address, notify, reason)


def _denied(name: str, user: str, address: str, notify: bool) -> None:
    _record(_on_denied, name, user, address, notify)


def _follow(fd: int) -> tuple[ClientStream, ServerStream | None]:
    address = peer_address(fd)
    denied = _denied if _on_denied is not None else None
    channels = Channels(address, denied, _max_channels, _refused)
    host = _token(address) if _rewrite_hosts else None
    circuit = _circuits[fd] = (ClientStream(channels, host), ServerStream(channels))
    return circuit


def mid_message(fd: int) -> bool | None:
    """Whether the client of circuit ``fd`` stopped in the middle of a message (PCAS
    holds its buffer for the rest); None where its stream is not followed."""
    circuit = _circuits.get(fd)
    return None if circuit is None else circuit[0].mid_message


def _recv(fd, buf, size, flags):
    n = _real_recv(fd, buf, size, flags)
    err = ctypes.get_errno()
    if n > 0:
        try:
            circuit = _circuits.get(fd) or _follow(fd)
            stream, view = circuit[0], _view(buf, n)
            stream.feed(view)
            need = stream.pending_put()
            if need:
                # A judged put whose payload goes on past this read (PCAS's buffer is full,
                # or the client's bytes came apart): what the socket already holds of the
                # rest decides it now, while its header is still in this read.
                ahead = _peek(fd, need)
                if len(ahead) == need:
                    stream.judge_ahead(ahead, view)
        except Exception as e:
            # Never pass on what was not followed: the circuit is closed instead.
            if isinstance(e, TooManyChannels):
                _channel_limit(circuit[0].channels.address, e.limit)
            elif _closures.allow(str(e)):
                # A client can cause these as often as it reconnects: within a budget.
                if isinstance(e, UnfollowableStream):
                    log.warning("closing a CA circuit (fd %d): %s", fd, e)
                else:
                    log.exception("cannot follow a CA circuit (fd %d); closing it", fd)
            _circuits.pop(fd, None)
            _set_errno(104)  # ECONNRESET
            return -1
    elif n == 0 and size > 0:
        # The client closed the circuit, and PCAS closes it now: what was kept of it goes
        # (a new circuit on the same descriptor starts afresh in any case).
        _circuits.pop(fd, None)
    _set_errno(err)
    return n


#: recv flags: look without taking, never wait.
_MSG_PEEK, _MSG_DONTWAIT = 0x2, 0x40


def _peek(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes that the socket ``fd`` holds, left there for PCAS to read."""
    ahead = ctypes.create_string_buffer(size)
    got = _real_recv(fd, ahead, size, _MSG_PEEK | _MSG_DONTWAIT)
    return ahead.raw[:got] if got > 0 else b""


def _send(fd, buf, size, flags):
    n = _real_send(fd, buf, size, flags)
    err = ctypes.get_errno()
    if n > 0:
        circuit = _circuits.get(fd)
        if circuit is not None and circuit[1] is not None:
            try:
                circuit[1].feed(_view(buf, n))
            except Exception:
                # What was sent is sent: only the following of this circuit ends, and its
                # channels, whose ends go unseen, are no longer bounded.
                log.exception("cannot follow what a CA circuit (fd %d) is sent", fd)
                circuit[0].channels.limit = None
                _circuits[fd] = (circuit[0], None)
    _set_errno(err)
    return n


def _accept(fd, addr, addrlen):
    new = _real_accept(fd, addr, addrlen)
    err = ctypes.get_errno()
    if new >= 0:
        _follow(new)
    _set_errno(err)
    return new


def _channel_limit(address: str, limit: int) -> None:
    callback = _on_channel_limit
    if callback is None:
        return
    try:
        callback(address, limit)
    except Exception:
        log.exception("cannot record the closure of a circuit from %s", address)


def tick() -> None:
    """At the end of a window, the summary of the circuit closures not logged one by one."""
    _closures.tick()


def install(module_path: str, rewrite_hosts: bool = True, max_channels: int | None = None) -> None:
    """Point the ``recv``, ``send`` and ``accept`` slots of the loaded extension
    ``module_path`` at this module's functions.  ``rewrite_hosts``: each HOST_NAME
    becomes the peer address's token (access by address); ``max_channels``: the most
    channels one circuit may hold (None: not bounded)."""
    global _rewrite_hosts, _max_channels
    slots = find_slots(module_path, {"recv", "send", "accept"})
    _rewrite_hosts = rewrite_hosts
    _max_channels = max_channels
    hooks = {"recv": _IO(_recv), "send": _IO(_send), "accept": _ACCEPT(_accept)}
    _hooks.extend(hooks.values())
    point_slots(module_path, slots, hooks)


class DeniedPuts:
    """Puts that access security refused: each one counted; logged and kept for
    LAST_ERROR/ERRORS up to ``lines`` per ``window`` seconds, the rest summed up in one
    line at the end of the window, as refused names are."""

    def __init__(
        self,
        record: DeniedPut,
        count: Callable[[], None],
        lines: int = REFUSAL_LOG_LINES,
        window: float = REFUSAL_LOG_WINDOW,
        clock=time.monotonic,
    ) -> None:
        self.record = record
        self.count = count
        self.budget = LogBudget(
            lines,
            window,
            f"refused {{count}} more puts in the last {{window:.0f}} s: {ACCESS_DENIED}, "
            "not logged one by one, e.g. {example}",
            log,
            clock,
        )

    def denied(self, name: str, user: str, address: str, notify: bool) -> None:
        if self.budget.allow(f"{shorten(name)} from {user}@{address}"):
            self.record(name, user, address, notify)
            return
        self.count()

    def tick(self) -> None:
        """At the end of a window, the summary of what was not logged one by one."""
        self.budget.tick()
