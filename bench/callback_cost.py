"""``python -m bench.callback_cost``: what one put with callback costs each server.

One client (W1's writer, every put with callback) puts to one ``f1`` PV,
``--n`` times, each after the last completed, then reads it back once, to a
server with nothing else to do: carelay with one shard, and the control.
Every thread of the server is read from /proc when the puts start and when
the client is done: CPU time (utime + stime, 10 ms ticks) and context
switches (voluntary and not).  The figures are printed per put, by process (supervisor,
broker, shard0, ...) and kind of thread: its main thread, ZeroMQ's I/O threads, and any
other.

This is where W1's puts with callback go: carelay's round trip wakes the
broker, its ZeroMQ I/O thread, the shard's I/O thread, the shard, and back;
the control answers in the thread that read the put.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections import Counter

from bench.phase import run_phase
from bench.servers import CarelayServer, ControlServer

SERVERS = {
    "carelay": lambda ports: CarelayServer(ports, shards=1, label="carelay (1 shard)"),
    "control": lambda ports: ControlServer(ports),
}
_TICK = os.sysconf("SC_CLK_TCK")


def thread_kind(pid: int, tid: int, comm: str) -> str:
    if comm.startswith("ZMQbg/IO"):
        return "ZeroMQ I/O"
    if tid == pid:
        return "main"
    return "other"


def thread_name(pid: int, tid: int, comm: str) -> str:
    """``main``, or the kernel's name of the thread (``PVXTCP``, ``ZMQbg/IO/0``, ...)."""
    return "main" if tid == pid else comm


def sample(pids: dict[str, int], kind=thread_kind) -> dict[tuple[int, int], tuple[str, float, int]]:
    """(pid, tid) -> (kind, CPU seconds, context switches) of every thread of ``pids``
    (role -> pid); the kind names the process's role and the thread (``kind``:
    ``thread_kind`` or ``thread_name``)."""
    out = {}
    for role, pid in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for t in tids:
            base = f"/proc/{pid}/task/{t}"
            try:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
                with open(f"{base}/stat") as f:
                    # Fields after the parenthesised name; utime and stime are 14 and 15.
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"{base}/status") as f:
                    switches = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
            except (FileNotFoundError, ProcessLookupError):
                continue
            cpu = (int(fields[11]) + int(fields[12])) / _TICK
            out[(pid, int(t))] = (f"{role} {kind(pid, int(t), comm)}", cpu, switches)
    return out


class ThreadSampler:
    """Reads every server thread when a phase starts and when its driver is done: the
    hooks ``run_phase`` offers a profiler."""

    def __init__(self, kind=thread_kind) -> None:
        self.kind = kind
        self.server = None
        self.before: dict = {}
        self.after: dict | None = None

    def start(self, server, tag: str) -> None:
        self.server = server
        self.before = sample(server.pids(), self.kind)

    def stop(self) -> None:
        # run_phase stops its profiler again on the way out: the first reading counts.
        if self.server is not None and self.after is None:
            self.after = sample(self.server.pids(), self.kind)

    def per_op(self, ops: int) -> tuple[dict[str, float], dict[str, float]]:
        """CPU microseconds and context switches per op between the two readings, by
        thread kind."""
        cpu: Counter = Counter()
        switches: Counter = Counter()
        for key, (k, c1, s1) in self.after.items():
            _, c0, s0 = self.before.get(key, (k, 0.0, 0))
            cpu[k] += c1 - c0
            switches[k] += s1 - s0
        return (
            {k: v / ops * 1e6 for k, v in cpu.items()},
            {k: v / ops for k, v in switches.items()},
        )


def print_threads(cpu_us: dict[str, float], switches: dict[str, float]) -> None:
    """A per-thread table of CPU and context switches per op, busiest first (threads
    with neither left out), and the total (bench.pva_cost, bench.shard_cost)."""
    print(f"  {'thread':28s} {'CPU us/put':>10s} {'switches/put':>13s}")
    for k in sorted(cpu_us, key=lambda k: -cpu_us[k]):
        if cpu_us[k] or switches[k]:
            print(f"  {k:28s} {cpu_us[k]:10.1f} {switches[k]:13.2f}")
    print(f"  {'all':28s} {sum(cpu_us.values()):10.1f} {sum(switches.values()):13.2f}")


def measure(kind: str, n: int, mp) -> dict:
    server = SERVERS[kind](set())
    sampler = ThreadSampler()
    writer = {"name": f"{server.prefix}cb_f1", "n": n, "every": 1, "base": 0.0}
    with server:
        r = run_phase(mp, server, [("scalar_writer", writer)], [0], profiler=sampler)
    cpu_us, switches = sampler.per_op(n)
    return {"round_trip_us": r.driver_span([0]) / n * 1e6, "cpu_us": cpu_us, "switches": switches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.callback_cost", description=__doc__)
    ap.add_argument("--n", type=int, default=3000, help="puts with callback (default 3000)")
    ap.add_argument("--servers", default="carelay,control")
    args = ap.parse_args(argv)
    mp = multiprocessing.get_context("spawn")
    for kind in args.servers.split(","):
        r = measure(kind, args.n, mp)
        total_cpu = sum(r["cpu_us"].values())
        total_sw = sum(r["switches"].values())
        print(f"{kind}: {r['round_trip_us']:.0f} us per put with callback, one after the other")
        print(f"  {'thread':24s} {'CPU us/put':>10s} {'switches/put':>13s}")
        for k in sorted(r["cpu_us"]):
            print(f"  {k:24s} {r['cpu_us'][k]:10.1f} {r['switches'][k]:13.2f}")
        print(f"  {'all':24s} {total_cpu:10.1f} {total_sw:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
