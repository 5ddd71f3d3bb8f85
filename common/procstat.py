"""What /proc/PID/stat says of a process: its state, CPU time and resident memory.

The broker's health (CPU and memory of the relay's processes) and the supervisor's
stop (is a stopping child still at work?) both read it; this is the one parse.
"""

from __future__ import annotations

import os
from typing import NamedTuple

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ProcStat(NamedTuple):
    #: The kernel's one-letter state: "R" running, "S" sleeping, "D" waiting on a
    #: disk, "T" stopped, "Z" a zombie.
    state: str
    #: CPU time used, user and system, in clock ticks (compare two samples).
    cpu_ticks: int
    #: Resident memory in bytes.
    rss: int

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_ticks / _TICKS


def parse_stat(stat: bytes) -> ProcStat | None:
    """The fields of the text of /proc/PID/stat; None if it is not such a text.

    The command name (the second field, in parentheses) may hold spaces and ")", so
    the fields are counted from the last ")"."""
    cols = stat.rpartition(b")")[2].split()
    try:
        state, ticks = cols[0].decode("ascii"), int(cols[11]) + int(cols[12])
        return ProcStat(state, ticks, int(cols[21]) * _PAGE)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def read_stat(pid: int) -> ProcStat | None:
    """``parse_stat`` of process ``pid``; None if it cannot be read (gone, not ours)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return parse_stat(f.read())
    except OSError:
        return None
