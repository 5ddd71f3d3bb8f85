"""The suite's output: the table, results.json and the PNG plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

SERVER_ORDER = ("carelay", "control", "softioc")
WORKLOAD_ORDER = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "W10")


@dataclass(frozen=True)
class Row:
    """One table row: a figure of one workload, per server, with its target if any.

    ``keys`` maps a server kind to the figure's key in that server's results (the
    default key ``key`` for the others).  ``target`` is ``(op, value, of)``: ``of`` is
    "ratio" (carelay/control) or "abs" (carelay's own figure).
    """

    workload: str
    label: str
    key: str
    target: tuple[str, float, str] | None = None
    keys: tuple[tuple[str, str], ...] = ()

    def key_for(self, server: str) -> str:
        return dict(self.keys).get(server, self.key)

    def target_text(self) -> str:
        if self.target is None:
            return ""
        op, value, of = self.target
        return f"{op} {value:g}x" if of == "ratio" else f"{op} {value:g}"


def rows_for(params) -> list[Row]:
    rows = []
    for n in params.w1_clients:
        rows += [
            Row("W1", f"puts/s, {n} clients", f"puts_per_s_{n}c", (">=", 1.2, "ratio")),
            Row(
                "W1",
                f"relay CPU-us per put, {n} clients",
                f"cpu_us_per_put_{n}c",
                ("<=", 1.0, "ratio"),
            ),
        ]
    rows += [
        Row("W2", "put-to-monitor latency p50 (ms)", "p50_ms"),
        Row("W2", "put-to-monitor latency p99 (ms)", "p99_ms", ("<", 2.0, "abs")),
        Row("W2", "put-to-monitor latency max (ms)", "max_ms"),
        Row("W2", "monitor events received (%)", "events_received_pct"),
        Row("W3", "appends/s (1000 elements, callback)", "appends_per_s", (">=", 10.0, "ratio")),
        Row("W3", "relay CPU-ms per append", "cpu_ms_per_append"),
        Row(
            "W3",
            "monitor events per append (coalesced, not lost)",
            "monitor_events_per_append",
        ),
        Row("W3", "appends/s without a monitor (supplementary)", "appends_per_s_no_monitor"),
        Row("W3", "relay CPU-ms per append without a monitor", "cpu_ms_per_append_no_monitor"),
        Row("W4", f"put MB/s ({params.w4_readers} readers)", "put_mb_per_s", (">=", 1.0, "ratio")),
        Row("W4", f"read MB/s ({params.w4_readers} readers, sum)", "read_mb_per_s"),
        Row("W4", "relay CPU-ms per put", "cpu_ms_per_put"),
        Row("W5", "creations/s", "creations_per_s", (">=", 1.0, "ratio")),
        Row("W5", "relay CPU-us per creation", "cpu_us_per_creation"),
        Row("W5", "clients' time connecting, not confirming (%)", "connect_pct"),
        Row("W5", "relay RSS MiB per 1000 PVs", "rss_mib_per_1000_pvs", ("<=", 1.5, "ratio")),
        # 5 s of 10 ms ticks: a coarse figure; bench.idle_cost measures idle CPU.
        Row("W5", "relay CPU % of a core, idle, PVs connected", "idle_cpu_pct"),
    ]
    for s in params.w6_shards:
        rows.append(
            Row(
                "W6",
                f"appends/s, {params.w6_buffers} buffers, carelay {s} shard{'s' if s > 1 else ''}",
                "appends_per_s",
                keys=(("carelay", f"appends_per_s_{s}_shards"),),
            )
        )
    for s in params.w6_shards:
        rows.append(
            Row(
                "W6",
                f"relay CPU-ms per append, carelay {s} shard{'s' if s > 1 else ''}",
                "cpu_ms_per_append",
                keys=(("carelay", f"cpu_ms_per_append_{s}_shards"),),
            )
        )
    from bench.pva import rows as pva_rows  # W7, W8

    rows += pva_rows(params)
    rows += w9_rows(params)
    rows += w10_rows(params)
    return rows


def w9_rows(params) -> list[Row]:
    """W9, carelay only: one CA broker against two, the largest W1 client count."""
    n = max(params.w1_clients)
    rows = []
    for key, what in (
        ("puts_per_s", f"puts/s, {n} clients"),
        ("cpu_us_per_put", "relay CPU-us per put"),
        ("broker_cpu_us_per_put", "broker CPU-us per put (brokers summed)"),
    ):
        for b in (1, 2):
            label = f"{what}, carelay {b} broker{'s' if b > 1 else ''}"
            rows.append(Row("W9", label, f"{key}_{b}b", keys=(("carelay", f"{key}_{b}b"),)))
    rows.append(Row("W9", "puts/s, 2 brokers over 1", "speedup_2b"))
    return rows


def w10_rows(params) -> list[Row]:
    """W10: time per op (target: at most the control's), CPU per op, and monitor events."""
    n = params.w10_channels
    shapes = (("onepv", f"1 PV x {n} channels"), ("manypv", f"{n} PVs"))

    def mons(m: int) -> str:
        return f"{m} monitor{'' if m == 1 else 's'}"

    rows = []
    for op in ("put", "get"):
        for shape, label in shapes:
            for m in params.w10_monitors:
                rows.append(
                    Row(
                        "W10",
                        f"{op} us/op, {label}, {mons(m)}",
                        f"{op}_us_per_op_{shape}_{m}mon",
                        ("<=", 1.0, "ratio"),
                    )
                )
    for op in ("put", "get"):
        for shape, label in shapes:
            for m in params.w10_monitors:
                key = f"{op}_cpu_us_per_op_{shape}_{m}mon"
                rows.append(Row("W10", f"relay CPU-us per {op}, {label}, {mons(m)}", key))
    for shape, label in shapes:
        for m in params.w10_monitors:
            if m:
                key = f"events_per_put_{shape}_{m}mon"
                rows.append(Row("W10", f"events per put per monitor, {label}, {mons(m)}", key))
    return rows


def _num(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def evaluate(rows: list[Row], results: dict, servers: list[str]) -> list[dict]:
    """The table as dicts: values per server, carelay/control ratio, target met."""
    out = []
    for row in rows:
        per = results.get(row.workload)
        if not per:
            continue
        values = {}
        for s in servers:
            v = per.get(s, {}).get(row.key_for(s))
            values[s] = v if _num(v) else None
        if all(v is None for v in values.values()):
            continue
        c, k = values.get("carelay"), values.get("control")
        ratio = c / k if _num(c) and _num(k) and k else None
        met = None
        if row.target is not None:
            op, limit, of = row.target
            x = ratio if of == "ratio" else c
            if x is not None:
                met = {">=": x >= limit, "<=": x <= limit, "<": x < limit}[op]
        out.append(
            {
                "workload": row.workload,
                "metric": row.label,
                "key": row.key,
                "values": values,
                "carelay_over_control": ratio,
                "target": row.target_text(),
                "target_spec": row.target,
                "met": met,
            }
        )
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def foreign_text(foreign: dict, servers: list[str]) -> str:
    """Markdown table: CPU share of other processes during each workload, per server (a
    number, or a range already written out)."""
    out = ["| workload | " + " | ".join(servers) + " |", "|---|" + "---:|" * len(servers)]

    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v}%" if isinstance(v, str) else f"{v:.0f}%"

    for w, per in foreign.items():
        vals = [cell(per.get(s)) for s in servers]
        out.append(f"| {w} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def table_text(table: list[dict], servers: list[str], markdown: bool = False) -> str:
    head = ["workload / metric", *servers, "carelay/control", "target", "met"]
    lines = []
    for t in table:
        ratio = t["carelay_over_control"]
        met = {None: "", True: "yes", False: "NO"}[t["met"]]
        lines.append(
            [
                f"{t['workload']} {t['metric']}",
                *(_fmt(t["values"].get(s)) for s in servers),
                f"{ratio:.2f}x" if ratio is not None else "-",
                t["target"],
                met,
            ]
        )
    if markdown:
        out = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out) + "\n"


# -- several runs -----------------------------------------------------------------------


def _params(d: dict) -> SimpleNamespace:
    return SimpleNamespace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def combine(docs: list[dict]) -> list[dict]:
    """One table from several runs' results.json documents: per row, every run's figure
    per server, every run's carelay/control ratio and whether each run met the target.

    Rows are evaluated again from each run's raw results, so runs recorded with older
    labels combine with newer ones.
    """
    merged: dict[tuple[str, str], dict] = {}
    for doc in docs:
        for t in evaluate(rows_for(_params(doc["params"])), doc["results"], doc["servers"]):
            m = merged.setdefault(
                (t["workload"], t["metric"]),
                {**t, "values": {}, "ratios": [], "met": []},
            )
            for s, v in t["values"].items():
                if v is not None:
                    m["values"].setdefault(s, []).append(v)
            m["ratios"].append(t["carelay_over_control"])
            if t["met"] is not None:
                m["met"].append(t["met"])
    order = {w: i for i, w in enumerate(WORKLOAD_ORDER)}
    return sorted(merged.values(), key=lambda t: order.get(t["workload"], len(order)))


def _range(vals: list[float], fmt=_fmt) -> str:
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}"


def ranges_text(table: list[dict], servers: list[str]) -> str:
    """Markdown: each figure's range over the runs per server, and the ratio's range."""
    head = ["workload / metric", *servers, "carelay/control", "target", "met (runs)"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for t in table:
        ratios = [r for r in t["ratios"] if r is not None]
        met = f"{sum(t['met'])} of {len(t['met'])}" if t["met"] else ""
        cells = [
            f"{t['workload']} {t['metric']}",
            *(_range(t["values"].get(s, [])) for s in servers),
            _range(ratios, lambda r: f"{r:.2f}") + ("x" if ratios else ""),
            t["target"],
            met,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def runs_text(dirs: list[Path], docs: list[dict]) -> str:
    """Markdown: each run with its date, commit and the load on the machine."""
    out = ["| run | finished | commit | workloads | load average before / after | other CPU |"]
    out.append("|---|---|---|---|---|---:|")
    for d, doc in zip(dirs, docs, strict=True):
        load = "{:.2f} / {:.2f}".format(doc["loadavg_before"][0], doc["loadavg_after"][0])
        commit = (doc["git"].get("commit") or "?")[:7]
        dirty = " (changed)" if doc["git"].get("carelay_source_changes") else ""
        cells = [d.name, doc["date"], commit + dirty, ",".join(doc["workloads"]), load]
        out.append("| " + " | ".join(cells) + f" | {doc.get('foreign_cpu_pct', 0):.0f}% |")
    return "\n".join(out) + "\n"


def foreign_ranges_text(docs: list[dict], servers: list[str]) -> str:
    """Markdown: the CPU other processes took during each workload, range over the runs."""
    per: dict[str, dict[str, list[float]]] = {}
    for doc in docs:
        for w, by_server in doc.get("extra", {}).get("foreign_cpu_pct", {}).items():
            for s, v in by_server.items():
                # A workload a server does not run (W7 on a CA server) took no time: the
                # busy ticks of /proc/stat over that moment say nothing.
                if doc.get("results", {}).get(w, {}).get(s, True):
                    per.setdefault(w, {}).setdefault(s, []).append(v)
    if not per:
        return ""
    order = {w: i for i, w in enumerate(WORKLOAD_ORDER)}
    return foreign_text(
        {
            w: {s: f"{_range(v, lambda x: f'{x:.0f}')}" for s, v in per[w].items()}
            for w in sorted(per, key=lambda w: order.get(w, len(order)))
        },
        servers,
    )


def main(argv=None) -> int:
    """``python -m bench.report DIR [DIR ...] --out DIR``: the table of ranges and the plots
    from several runs' results.json."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="output directories of bench runs")
    p.add_argument("--out", type=Path, required=True, help="where table.md and the plots go")
    args = p.parse_args(argv)
    docs = [json.loads((d / "results.json").read_text()) for d in args.runs]
    servers = [s for s in SERVER_ORDER if any(s in doc["servers"] for doc in docs)]
    table = combine(docs)
    text = ranges_text(table, servers) + "\n" + runs_text(args.runs, docs)
    foreign = foreign_ranges_text(docs, servers)
    if foreign:
        text += "\nCPU taken by other processes during each workload (% of all cores):\n\n"
        text += foreign
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text)
    for path in plots_module().draw(args.out, table, servers, docs):
        print(f"plot: {path}")
    return 0


# -- plots ------------------------------------------------------------------------------


def plots_module():
    from bench import plots as module

    return module


def plots(
    out: Path, table: list[dict], servers: list[str], extra: dict, params: dict
) -> list[Path]:
    """The plots of one run, from its table (``extra`` and ``params`` are the sections of
    its results.json)."""
    multi = [
        {
            **t,
            "values": {s: [v] for s, v in t["values"].items() if v is not None},
            "ratios": [t["carelay_over_control"]],
        }
        for t in table
    ]
    run = {"results": {t["workload"]: {} for t in table}, "extra": extra, "params": params}
    return plots_module().draw(out, multi, servers, [run])


if __name__ == "__main__":
    raise SystemExit(main())
