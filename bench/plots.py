"""The suite's PNG plots, from the figures of one run or of several.

Every panel shows each run as a point, the median as a bar and the range as an error
bar; panels say which way is better and draw the target where there is one.  The input
is the multi-run table of ``report.combine``: ``values`` maps a server to its figures,
one per run.
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

COLORS = {"carelay": "#1f77b4", "control": "#ff7f0e", "softioc": "#2ca02c"}
#: Values whose largest is this many times their smallest get a log axis.
LOG_SPAN = 20.0
#: Figures for which less is better; those not listed here or in HIGHER_IS_BETTER get
#: no such label.
LOWER_IS_BETTER = ("cpu", "_ms", "rss", "us_per_op")
HIGHER_IS_BETTER = ("per_s", "events_received")
#: Figures the per-workload charts leave out (key prefixes): drawn elsewhere, the same
#: everywhere, or the set rate of a writer.
NOT_CHARTED = ("events_received_pct", "writer_puts_per_s")

#: Characters of a panel title per line.
_TITLE_WIDTH = 44


def better(key: str) -> str:
    """ "lower is better", "higher is better" or "" for a figure's key."""
    if key.startswith("monitor_events") or key.startswith("events_per"):
        return ""
    if any(k in key for k in LOWER_IS_BETTER):
        return "lower is better"
    if any(k in key for k in HIGHER_IS_BETTER):
        return "higher is better"
    return ""


def wants_log(values: list[float]) -> bool:
    """Whether figures this far apart need a log axis (all positive, spanning decades)."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2 or min(vals) <= 0:
        return False
    return max(vals) / min(vals) >= LOG_SPAN


def target_level(entry: dict) -> tuple[float, str] | None:
    """Where an entry's target lies on its own axis, and its label, or None."""
    t = entry.get("target_spec")
    if not t:
        return None
    op, limit, of = t
    if of == "abs":
        return limit, f"target {op} {limit:g}"
    control = entry["values"].get("control") or []
    if not control:
        return None
    return limit * statistics.median(control), f"target {op} {limit:g}x control"


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _panel(ax, entry: dict, servers: list[str]) -> None:
    names = [s for s in servers if entry["values"].get(s)]
    all_vals = [v for s in names for v in entry["values"][s]]
    for i, s in enumerate(names):
        vals = entry["values"][s]
        med = statistics.median(vals)
        lo, hi = min(vals), max(vals)
        color = COLORS.get(s, "grey")
        ax.bar(i, med, color=color, alpha=0.45, width=0.6)
        ax.errorbar(i, med, yerr=[[med - lo], [hi - med]], color="black", capsize=4, lw=1)
        ax.plot([i] * len(vals), vals, "o", color=color, mec="black", ms=4, zorder=3)
        ax.annotate(_fmt(med), (i, hi), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    level = target_level(entry)
    if level is not None:
        ax.axhline(level[0], color="red", ls="--", lw=1, label=level[1])
        ax.legend(fontsize=6, loc="best")
        all_vals.append(level[0])
    if wants_log(all_vals):
        _log_y(ax)
        ax.set_ylabel("log scale", fontsize=7)
    else:
        ax.set_ylim(bottom=0)
    note = better(entry["key"])
    # A long name wraps rather than running into the next panel's.
    title = textwrap.fill(entry["metric"], _TITLE_WIDTH)
    ax.set_title(title + (f"\n({note})" if note else ""), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def _log_y(ax) -> None:
    import matplotlib.ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    written.append(path)


def draw(out: Path, table: list[dict], servers: list[str], runs: list[dict]) -> list[Path]:
    """Every plot of a multi-run table; ``runs`` are the runs' results.json documents
    (for the W2 latency curves and the workloads' parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    by_w: dict[str, list[dict]] = {}
    for t in table:
        by_w.setdefault(t["workload"], []).append(t)
    for w, entries in by_w.items():
        if w in ("W6", "W9", "W10"):  # W9: a table of its own, two runs of one server
            continue
        entries = [e for e in entries if not e["key"].startswith(NOT_CHARTED)]
        if not entries:
            continue
        fig, axes = plt.subplots(1, len(entries), figsize=(2.9 * len(entries), 3.4))
        for ax, e in zip(getattr(axes, "flat", [axes]), entries, strict=True):
            _panel(ax, e, servers)
        n = len(runs_with(runs, w))
        what = "runs: points; bar: median; range" if n > 1 else "run"
        fig.suptitle(f"{w} ({n} {what})", fontsize=10)
        _save(fig, out / f"{w.lower()}.png", written)
        plt.close(fig)
    _w2_cdf(plt, out, servers, runs, written)
    if by_w.get("W6"):
        _w6(plt, out, by_w["W6"], servers, runs, written)
    if by_w.get("W10"):
        _w10(plt, out, by_w["W10"], runs, written)
    return written


def runs_with(runs: list[dict], workload: str) -> list[dict]:
    return [r for r in runs if workload in r.get("results", {})]


def _w2_cdf(plt, out: Path, servers, runs, written) -> None:
    import matplotlib.ticker

    curves = []
    for r in runs_with(runs, "W2"):
        lat = r.get("extra", {}).get("w2_latency_ms_percentiles")
        if lat:
            qs = [q / 100 for q in lat["percentiles"]]
            curves += [(s, lat[s], qs) for s in servers if lat.get(s)]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for s, x, qs in curves:
        ax.plot(x, qs, color=COLORS.get(s), lw=1, label=None if s in seen else s)
        seen.add(s)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.axvline(2.0, color="red", ls="--", lw=1, label="2 ms (p99 target)")
    ax.axhline(0.99, color="grey", ls=":", lw=1, label="p99")
    ax.set_xlabel("put-to-monitor latency (ms, log; left is better)")
    ax.set_ylabel("fraction of monitor events")
    p = runs_with(runs, "W2")[0]["params"]
    ax.set_title(
        f"W2: 1 writer at {p['w2_rate']:g} Hz, {p['w2_monitors']} monitors; "
        f"one line per run ({len(runs_with(runs, 'W2'))} runs)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out / "w2_latency_cdf.png", written)
    plt.close(fig)


def _w6(plt, out: Path, entries, servers, runs, written) -> None:
    w6 = [e for e in entries if e["key"] == "appends_per_s"]
    p = runs_with(runs, "W6")[0]["params"]
    shards = list(p["w6_shards"])
    if len(w6) != len(shards):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    meds = []
    for s, e in zip(shards, w6, strict=True):
        vals = e["values"].get("carelay") or []
        ax.plot([s] * len(vals), vals, "o", color=COLORS["carelay"], mec="black", ms=4)
        meds.append(statistics.median(vals) if vals else None)
    ax.plot(shards, meds, "-", color=COLORS["carelay"], label="carelay (median, runs as points)")
    for srv in servers:
        vals = w6[0]["values"].get(srv) if srv != "carelay" else None
        if vals:
            ax.axhspan(min(vals), max(vals), color=COLORS.get(srv), alpha=0.3)
            ax.axhline(statistics.median(vals), ls="--", color=COLORS.get(srv), label=srv)
    _log_y(ax)
    ax.set_xticks(shards)
    ax.set_xlabel("carelay shards")
    ax.set_ylabel("appends/s, sum over buffers (log; higher is better)")
    ax.set_title(
        f"W6: {p['w6_buffers']} buffers of {p['w3_count']:,}, {p['w3_chunk']}-element "
        f"appends; {len(runs_with(runs, 'W6'))} runs\n(bands: range of the one-process servers)",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, out / "w6_scaling.png", written)
    plt.close(fig)


def _w10(plt, out: Path, entries, runs, written) -> None:
    """W10 in four panels: put and get time per op per shape, and carelay/control of the
    time and of the relay CPU per op."""
    by_key = {e["key"]: e for e in entries}
    p = runs_with(runs, "W10")[0]["params"]
    shapes = [
        (shape, m, f"{'1 PV' if shape == 'onepv' else 'n PVs'}\n{m} mon")
        for shape in ("onepv", "manypv")
        for m in p["w10_monitors"]
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, op in zip(axes[:2], ("put", "get"), strict=True):
        seen = []
        for j, srv in enumerate(("carelay", "control")):
            for i, (shape, m, _) in enumerate(shapes):
                vals = by_key.get(f"{op}_us_per_op_{shape}_{m}mon", {}).get("values", {})
                vals = vals.get(srv) or []
                if not vals:
                    continue
                x = i + (j - 0.5) * 0.38
                med = statistics.median(vals)
                ax.bar(
                    x, med, width=0.38, color=COLORS[srv], alpha=0.45, label=srv if i == 0 else None
                )
                ax.plot([x] * len(vals), vals, "o", color=COLORS[srv], mec="black", ms=3)
                seen += vals
        ax.set_xticks(range(len(shapes)), [s[2] for s in shapes], fontsize=7)
        if wants_log(seen):
            _log_y(ax)
            ax.set_ylabel("us per op (log)", fontsize=8)
        else:
            ax.set_ylabel("us per op", fontsize=8)
        ax.set_title(f"bursts of 1000 {op}s: time per {op} (lower is better)", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3, which="both")
    for ax, (what, infix) in zip(axes[2:], (("time", "us"), ("relay CPU", "cpu_us")), strict=True):
        for k, op in enumerate(("put", "get")):
            for i, (shape, m, _) in enumerate(shapes):
                e = by_key.get(f"{op}_{infix}_per_op_{shape}_{m}mon")
                ratios = [r for r in (e or {}).get("ratios", []) if r is not None]
                ax.plot(
                    [i + (k - 0.5) * 0.3] * len(ratios),
                    ratios,
                    "o" if op == "put" else "s",
                    color="C2" if op == "put" else "C4",
                    mec="black",
                    ms=4,
                    ls="",
                    label=op if i == 0 else None,
                )
        ax.axhline(
            1.0, color="red", ls="--", lw=1, label="target <= 1x" if what == "time" else "1x"
        )
        ax.set_xticks(range(len(shapes)), [s[2] for s in shapes], fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(f"carelay / control, {what} per op, each run (lower is better)", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"W10: one client, one circuit; 1 PV x {p['w10_channels']} channels, or n = "
        f"{p['w10_channels']} PVs; {len(runs_with(runs, 'W10'))} runs",
        fontsize=10,
    )
    _save(fig, out / "w10.png", written)
    plt.close(fig)
