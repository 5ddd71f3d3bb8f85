"""Smoke test of W9 (two CA brokers against one): ``python -m bench --quick --only W9``.

No timed assertions: the figures depend on the machine.  It checks that both runs
happen (the second with two brokers, each a process of its own) and that every figure
is a number.
"""

from __future__ import annotations

import json
import math

from tests.system.test_bench_smoke import run_bench


def test_w9_runs_one_broker_then_two_and_reports_every_figure(tmp_path):
    out = tmp_path / "w9"
    run_bench("bench", "--quick", "--only", "W9", "--servers", "carelay", "--out", str(out),
              timeout=240)  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    assert not doc["errors"], doc["errors"]
    figures = doc["results"]["W9"]["carelay"]
    for b in ("1b", "2b"):
        for key in ("puts_per_s", "cpu_us_per_put", "broker_cpu_us_per_put"):
            value = figures[f"{key}_{b}"]
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (key, b)
        assert figures[f"puts_per_s_{b}"] > 0
    assert figures["speedup_2b"] > 0
    roles = doc["extra"]["cpu_seconds_by_process"]["carelay"]
    assert {"broker"} <= roles["W9-1b"].keys()
    assert "broker1" not in roles["W9-1b"]
    assert {"broker", "broker1"} <= roles["W9-2b"].keys()
    assert [t["workload"] for t in doc["table"]] == ["W9"] * 7
