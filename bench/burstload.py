"""W10: bursts of puts and gets over many channels, with monitors.

The client processes (``bench.bursts``) drive the bursts; this module runs their
phases, over channels of one PV and over as many PVs, with each monitor count.
"""

from __future__ import annotations

from bench.workloads import Bench


def w10(bench: Bench, kind: str) -> dict:
    """Bursts: w10_bursts bursts of w10_channels puts (no callback, one flush a burst),
    then the same of gets, over w10_channels channels of one f1 PV and over as many
    f1 PVs, with each of w10_monitors monitors subscribed to every PV of the shape."""
    p = bench.params
    srv = bench.server(kind)
    one = f"{srv.prefix}w10one_f1"
    many = [f"{srv.prefix}w10m{k:04d}_f1" for k in range(p.w10_channels)]
    srv.records = [(name, "f", 1) for name in (one, *many)]
    shapes = {"onepv": [one] * p.w10_channels, "manypv": many}
    out = {}
    base = 0.0
    with srv:
        for shape, names in shapes.items():
            distinct = list(dict.fromkeys(names))
            for m in p.w10_monitors:
                for op in ("put", "get"):
                    base += 1e7  # values of each phase above those of the last
                    kw = {"names": names, "op": op, "bursts": p.w10_bursts, "base": base}
                    clients = [("bench.bursts.burst_driver", kw)]
                    # A monitor counts the timed puts' values only: above the primed ones.
                    above = base + len(distinct) - 0.5
                    clients += [
                        ("bench.bursts.burst_monitor", {"names": distinct, "above": above})
                    ] * m
                    r = bench.phase(srv, clients, [0], f"W10-{op}-{shape}-{m}mon")
                    ops = r.done[0]["ops"]
                    key = f"{shape}_{m}mon"
                    out[f"{op}_us_per_op_{key}"] = r.driver_span([0]) / ops * 1e6
                    out[f"{op}_cpu_us_per_op_{key}"] = r.cpu_s / ops * 1e6
                    out[f"{op}_client_cpu_us_per_op_{key}"] = r.done[0]["cpu_s"] / ops * 1e6
                    if op == "put" and m:
                        events = sum(r.results[i]["events"] for i in range(1, m + 1))
                        out[f"events_per_put_{key}"] = events / (ops * m)
    return out
