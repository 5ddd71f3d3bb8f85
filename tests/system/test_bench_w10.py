"""Smoke test of the bench's W10 (bursts of puts and gets, with monitors) at a tiny size.

No timed assertions: the figures depend on the machine.  The test checks that
every shape runs against carelay and the control, that each reports a time
per op and its carelay/control ratio, and that the monitors saw the puts.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.system.test_bench_smoke import run_bench

pytestmark = pytest.mark.system


def test_w10_quick_reports_every_shape_against_the_control(tmp_path):
    pytest.importorskip("psutil")
    out = tmp_path / "results"
    run_bench(
        "bench",
        "--quick",
        "--only",
        "W10",
        "--servers",
        "carelay,control",
        "--out",
        str(out),
        timeout=300,
    )
    doc = json.loads((out / "results.json").read_text())
    assert doc["workloads"] == ["W10"]
    assert not doc["errors"], doc["errors"]
    monitors = doc["params"]["w10_monitors"]
    assert 0 in monitors and max(monitors) > 0, monitors
    for server in ("carelay", "control"):
        figures = doc["results"]["W10"][server]
        for shape in ("onepv", "manypv"):
            for m in monitors:
                for op in ("put", "get"):
                    per_op = figures[f"{op}_us_per_op_{shape}_{m}mon"]
                    assert math.isfinite(per_op) and per_op > 0, (server, shape, m, op)
                    # CPU may read 0 at this size: the kernel counts it in ticks.
                    cpu = figures[f"{op}_cpu_us_per_op_{shape}_{m}mon"]
                    assert math.isfinite(cpu) and cpu >= 0, (server, shape, m, op)
                if m:
                    # Every monitor saw some of the puts (the server may coalesce events).
                    seen = figures[f"events_per_put_{shape}_{m}mon"]
                    assert 0 < seen <= 1.0 + 1e-9, (server, shape, m, seen)
    rows = [t for t in doc["table"] if t["workload"] == "W10"]
    timed = [t for t in rows if t["target"]]
    # One row with the 1.0x target per shape, monitor count and op, each with its ratio.
    assert len(timed) == 2 * len(monitors) * 2, [t["metric"] for t in rows]
    for t in timed:
        assert t["carelay_over_control"] is not None and t["carelay_over_control"] > 0, t
