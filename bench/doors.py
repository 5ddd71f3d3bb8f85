"""W9: two CA brokers against one, W1's clients split over them.

The same clients (the largest W1 count, each with ``w1_puts`` puts to its own f1 PV, one
with callback every ``w1_every``) run against carelay with one broker, then with two
(``[[ca]]``, on two loopback ports), the clients dealt out over the brokers in turn.
Figures: aggregate puts/s, the relay's CPU per put, and the brokers' CPU per put (both
brokers summed: each also mirrors the other's puts).  Carelay only: the control relay
and the IOC have one CA server each.
"""

from __future__ import annotations

from bench.servers import CarelayServer
from bench.workloads import Bench, spread_names


def w9(bench: Bench, kind: str) -> dict:
    """W9 on ``kind``; nothing for another server than carelay."""
    if kind != "carelay":
        return {}
    p = bench.params
    n = max(p.w1_clients)
    out = {}
    for brokers in (1, 2):
        srv = CarelayServer(bench.ports, p.carelay_shards, brokers=brokers)
        bench.started.append(srv)
        names = spread_names(srv.prefix, "w9c", "f1", n, [p.carelay_shards])
        srv.records = [(name, "f", 1) for name in names]
        clients = [
            ("scalar_writer", {"name": name, "n": p.w1_puts, "every": p.w1_every, "base": 1e6 * k})
            for k, name in enumerate(names, start=1)
        ]
        with srv:
            r = bench.phase(srv, clients, list(range(n)), f"W9-{brokers}b")
        puts = n * p.w1_puts
        broker_cpu = sum(v for role, v in r.cpu_roles.items() if role.startswith("broker"))
        key = f"{brokers}b"
        out[f"puts_per_s_{key}"] = puts / r.driver_span(range(n))
        out[f"cpu_us_per_put_{key}"] = r.cpu_s / puts * 1e6
        out[f"broker_cpu_us_per_put_{key}"] = broker_cpu / puts * 1e6
    out["speedup_2b"] = out["puts_per_s_2b"] / out["puts_per_s_1b"]
    return out
