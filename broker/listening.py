"""The ports of the broker's CA server: the TCP ports it got, and the UDP port it needs.

PCAS takes another TCP port when the configured one is taken; what the broker
announces must be the port it really got (read from /proc, Linux).  Its UDP port
(searches) it shares with the other CA servers of the host, as every CA server does
(SO_REUSEADDR); held by a program that does not share it, PCAS cannot bind it and
aborts the process: ``udp_port_held`` tells first, and why.
"""

from __future__ import annotations

import errno
import os
import socket
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


def udp_port_held(interfaces: list[str], port: int) -> str | None:
    """Why PCAS cannot bind its UDP port ``port`` on ``interfaces`` (empty: every
    interface), or None when it can: each is bound here the way PCAS binds it, with
    SO_REUSEADDR, and let go at once."""
    for address in interfaces or ["0.0.0.0"]:
        host, _, own_port = address.partition(":")
        at = int(own_port) if own_port.isdigit() else port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, at))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"UDP port {at} on {host} is held by a program that does not share it "
                    "(CA servers share it: another CA server is no problem)"
                )
            return f"cannot bind UDP port {at} on {host}: {e.strerror or e}"
        finally:
            sock.close()
    return None
