"""The TCP ports this process listens on, read from /proc (Linux).

PCAS takes another TCP port when the configured one is taken; what the broker
announces must be the port it really got.
"""

from __future__ import annotations

import os
from pathlib import Path

#: st in /proc/net/tcp for a listening socket.
_TCP_LISTEN = "0A"


def listening_tcp_ports(pid: int | str = "self") -> list[int]:
    """The ports of the TCP sockets that process ``pid`` holds open in LISTEN state,
    sorted; empty when /proc cannot tell."""
    proc = Path("/proc") / str(pid)
    inodes = set()
    try:
        fds = os.listdir(proc / "fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(proc / "fd" / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _TCP_LISTEN and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(ports)
