"""``python -m bench``: carelay against the control relay and a softioc IOC, W1-W10.

    python -m bench [--quick] [--out DIR] [--only W1,W3] [--servers carelay,control,softioc]
                    [--profile] [--w10-bursts N] [--w10-monitors 0,1,10]

Every server is started by the suite on its own free CA port (never 5064),
driven by pyepics clients in spawned processes, and stopped at the end of
its workload.  The output: a table on stdout, ``DIR/results.json`` and PNG
plots in DIR.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from bench import report
from bench.burstload import w10
from bench.creation import w5
from bench.doors import w9
from bench.pva import pva_available, w7, w8
from bench.servers import softioc_available
from bench.workloads import FULL, QUICK, Bench

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "W10")
SERVERS = ("carelay", "control", "softioc")
QUICK_WORKLOADS = ("W1", "W3")
QUICK_SERVERS = ("carelay", "control")
#: The workloads that are functions of their own modules, not methods of Bench.
MODULE_WORKLOADS = {"W5": w5, "W7": w7, "W8": w8, "W9": w9, "W10": w10}
DESCRIPTIONS = {
    "W1": "scalar puts",
    "W2": "put-to-monitor latency",
    "W3": "buffer appends",
    "W4": "1 MB text",
    "W5": "creation and memory",
    "W6": "buffer scaling over shards",
    "W7": "cross-protocol latency, CA and PVA",
    "W8": "PVA puts (control: a p4p server)",
    "W9": "two CA brokers against one",
    "W10": "bursts of puts and gets, with monitors",
}


def _list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    items = [x.upper() if what == "workload" else x.lower() for x in items]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or '(none)'}; choose from {','.join(allowed)}"
        )
    return [x for x in allowed if x in items]


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"not a list of counts 0 or more: {text!r}")
    return counts


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny counts, W1+W3 only, carelay + control (unless --only/--servers)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    p.add_argument(
        "--only",
        type=lambda s: _list(s, WORKLOADS, "workload"),
        help="comma-separated workloads, e.g. W1,W3 (default all; --quick: W1,W3)",
    )
    p.add_argument(
        "--servers",
        type=lambda s: _list(s, SERVERS, "server"),
        help="comma-separated servers (default carelay,control,softioc; --quick: carelay,control)",
    )
    p.add_argument(
        "--w1-every",
        type=int,
        metavar="N",
        help="W1: a put with callback every N-th put (default 100; 0: only the last one)",
    )
    p.add_argument(
        "--w10-bursts",
        type=int,
        metavar="N",
        help="W10: bursts per phase (default 30; more for a profile of one shape)",
    )
    p.add_argument(
        "--w10-monitors",
        type=_counts,
        metavar="LIST",
        help="W10: comma-separated monitor counts (default 0,1,10)",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="run nothing: print the table and draw the plots again from DIR/results.json",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="python",
        choices=("python", "native"),
        help="record every relay process with py-spy during each timed phase (DIR/profiles/); "
        "'native' adds C/C++ frames; the figures of a profiled run are not for comparison",
    )
    return p.parse_args(argv)


def machine_info() -> dict:
    info = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for pkg in (
        "carelay",
        "pcaspy",
        "pyepics",
        "pyzmq",
        "numpy",
        "msgpack",
        "softioc",
        "epicscorelibs",
        "psutil",
        "matplotlib",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info["packages"] = versions
    return info


def git_info() -> dict:
    """The commit of the carelay under test, and its changed source files if any."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            r = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return r.stdout.strip()

    changed = git("status", "--porcelain", "--", "broker", "shard", "common", "supervisor")
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "subject": git("log", "-1", "--format=%s") or None,
        "carelay_source_changes": changed.splitlines(),
    }


def _extra_json(extra: dict) -> dict:
    out = {k: v for k, v in extra.items() if k != "w2_latency_ms"}
    lat = extra.get("w2_latency_ms")
    if lat:
        import numpy as np

        # The CDF as 206 percentiles: enough to draw it again from results.json.
        qs = [i / 2 for i in range(199)] + [99.5 + i / 10 for i in range(6)]
        out["w2_latency_ms_percentiles"] = {
            "percentiles": qs,
            **{s: [round(float(x), 4) for x in np.percentile(v, qs)] for s, v in lat.items()},
        }
    return out


class CpuMeter:
    """CPU time of the whole machine against the suite's own (itself and every process it
    started and waited for): the rest is other work that ran beside the benchmark."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.ours0 = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            v = [int(x) for x in fields]
            busy = (sum(v[:8]) - v[3] - v[4]) / ticks  # all but idle and iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def foreign_pct(self) -> float:
        """Other processes' CPU since the start, in % of all cores over the wall time."""
        t, busy, ours = self._read()
        wall = (t - self.t0) * (os.cpu_count() or 1)
        return max(0.0, 100.0 * ((busy - self.busy0) - (ours - self.ours0)) / wall) if wall else 0.0


class _Stop(Exception):
    pass


def _on_signal(signum, frame):
    raise _Stop(f"signal {signum}")


def write_outputs(out: Path, doc: dict) -> None:
    """table.md and the plots, from a results.json document."""
    text = report.table_text(doc["table"], doc["servers"], markdown=True)
    foreign = doc.get("extra", {}).get("foreign_cpu_pct")
    if foreign:
        text += "\nCPU taken by other processes during each workload (% of all cores):\n\n"
        text += report.foreign_text(foreign, doc["servers"])
    (out / "table.md").write_text(text)
    try:
        for path in report.plots(out, doc["table"], doc["servers"], doc["extra"], doc["params"]):
            print(f"plot: {path}")
    except ImportError as e:
        print(f"no plots: {e} (pip install matplotlib)")


def replot(out: Path) -> int:
    doc = json.loads((out / "results.json").read_text())
    print(report.table_text(doc["table"], doc["servers"]))
    write_outputs(out, doc)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.out)
    params = QUICK if args.quick else FULL
    if args.w1_every is not None:
        if args.w1_every < 0:
            print("--w1-every must be 0 or more", file=sys.stderr)
            return 2
        params = dataclasses.replace(params, w1_every=args.w1_every)
    if args.w10_bursts is not None:
        if args.w10_bursts < 1:
            print("--w10-bursts must be 1 or more", file=sys.stderr)
            return 2
        params = dataclasses.replace(params, w10_bursts=args.w10_bursts)
    if args.w10_monitors is not None:
        params = dataclasses.replace(params, w10_monitors=args.w10_monitors)
    workloads = args.only or list(QUICK_WORKLOADS if args.quick else WORKLOADS)
    servers = args.servers or list(QUICK_SERVERS if args.quick else SERVERS)
    skipped = {}
    if "softioc" in servers:
        why = softioc_available()
        if why:
            print(f"softioc skipped: {why}", flush=True)
            skipped["softioc"] = why
            servers.remove("softioc")
    why = pva_available() if {"W7", "W8"} & set(workloads) else None
    if why:
        print(f"W7, W8 skipped: {why}", flush=True)
        skipped["W7,W8"] = why
        workloads = [w for w in workloads if w not in ("W7", "W8")]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    profiler = None
    if args.profile:
        from bench.profiling import Profiler

        profiler = Profiler(out, native=args.profile == "native")
        if not profiler.available:
            print("--profile: py-spy not found (pip install py-spy); not profiling", flush=True)
            profiler = None

    signal.signal(signal.SIGTERM, _on_signal)
    started = time.monotonic()
    load_before = os.getloadavg()
    whole_run = CpuMeter()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", flush=True)

    bench = Bench(multiprocessing.get_context("spawn"), params, profiler=profiler, log=log)
    results: dict[str, dict[str, dict]] = {}
    errors = []
    print(
        f"carelay benchmark suite ({'quick' if args.quick else 'full'}): "
        f"workloads {','.join(workloads)}; servers {','.join(servers)}; out {out}",
        flush=True,
    )
    try:
        for w in workloads:
            for s in servers:
                log(f"{w} ({DESCRIPTIONS[w]}) on {s} ...")
                t = time.monotonic()
                meter = CpuMeter()
                try:
                    run = MODULE_WORKLOADS.get(w)
                    figures = run(bench, s) if run else getattr(bench, w.lower())(s)
                except (_Stop, KeyboardInterrupt):
                    raise
                except Exception as e:
                    text = traceback.format_exc()
                    print(text, file=sys.stderr, flush=True)
                    errors.append(f"{w} on {s}: {type(e).__name__}: {e}")
                    figures = {"error": f"{type(e).__name__}: {e}"}
                results.setdefault(w, {})[s] = figures
                foreign = meter.foreign_pct() if figures else 0.0
                bench.extra.setdefault("foreign_cpu_pct", {}).setdefault(w, {})[s] = round(
                    foreign, 1
                )
                if foreign > 10:
                    log(f"note: other processes took {foreign:.0f}% of the CPU during {w} on {s}")
                shown = ", ".join(
                    f"{k}={v:.4g}" for k, v in figures.items() if isinstance(v, int | float)
                )
                log(f"{w} on {s} done in {time.monotonic() - t:.1f} s: {shown or figures}")
    except (_Stop, KeyboardInterrupt) as e:
        print(f"interrupted ({e or 'Ctrl-C'}); servers stopped", file=sys.stderr, flush=True)
        return 130

    elapsed = time.monotonic() - started
    table = report.evaluate(report.rows_for(params), results, servers)
    print()
    print(report.table_text(table, servers), flush=True)
    foreign = bench.extra.get("foreign_cpu_pct", {})
    if foreign:
        print("CPU taken by other processes on the machine during each workload (% of all cores):")
        for w, per in foreign.items():
            print(f"  {w}: " + ", ".join(f"{s} {v:.0f}%" for s, v in per.items()))
        print()
    doc = {
        "mode": "quick" if args.quick else "full",
        "elapsed_s": elapsed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "git": git_info(),
        # Other work on the machine skews the figures: the load average says how much.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "foreign_cpu_pct": round(whole_run.foreign_pct(), 1),
        "params": params.as_dict(),
        "workloads": workloads,
        "servers": servers,
        "skipped": skipped,
        "results": results,
        "table": table,
        "extra": _extra_json(bench.extra),
        "errors": errors,
        "profiled": profiler is not None,
        # Every server process the suite started (all stopped by now).
        "server_processes": [p for srv in bench.started for p in srv.seen()],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    write_outputs(out, doc)
    if profiler is not None:
        for name, text in profiler.summaries.items():
            print(f"\n--- profile {name} ---\n{text}")
    print(f"results: {out / 'results.json'}; {elapsed:.0f} s in all")
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    return 0
