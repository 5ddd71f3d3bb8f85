"""Calls of a loaded extension, redirected through its global offset table (GOT).

pcaspy's extension calls the C library (``recv``, ``send``, ``accept``) and EPICS libCom
(``freeListInitPvt``) through its GOT, one slot per function it imports.  Pointing a slot
at a ctypes callback makes every call of that function from the extension reach the
callback instead, and nothing else in the process.  The broker's socket hooks
(broker/sockethooks.py) and its count of PCAS's large CA buffers (broker/cabuffers.py)
both go this way.  Written for x86-64 ELF files; another kind raises RuntimeError.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping
from pathlib import Path

__all__ = ["find_slots", "got_slots", "load_base", "point_slots"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_PAGE = 4096
_PROT_READ_WRITE = 3


def load_base(path: str) -> int:
    """The address at which the shared object ``path`` is loaded in this process."""
    real = str(Path(path).resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not loaded")


def _unprotect(address: int) -> None:
    """Make the page that holds ``address`` readable and writable."""
    start = address & ~(_PAGE - 1)
    if _libc.mprotect(start, _PAGE, _PROT_READ_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


def got_slots(path: str, names: set[str]) -> dict[str, int]:
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


def find_slots(module_path: str, names: set[str]) -> dict[str, int]:
    """The offsets of the GOT slots of ``names`` in the extension ``module_path``;
    RuntimeError if it imports one of them not."""
    slots = got_slots(module_path, names)
    missing = names - set(slots)
    if missing:
        raise RuntimeError(f"{module_path} imports no {', '.join(sorted(missing))}")
    return slots


def point_slots(module_path: str, slots: Mapping[str, int], hooks: Mapping[str, object]) -> None:
    """Point each of ``slots`` (``find_slots``) of the loaded extension ``module_path`` at
    the ctypes callback of its name in ``hooks``, which the caller keeps alive."""
    base = load_base(module_path)
    for name, offset in slots.items():
        address = base + offset
        _unprotect(address)
        ctypes.c_void_p.from_address(address).value = ctypes.cast(
            hooks[name], ctypes.c_void_p
        ).value
