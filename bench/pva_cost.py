"""``python -m bench.pva_cost``: where a PVA put with completion goes, thread by thread.

W8's clients (``--clients`` p4p clients, ``--n`` puts each to its own ``f1`` PV, each
put waiting for its completion) against carelay with ``pva = true`` (2 shards, the
clients' PVs spread evenly over them in every run) and against the PVA control.  Every
thread of the server is read from /proc when the puts start and when the clients are
done (see bench/callback_cost.py): CPU time, its part in the kernel and context switches
per put, by process (pva, shard0, broker, control, ...) and thread, named as the kernel
names it (p4p's network thread is ``PVXTCP``, ZeroMQ's I/O threads ``ZMQbg/IO/0``), the
main thread ``main``.  ``--clients 1`` shows the round trip of one put at a time; W8's
four show its CPU per put under load.

Beside them, the floor (bench/pva_floor.py): the control's PVs, each put sent over
ZeroMQ to a second process that keeps it, and completed on its answer, as carelay's
shape asks and with nothing more.  Each server's puts/s against the control's, in one
run: the floor's is what the shape costs, carelay's against the floor what the relay's
own work does (its processes ``floor`` and ``truth``).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys

from bench import callback_cost
from bench.phase import run_phase
from bench.pva import (
    CarelayPvaServer,
    PvaControlServer,
    PvaFloorServer,
    client_cpu_s,
    pva_available,
)
from carelay.common.sharding import shard_for

#: carelay's shards here, as in W8.
CARELAY_SHARDS = 2

SERVERS = {
    "carelay": lambda ports: CarelayPvaServer(ports, shards=CARELAY_SHARDS),
    "floor": lambda ports: PvaFloorServer(ports),
    "control": lambda ports: PvaControlServer(ports),
}


def spread_names(prefix: str, clients: int, shards: int) -> list[str]:
    """One ``f1`` name per client, client k's on shard k % shards: the same spread in
    every run (W8's names fall on the shards as the random prefix makes them, and a
    shard that serves several clients answers several puts per batch)."""
    names: list[str] = []
    candidates = (f"{prefix}cost{j}_f1" for j in itertools.count())
    for k in range(clients):
        names.append(next(n for n in candidates if shard_for(n, shards) == k % shards))
    return names


def measure(kind: str, clients: int, n: int, mp) -> dict:
    server = SERVERS[kind](set())
    names = spread_names(server.prefix, clients, CARELAY_SHARDS)
    server.records = [(name, "f", 1) for name in names]
    writers = [
        ("bench.pva.pva_put_writer", {"name": name, "n": n, "base": 1e6 * k, "conf": server.conf})
        for k, name in enumerate(names, start=1)
    ]
    sampler = callback_cost.ThreadSampler(kind=callback_cost.thread_name)
    with server:
        r = run_phase(mp, server, writers, list(range(clients)), profiler=sampler)
    total = clients * n
    return {
        "puts_per_s": total / r.driver_span(range(clients)),
        "round_trip_us": r.driver_span(range(clients)) / n * 1e6,
        "client_us": client_cpu_s(r, clients) / total * 1e6,
        "per_op": sampler.per_op(total),
        "busy": callback_cost.busy_line(sampler),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pva_cost", description=__doc__)
    ap.add_argument("--n", type=int, default=5000, help="puts per client (default 5000)")
    ap.add_argument("--clients", type=int, default=4, help="p4p clients (default 4, as W8)")
    ap.add_argument("--servers", default="carelay,floor,control")
    args = ap.parse_args(argv)
    why = pva_available()
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    mp = multiprocessing.get_context("spawn")
    for kind in args.servers.split(","):
        r = measure(kind, args.clients, args.n, mp)
        print(
            f"{kind}: {r['puts_per_s']:.0f} PVA puts/s, {r['round_trip_us']:.0f} us per put "
            f"and client, {args.clients} client(s); {r['busy']}; the clients "
            f"{r['client_us']:.1f} us of CPU per put"
        )
        callback_cost.print_threads(r["per_op"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
