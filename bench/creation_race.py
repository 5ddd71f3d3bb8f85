"""``python -m bench.creation_race``: how far front-ends creating PVs at once pass max_pvs.

Each front-end checks max_pvs against the PVs it has seen, and keeps the creations it
has in flight to its share of what is left (broker/table.py, ``over_share``); what
another front-end has on its way to a shard is not among what it has seen.  Here
``carelay up`` runs with two CA brokers (``[[ca]]``) and ``--max-pvs``; one client per
broker makes a channel to each of ``--each`` new names, and once both are connected
they put 1.0 to every name at once, without waiting.  Printed per run: the PVs the
shards hold once the puts are done, against max_pvs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.servers import CarelayServer, server_env
from carelay.common.lifecycle import read_status, status_path

#: One client (``python -c _CLIENT PREFIX TAG N``, CA port from its environment): a
#: channel to each of its N names, then, at a line on stdin, a put of 1.0 to each one
#: that connected, without waiting.
_CLIENT = r"""
import sys, time, epics
prefix, tag, n = sys.argv[1:4]
pvs = [epics.PV(f"{prefix}{tag}{k}_f1", auto_monitor=False) for k in range(int(n))]
# Past max_pvs a name gets no provisional PV and never connects: the wait ends once
# every name has, or none more has for a second.
end = time.monotonic() + 10
seen, since = 0, time.monotonic()
while time.monotonic() < end:
    n = sum(pv.connected for pv in pvs)
    if n == len(pvs) or (n and n == seen and time.monotonic() - since > 1):
        break
    if n != seen:
        seen, since = n, time.monotonic()
    time.sleep(0.02)
sys.stdin.readline()
for pv in pvs:
    if pv.connected:
        pv.put(1.0, wait=False)
epics.ca.flush_io()
time.sleep(1)
"""


class _Limited(CarelayServer):
    """carelay with two brokers and its own max_pvs."""

    def __init__(self, ports: set[int], max_pvs: int) -> None:
        super().__init__(ports, shards=2, brokers=2)
        self.max_pvs = max_pvs

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--max-pvs") + 1] = str(self.max_pvs)
        return argv


def stored(server: CarelayServer) -> int:
    """The PVs the shards hold, as their status files say once they stop changing."""
    run_dir = server.tmp / "data" / "run"
    last, end = -1, time.monotonic() + 10
    while time.monotonic() < end:
        files = [read_status(status_path(run_dir, f"shard {k}")) for k in range(server.shards)]
        now = sum(f["pvs"] for f in files if f)
        if now == last:
            return now
        last = now
        time.sleep(1.5)  # the status files are rewritten once a second
    return last


def create_at_once(prefix: str, ports: list[int], each: int) -> None:
    """One client per CA port, each with ``each`` new names under ``prefix``; once all
    are connected they put to every name at once.  Returns when they are done
    (tests/system/test_two_brokers.py runs it too)."""
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, prefix, f"d{k}_", str(each)],
            env=server_env(port),
            stdin=subprocess.PIPE,
            text=True,
        )
        for k, port in enumerate(ports)
    ]
    for client in clients:
        client.stdin.write("go\n")
        client.stdin.flush()
    for client in clients:
        if client.wait(timeout=60) != 0:
            raise RuntimeError(f"a creating client exited with status {client.returncode}")


def race(max_pvs: int, each: int) -> int:
    server = _Limited(set(), max_pvs)
    with server:
        create_at_once(server.prefix, [server.client_port(k) for k in range(2)], each)
        return stored(server)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.creation_race", description=__doc__)
    ap.add_argument("--max-pvs", type=int, default=200)
    ap.add_argument("--each", type=int, default=300, help="new names per client (default 300)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    for k in range(args.runs):
        n = race(args.max_pvs, args.each)
        print(f"run {k + 1}: {n} PVs stored, max_pvs {args.max_pvs} ({n - args.max_pvs:+d})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
