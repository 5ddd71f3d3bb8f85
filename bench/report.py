"""The suite's output: the table, results.json and the PNG plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

SERVER_ORDER = ("carelay", "control", "softioc")


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
            Row("W1", f"puts/s, {n} clients", f"puts_per_s_{n}c", (">=", 1.0, "ratio")),
            Row(
                "W1",
                f"relay CPU-us per put, {n} clients",
                f"cpu_us_per_put_{n}c",
                ("<=", 1.5, "ratio"),
            ),
        ]
    rows += [
        Row("W2", "put-to-monitor latency p50 (ms)", "p50_ms"),
        Row("W2", "put-to-monitor latency p99 (ms)", "p99_ms", ("<", 2.0, "abs")),
        Row("W2", "put-to-monitor latency max (ms)", "max_ms"),
        Row("W2", "monitor events received (%)", "events_received_pct"),
        Row("W3", "appends/s (1000 elements, callback)", "appends_per_s", (">=", 10.0, "ratio")),
        Row("W3", "relay CPU-ms per append", "cpu_ms_per_append"),
        Row("W3", "monitor events per append", "monitor_events_per_append"),
        Row("W3", "appends/s without a monitor (supplementary)", "appends_per_s_no_monitor"),
        Row("W3", "relay CPU-ms per append without a monitor", "cpu_ms_per_append_no_monitor"),
        Row("W4", f"put MB/s ({params.w4_readers} readers)", "put_mb_per_s", (">=", 1.0, "ratio")),
        Row("W4", f"read MB/s ({params.w4_readers} readers, sum)", "read_mb_per_s"),
        Row("W4", "relay CPU-ms per put", "cpu_ms_per_put"),
        Row("W5", "creations/s", "creations_per_s"),
        Row("W5", "relay RSS MiB per 1000 PVs", "rss_mib_per_1000_pvs", ("<=", 1.5, "ratio")),
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
    rows += w10_rows(params)
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
    """Markdown table: CPU share of other processes during each workload, per server."""
    out = ["| workload | " + " | ".join(servers) + " |", "|---|" + "---:|" * len(servers)]
    for w, per in foreign.items():
        vals = [f"{per[s]:.0f}%" if s in per else "-" for s in servers]
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


# -- plots ------------------------------------------------------------------------------

_COLORS = {"carelay": "#1f77b4", "control": "#ff7f0e", "softioc": "#2ca02c"}


def plots(
    out: Path, table: list[dict], servers: list[str], extra: dict, params: dict
) -> list[Path]:
    """Bar charts per workload, the W2 latency CDF and the W6 scaling lines, from the
    figures as results.json holds them (``extra`` and ``params`` are its sections)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    by_w: dict[str, list[dict]] = {}
    for t in table:
        by_w.setdefault(t["workload"], []).append(t)
    for w, ts in by_w.items():
        if w == "W6":
            continue
        cols = min(4, len(ts))
        rows = -(-len(ts) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(ts) :]:
            ax.set_visible(False)
        for ax, t in zip(axes.flat, ts, strict=False):
            names = [s for s in servers if t["values"].get(s) is not None]
            vals = [t["values"][s] for s in names]
            ax.bar(names, vals, color=[_COLORS.get(s, "grey") for s in names])
            ax.set_title(t["metric"], fontsize=8)
            ax.tick_params(labelsize=8)
            for i, v in enumerate(vals):
                ax.annotate(_fmt(v), (i, v), ha="center", va="bottom", fontsize=7)
        fig.suptitle(w)
        fig.tight_layout()
        path = out / f"{w.lower()}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    lat = extra.get("w2_latency_ms_percentiles")
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        qs = [q / 100 for q in lat["percentiles"]]
        curves = {s: lat[s] for s in servers if lat.get(s)}
        for s, x in curves.items():
            ax.plot(x, qs, label=s, color=_COLORS.get(s))
        ax.set_xscale("log")
        ticks = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
        lo = min(x[0] for x in curves.values())
        hi = max(x[-1] for x in curves.values())
        ax.set_xticks([t for t in ticks if lo / 2 <= t <= hi * 2])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(2.0, color="red", ls=":", lw=1, label="2 ms (p99 target)")
        ax.axhline(0.99, color="grey", ls=":", lw=1)
        ax.set_xlabel("put-to-monitor latency (ms)")
        ax.set_ylabel("fraction of monitor events")
        ax.set_title(
            f"W2: 1 writer at {params['w2_rate']:g} Hz, {params['w2_monitors']} monitors",
            fontsize=9,
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "w2_latency_cdf.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    w6 = [t for t in by_w.get("W6", []) if t["key"] == "appends_per_s"]
    if w6:
        fig, ax = plt.subplots(figsize=(6, 4))
        shards = list(params["w6_shards"])
        ys = [t["values"].get("carelay") for t in w6]
        if any(y is not None for y in ys):
            ax.plot(shards, ys, "o-", label="carelay", color=_COLORS["carelay"])
        for s in servers:
            if s != "carelay" and w6[0]["values"].get(s) is not None:
                ax.axhline(
                    w6[0]["values"][s], ls="--", color=_COLORS.get(s), label=f"{s} (one process)"
                )
        ax.set_xticks(shards)
        ax.set_xlabel("carelay shards")
        ax.set_ylabel("appends/s (sum over buffers)")
        ax.set_title(
            f"W6: {params['w6_buffers']} buffers of {params['w3_count']:,}, "
            f"{params['w3_chunk']}-element appends",
            fontsize=9,
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "w6_scaling.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
