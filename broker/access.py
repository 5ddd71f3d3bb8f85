"""Access rules a client cannot fake: HAG membership by the peer address of the circuit.

CA carries the user and host names that a client claims, and the PCAS that pcaspy
ships (EPICS 3.14) hands the claimed host name to the access security library, which
has no ``asCheckClientIP``.  So the broker does what EPICS 7 does with it, in two
halves:

- the access security file is rewritten before it is loaded: each host name of a HAG
  becomes the addresses it resolves to (at load, and again at each reload), each
  written as a short token that names one IPv4 address (``address_token``);
- every CA circuit's HOST_NAME message is rewritten, on its way into PCAS, to the token
  of the circuit's peer address: whatever a client claims, the rules see where it
  connects from.  A payload too short for the token becomes an empty host name, which
  no HAG holds; a HOST_NAME without payload becomes a message that PCAS ignores.

The rewrite sits between PCAS and the C library: the ``recv``, ``send`` and ``accept``
entries of the pcaspy extension's global offset table point at the functions here.

The same hooks tell the relay of the puts that PCAS refuses by itself for want of
write access, which never reach relay code: each circuit's streams are followed
(broker/castream.py) with or without the rewrite, and each refused put is handed to
the callback of ``watch_denied``.
"""

from __future__ import annotations

import base64
import ctypes
import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from carelay.broker.castream import (
    CA_PROTO_HOST_NAME,
    CA_PROTO_IGNORED,
    Channels,
    CircuitStream,
    ClientStream,
    DeniedPut,
    ServerStream,
    UnfollowableStream,
)
from carelay.broker.refusals import LogBudget, shorten
from carelay.common.config import REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW

__all__ = [  # with what tests/unit/test_access_by_address.py takes from castream here
    "ACCESS_DENIED",
    "CA_PROTO_HOST_NAME",
    "CA_PROTO_IGNORED",
    "NO_ADDRESS",
    "CircuitStream",
    "DeniedPuts",
    "UnfollowableStream",
    "address_token",
    "install",
    "load_rules",
    "peer_address",
    "peer_token",
    "resolve",
    "rules_by_address",
    "token_address",
    "watch_denied",
]

log = logging.getLogger("carelay.broker")

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


#: ``HAG(name) { host, "host" }`` in an access security file (comments removed).
_HAG = re.compile(r'(\bHAG\s*\(\s*"?[^")\s]*"?\s*\)\s*\{)([^}]*)(\})')


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


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
    the host names that resolved to none (which then match no client)."""
    unresolved: list[str] = []

    def hag(m: re.Match) -> str:
        tokens: set[str] = set()
        for raw in m[2].split(","):
            host = raw.strip().strip('"').strip()
            if not host:
                continue
            addresses = resolve(host)
            if not addresses:
                unresolved.append(host)
            tokens.update(address_token(a) for a in addresses)
        body = ", ".join(f'"{t}"' for t in sorted(tokens)) or f'"{NO_ADDRESS}"'
        return f"{m[1]} {body} {m[3]}"

    return _HAG.sub(hag, _strip_comments(text)), unresolved


def load_rules(cas, path: Path, by_address: bool, run_dir: Path) -> bool:
    """Load (or load again) the access security file at ``path``; False if it is invalid,
    and then the rules in force stay.  ``by_address``: HAGs hold peer addresses."""
    if not by_address:
        return cas.asInitFile(str(path), "") == 0
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        log.error("cannot read access security file %s: %s", path, e.strerror or e)
        return False
    rewritten, unresolved = rules_by_address(text)
    for host in unresolved:
        log.warning("access security: host %s of %s has no IPv4 address", host, path)
    loaded = run_dir / "access-by-address.acf"
    try:
        loaded.write_text(rewritten)
    except OSError as e:
        log.error("cannot write %s: %s", loaded, e.strerror or e)
        return False
    return cas.asInitFile(str(loaded), "") == 0


# -- the hooks between PCAS and the C library ------------------------------------------------

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
    address = peer_address(fd)
    return address_token(address).encode() if address else b""


def watch_denied(callback: DeniedPut | None) -> None:
    """Hand each put that PCAS refuses for want of write access to ``callback``, with the
    PV name, the user the client claims, its peer address and whether it was a put with
    callback.  It is called from inside ``cas.process``."""
    global _on_denied
    _on_denied = callback


def _denied(name: str, user: str, address: str, notify: bool) -> None:
    callback = _on_denied
    if callback is None:
        return
    try:
        callback(name, user, address, notify)
    except Exception:
        # A refusal not recorded is no reason to close the circuit.
        log.exception("cannot record the refused put to %s", shorten(name))


def _follow(fd: int) -> tuple[ClientStream, ServerStream | None]:
    address = peer_address(fd)
    channels = Channels(address, _denied)
    host = (address_token(address).encode() if address else b"") if _rewrite_hosts else None
    circuit = _circuits[fd] = (ClientStream(channels, host), ServerStream(channels))
    return circuit


def _recv(fd, buf, size, flags):
    n = _real_recv(fd, buf, size, flags)
    err = ctypes.get_errno()
    if n > 0:
        try:
            circuit = _circuits.get(fd) or _follow(fd)
            circuit[0].feed(_view(buf, n))
        except Exception as e:
            # Never pass on what was not followed: the circuit is closed instead.
            if isinstance(e, UnfollowableStream):
                log.warning("closing a CA circuit (fd %d): %s", fd, e)
            else:
                log.exception("cannot follow a CA circuit (fd %d); closing it", fd)
            _circuits.pop(fd, None)
            _set_errno(104)  # ECONNRESET
            return -1
    _set_errno(err)
    return n


def _send(fd, buf, size, flags):
    n = _real_send(fd, buf, size, flags)
    err = ctypes.get_errno()
    if n > 0:
        circuit = _circuits.get(fd)
        if circuit is not None and circuit[1] is not None:
            try:
                circuit[1].feed(_view(buf, n))
            except Exception:
                # What was sent is sent: only the following of this circuit ends.
                log.exception("cannot follow what a CA circuit (fd %d) is sent", fd)
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


def install(module_path: str, rewrite_hosts: bool = True) -> None:
    """Point the ``recv``, ``send`` and ``accept`` slots of the loaded extension
    ``module_path`` at this module's functions.  ``rewrite_hosts``: each HOST_NAME
    becomes the peer address's token (access by address)."""
    global _rewrite_hosts
    wanted = {"recv", "send", "accept"}
    slots = _got_slots(module_path, wanted)
    missing = wanted - set(slots)
    if missing:
        raise RuntimeError(f"{module_path} imports no {', '.join(sorted(missing))}")
    base = _load_base(module_path)
    _rewrite_hosts = rewrite_hosts
    hooks = {"recv": _IO(_recv), "send": _IO(_send), "accept": _ACCEPT(_accept)}
    _hooks.extend(hooks.values())
    for name, offset in slots.items():
        address = base + offset
        _writable(address)
        ctypes.c_void_p.from_address(address).value = ctypes.cast(
            hooks[name], ctypes.c_void_p
        ).value


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
        self.budget = LogBudget(lines, window, clock)
        self._example: str | None = None

    def denied(self, name: str, user: str, address: str, notify: bool) -> None:
        self.tick()
        if self.budget.allow():
            self.record(name, user, address, notify)
            return
        self.count()
        if self._example is None:
            self._example = f"{shorten(name)} from {user}@{address}"

    def tick(self) -> None:
        """At the end of a window, the summary of what was not logged one by one."""
        unlogged = self.budget.ended()
        if unlogged:
            log.warning(
                "refused %s more puts in the last %.0f s: %s, not logged one by one, e.g. %s",
                f"{unlogged:,}",
                self.budget.window,
                ACCESS_DENIED,
                self._example,
            )
        if unlogged is not None:
            self._example = None


def _load_base(path: str) -> int:
    real = str(Path(path).resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not loaded")


def _writable(address: int) -> None:
    page = 4096
    start = address & ~(page - 1)
    _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _libc.mprotect(start, page, 3) != 0:  # PROT_READ | PROT_WRITE
        raise OSError(ctypes.get_errno(), "mprotect failed")


def _got_slots(path: str, names: set[str]) -> dict[str, int]:
    """The offsets of the global offset table slots of ``names`` in ELF file ``path``."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeError(f"{path} is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)
    ]
    out: dict[str, int] = {}
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != 4:  # SHT_RELA
            continue
        symtab = sections[link]
        strtab = sections[symtab[6]]
        for k in range(size // (entsize or 24)):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", data, offset + k * 24)
            if r_info & 0xFFFFFFFF not in (6, 7):  # R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT
                continue
            sym = symtab[4] + (r_info >> 32) * 24
            (st_name,) = struct.unpack_from("<I", data, sym)
            start = strtab[4] + st_name
            name = data[start : data.index(b"\0", start)].decode()
            if name in names:
                out[name] = r_offset
    return out


# -- the access security file, checked before it governs the relay ---------------------------


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
    """The groups (ASG) that the access security file ``text`` defines; comments, from
    ``#`` to the end of a line, do not count."""
    return {quoted or bare for quoted, bare in _ASG.findall(_strip_comments(text))}


def undefined_access_group(path, group: str) -> str | None:
    """Why the valid access security file at ``path`` cannot govern the relay's PVs,
    which all join ``group``; None if it defines the group.

    EPICS puts a member of an undefined group into DEFAULT, and an undefined DEFAULT
    allows nothing: a relay would quietly run on other rules than the site wrote."""
    try:
        text = Path(path).read_text(errors="replace")
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
