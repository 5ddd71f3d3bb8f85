"""``python -m bench.callback_cost``: what one put with callback costs each server.

One client (W1's writer, every put with callback) puts to one ``f1`` PV,
``--n`` times, each after the last completed, then reads it back once, to a
server with nothing else to do: carelay with one shard, and the control.
Every thread of the server is read from /proc when the puts start and when
the client is done: CPU time (utime + stime, 10 ms ticks), the part of it spent in
the kernel (stime), and context switches (voluntary and not).  The figures are printed per
put, by process (supervisor, broker, shard0, ...) and kind of thread: its main thread,
ZeroMQ's I/O threads, and any other.  Beside them, how busy the machine's cores were
between the two readings (/proc/stat): near 100 %, the puts were bound by the CPU, and
every microsecond of it counts; well below, by the waits between threads.

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
from typing import NamedTuple

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


def sample(
    pids: dict[str, int], kind=thread_kind
) -> dict[tuple[int, int], tuple[str, float, float, int]]:
    """(pid, tid) -> (kind, CPU seconds, of them in the kernel, context switches) of every
    thread of ``pids`` (role -> pid); the kind names the process's role and the thread
    (``kind``: ``thread_kind`` or ``thread_name``)."""
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
            user, kernel = int(fields[11]) / _TICK, int(fields[12]) / _TICK
            name = f"{role} {kind(pid, int(t), comm)}"
            out[(pid, int(t))] = (name, user + kernel, kernel, switches)
    return out


def machine_times() -> tuple[int, int]:
    """(all, idle) CPU time of the machine's cores so far, in ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # idle and iowait


class PerOp(NamedTuple):
    """Per op, by thread: CPU microseconds, of them in the kernel, context switches."""

    cpu_us: dict[str, float]
    kernel_us: dict[str, float]
    switches: dict[str, float]


class ThreadSampler:
    """Reads every server thread, and the machine's cores, when a phase starts and when its
    driver is done: the hooks ``run_phase`` offers a profiler."""

    def __init__(self, kind=thread_kind) -> None:
        self.kind = kind
        self.server = None
        self.before: dict = {}
        self.after: dict | None = None
        self._machine: list[tuple[int, int]] = []

    def start(self, server, tag: str) -> None:
        self.server = server
        self._machine = [machine_times()]
        self.before = sample(server.pids(), self.kind)

    def stop(self) -> None:
        # run_phase stops its profiler again on the way out: the first reading counts.
        if self.server is not None and self.after is None:
            self.after = sample(self.server.pids(), self.kind)
            self._machine.append(machine_times())

    def per_op(self, ops: int) -> PerOp:
        """CPU microseconds, of them in the kernel, and context switches per op between the
        two readings, by thread kind."""
        cpu: Counter = Counter()
        kernel: Counter = Counter()
        switches: Counter = Counter()
        for key, (k, c1, k1, s1) in self.after.items():
            _, c0, k0, s0 = self.before.get(key, (k, 0.0, 0.0, 0))
            cpu[k] += c1 - c0
            kernel[k] += k1 - k0
            switches[k] += s1 - s0
        return PerOp(
            {k: v / ops * 1e6 for k, v in cpu.items()},
            {k: v / ops * 1e6 for k, v in kernel.items()},
            {k: v / ops for k, v in switches.items()},
        )

    def busy(self) -> float:
        """The share of the machine's cores that were busy between the two readings, with
        anything: the server, the clients, the rest."""
        (all0, idle0), (all1, idle1) = self._machine
        return 1 - (idle1 - idle0) / max(1, all1 - all0)


def print_threads(per: PerOp) -> None:
    """A per-thread table of CPU, the kernel's part of it and context switches per op,
    busiest first (threads with none of them left out), and the total (bench.callback_cost,
    bench.pva_cost, bench.shard_cost)."""
    cpu, kernel, switches = per
    print(f"  {'thread':28s} {'CPU us/put':>10s} {'in kernel':>10s} {'switches/put':>13s}")
    for k in sorted(cpu, key=lambda k: -cpu[k]):
        if cpu[k] or switches[k]:
            print(f"  {k:28s} {cpu[k]:10.1f} {kernel[k]:10.1f} {switches[k]:13.2f}")
    total = [sum(d.values()) for d in per]
    print(f"  {'all':28s} {total[0]:10.1f} {total[1]:10.1f} {total[2]:13.2f}")


def busy_line(sampler: ThreadSampler) -> str:
    """How busy the machine was during the puts, in words."""
    return f"the machine's {os.cpu_count()} cores {100 * sampler.busy():.0f} % busy"


def measure(kind: str, n: int, mp) -> dict:
    server = SERVERS[kind](set())
    sampler = ThreadSampler()
    writer = {"name": f"{server.prefix}cb_f1", "n": n, "every": 1, "base": 0.0}
    with server:
        r = run_phase(mp, server, [("scalar_writer", writer)], [0], profiler=sampler)
    return {
        "round_trip_us": r.driver_span([0]) / n * 1e6,
        "per_op": sampler.per_op(n),
        "busy": busy_line(sampler),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.callback_cost", description=__doc__)
    ap.add_argument("--n", type=int, default=3000, help="puts with callback (default 3000)")
    ap.add_argument("--servers", default="carelay,control")
    args = ap.parse_args(argv)
    mp = multiprocessing.get_context("spawn")
    for kind in args.servers.split(","):
        r = measure(kind, args.n, mp)
        print(
            f"{kind}: {r['round_trip_us']:.0f} us per put with callback, one after the "
            f"other; {r['busy']}"
        )
        print_threads(r["per_op"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
