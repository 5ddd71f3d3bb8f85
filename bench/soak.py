"""``python -m bench.soak``: the same cycle of client churn, again and again, against
``carelay up``, with the memory, descriptors and threads of every process of the relay
sampled as it goes: what grows with each cycle is what a relay running for months
would grow by.

One cycle, as scripts and clients use a relay: a new CA client context (a new
circuit) creates 20 ``f1`` PVs, a buffer and a text PV with puts with callback,
monitors five of them while they take 50 puts each without callback, searches five
names the naming rule refuses and opens five provisional PVs it never puts to, then
deletes every PV it made through ``<prefix>delpv`` and closes.  With ``--pva`` a new
p4p context then creates five PVs, monitors one through 20 puts, reads them all and
deletes them.  Every name is new: nothing of a cycle is left for the next.

At the end, per process, the growth per 1,000 cycles over the second half of the run
(a least-squares slope: the first half is warm-up: caches, log budgets, the refused
names the broker remembers up to its bound).  A relay that holds nothing per cycle
shows a slope near zero; measure long enough for bounded memory to reach its bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.pva import CarelayPvaServer, pva_available
from bench.servers import CarelayServer, client_env

#: Per cycle: PVs created and deleted over CA, and over PVA.
CA_PVS = 20
PVA_PVS = 5


def sample(server) -> dict[str, tuple[int, int, int]]:
    """Per role: (RSS in kB, open descriptors, threads)."""
    out = {}
    for p in server.processes():
        try:
            role = server._role(p.pid, p.cmdline())
            out[role] = (p.memory_info().rss // 1024, p.num_fds(), p.num_threads())
        except Exception:
            continue
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of (x, y) points (0.0 with fewer than two x values)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def ca_cycle(ctx_type, prefix: str, i: int) -> None:
    ctx = ctx_type()
    try:
        names = [f"{prefix}soak{i}x{k}_f1" for k in range(CA_PVS)]
        names += [f"{prefix}soakb{i}_F100", f"{prefix}soakc{i}_c200"]
        pvs = ctx.get_pvs(*names, timeout=5)
        for pv in pvs:
            pv.wait_for_connection(timeout=5)
        for k, pv in enumerate(pvs[:CA_PVS]):
            pv.write([float(k)], wait=True, timeout=5)
        pvs[CA_PVS].write([1.0, 2.0, 3.0], wait=True, timeout=5)
        pvs[CA_PVS + 1].write(b"soak", wait=True, timeout=5)
        subs = [pv.subscribe() for pv in pvs[:5]]
        for s in subs:
            s.add_callback(lambda sub, response: None)
        for j in range(50):
            for pv in pvs[:5]:
                pv.write([float(j)], wait=False)
        for pv in pvs[5:10]:
            pv.write([9.0], wait=True, timeout=5)
        refused = [f"{prefix}bad name {i} {k}" for k in range(5)]
        provisional = [f"{prefix}prov{i}x{k}_i1" for k in range(5)]
        for pv in ctx.get_pvs(*refused, *provisional, timeout=0.5)[5:]:
            pv.wait_for_connection(timeout=5)
        for s in subs:
            s.clear()
        (delpv,) = ctx.get_pvs(prefix + "delpv", timeout=5)
        delpv.wait_for_connection(timeout=5)
        for name in names:
            delpv.write(name.encode(), wait=True, timeout=5)
    finally:
        ctx.disconnect(wait=False)


def pva_cycle(conf: dict, prefix: str, i: int) -> None:
    from p4p.client.thread import Context

    ctx = Context("pva", conf=conf, useenv=False)
    try:
        names = [f"{prefix}pva{i}x{k}_f1" for k in range(PVA_PVS)]
        for name in names:
            ctx.put(name, 1.5, timeout=5)
        sub = ctx.monitor(names[0], lambda value: None)
        for j in range(20):
            ctx.put(names[0], float(j), timeout=5)
        ctx.get(names, timeout=5)
        sub.close()
        for name in names:
            ctx.put(prefix + "delpv", name, timeout=5)
    finally:
        ctx.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    ap.add_argument("--cycles", type=int, default=0, help="stop after this many cycles")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--pva", action="store_true", help="with the PVA front-end and its cycle")
    args = ap.parse_args(argv)
    if args.pva and (why := pva_available()) is not None:
        print(why, file=sys.stderr)
        return 2
    server = CarelayPvaServer(set()) if args.pva else CarelayServer(set())
    with server:
        os.environ.update(client_env(server.port))
        import caproto.threading.client

        ctx_type = caproto.threading.client.Context
        conf = getattr(server, "conf", None)
        samples: list[tuple[int, dict]] = []
        end = time.monotonic() + args.minutes * 60
        next_sample, i, failed = time.monotonic(), 0, 0
        while time.monotonic() < end and not (args.cycles and i >= args.cycles):
            if time.monotonic() >= next_sample:
                samples.append((i, sample(server)))
                print(f"cycle {i:6d}: " + _line(samples[-1][1]), flush=True)
                next_sample += args.every
            try:
                ca_cycle(ctx_type, server.prefix, i)
                if args.pva:
                    pva_cycle(conf, server.prefix, i)
            except Exception as e:
                failed += 1
                print(f"cycle {i}: failed: {e!r}", flush=True)
            i += 1
        server.check_alive()
        samples.append((i, sample(server)))
        print(f"cycle {i:6d}: " + _line(samples[-1][1]))
    print(f"{i} cycles, {failed} failed")
    late = samples[len(samples) // 2 :]
    for role in sorted(samples[-1][1]):
        rss = [(c, s[role][0]) for c, s in late if role in s]
        fds = [(c, s[role][1]) for c, s in late if role in s]
        print(
            f"  {role:12s} RSS {slope(rss) * 1000:+9.1f} kB, "
            f"descriptors {slope(fds) * 1000:+7.2f} per 1,000 cycles (second half)"
        )
    return 1 if failed else 0


def _line(figures: dict) -> str:
    return " ".join(
        f"{role}={rss}kB/{fds}fd/{threads}t"
        for role, (rss, fds, threads) in sorted(figures.items())
    )


if __name__ == "__main__":
    sys.exit(main())
