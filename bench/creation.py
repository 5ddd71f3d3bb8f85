"""W5: creation and memory.

Clients connect to w5_pvs new f1 PVs and create each with a put with callback; the
figures are the creation rate, the relay's CPU per creation, the RSS of its processes
after minus before, and its CPU while the PVs sit connected and nobody writes.
"""

from __future__ import annotations

import itertools
import time

from bench.workloads import Bench

MIB = 2**20


def w5(bench: Bench, kind: str) -> dict:
    """Creation and memory: w5_pvs f1 PVs created by w5_clients clients (connect, put
    with callback); RSS of all relay processes after minus before."""
    p = bench.params
    srv = bench.server(kind)
    per = p.w5_pvs // p.w5_clients
    names = [[f"{srv.prefix}w5c{c}n{i:05d}_f1" for i in range(per)] for c in range(p.w5_clients)]
    srv.records = [(n, "f", 1) for n in itertools.chain.from_iterable(names)]
    before: dict[str, int] = {}
    if kind == "softioc":
        # An IOC has its records up front: "before" is the same IOC without them.
        base = bench.server(kind)
        with base:
            time.sleep(1.0)
            before = base.rss_by_role()
    after: dict[str, int] = {}
    idle: list[float] = []
    with srv:
        time.sleep(1.0)
        before = before or srv.rss_by_role()
        clients = [("creator", {"names": ns, "batch": p.w5_batch}) for ns in names]

        def measure():
            time.sleep(0.5)
            after.update(srv.rss_by_role())
            # What the relay costs while its PVs sit connected and nobody writes.
            cpu0, t0 = srv.cpu_seconds(), time.monotonic()
            time.sleep(p.w5_idle)
            idle.append((srv.cpu_seconds() - cpu0) / (time.monotonic() - t0))

        r = bench.phase(srv, clients, list(range(len(clients))), "W5", on_done=measure)
    bench.extra.setdefault("w5_rss_mib_by_process", {})[kind] = {
        role: {"before": round(before.get(role, 0) / MIB, 1), "after": round(b / MIB, 1)}
        for role, b in sorted(after.items())
    }
    created = sum(r.done[i]["created"] for i in range(len(clients)))
    rss0, rss1 = sum(before.values()), sum(after.values())
    busy = sum(r.done[i]["end"] - r.done[i]["start"] for i in range(len(clients)))
    connecting = sum(r.done[i]["connect_s"] for i in range(len(clients)))
    return {
        "creations_per_s": created / r.driver_span(range(len(clients))),
        "cpu_us_per_creation": r.cpu_s / created * 1e6,
        # The rest of the clients' time: their puts with callback, waiting to be confirmed.
        "connect_pct": 100.0 * connecting / busy,
        "rss_mib_per_1000_pvs": (rss1 - rss0) / MIB / (created / 1000),
        "rss_before_mib": rss0 / MIB,
        "rss_after_mib": rss1 / MIB,
        "idle_cpu_pct": idle[0] * 100,
    }
