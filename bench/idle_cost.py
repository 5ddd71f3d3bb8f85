"""Idle cost, process by process: what the relay takes of a core while nothing changes.

    python -m bench.idle_cost [--pvs 0,20000] [--seconds 30] [--servers carelay,control]

For each PV count, each server is started on its own port; a client process creates
that many f1 PVs (connect, one put with callback each, as W5 does) and keeps them
connected; after a settling pause the CPU time (utime+stime) of every process of the
server is read before and after ``--seconds`` of quiet.  Prints one line per process
in percent of one core.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

from bench.clients import client_main
from bench.servers import CarelayServer, ControlServer, client_env

#: Seconds between the last creation and the start of the measurement.
SETTLE = 3.0
CREATE_BATCH = 1000
CLIENTS = 2


def _connect(srv, pvs: int):
    """Start CLIENTS creator processes for ``pvs`` PVs; returns (processes, stop event)."""
    ctx = multiprocessing.get_context("spawn")
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    per = pvs // CLIENTS
    procs = []
    for c in range(CLIENTS):
        names = [f"{srv.prefix}idle{c}n{i:05d}_f1" for i in range(per)]
        args = ("creator", client_env(srv.port), {"names": names, "batch": CREATE_BATCH})
        p = ctx.Process(target=client_main, args=(*args, c, ready_q, go, stop, result_q))
        p.start()
        procs.append(p)
    for _ in procs:
        index, what, detail = ready_q.get(timeout=120)
        if what == "error":
            raise RuntimeError(detail)
    go.set()
    for _ in procs:
        index, what, detail = ready_q.get(timeout=600)
        if what == "error":
            raise RuntimeError(detail)
    return procs, stop


def measure(srv, pvs: int, seconds: float) -> dict[str, float]:
    """CPU percent of one core of each process of ``srv``, idle with ``pvs`` PVs connected."""
    with srv:
        procs, stop = _connect(srv, pvs) if pvs else ([], None)
        try:
            time.sleep(SETTLE)
            cpu0, t0 = srv.cpu_by_role(), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = srv.cpu_by_role(), time.monotonic()
        finally:
            if stop is not None:
                stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    return {role: (cpu1[role] - cpu0.get(role, 0.0)) / (t1 - t0) * 100 for role in cpu1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pvs", default="0,20000", help="PV counts, comma separated")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--servers", default="carelay,control")
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    ports: set[int] = set()
    for pvs in (int(n) for n in args.pvs.split(",")):
        for kind in args.servers.split(","):
            srv = CarelayServer(ports, args.shards) if kind == "carelay" else ControlServer(ports)
            by_role = measure(srv, pvs, args.seconds)
            parts = "  ".join(f"{role} {pct:.2f}" for role, pct in sorted(by_role.items()))
            print(f"{kind:8s} {pvs:6d} PVs  total {sum(by_role.values()):.2f} %  ({parts})")


if __name__ == "__main__":
    main()
