"""Smoke test of the bench's W7 (cross-protocol latency) and W8 (PVA puts/s) at a tiny
size: ``python -m bench --quick --only W7,W8 --servers carelay,control``.

No timed assertions: the figures depend on the machine.  It checks that W7 runs both
ways on carelay and PVA to PVA on the PVA control (a p4p server), that W8 runs on both,
that every figure is a number, that monitors of the other protocol saw the puts, and
that no server process outlives the bench.
"""

from __future__ import annotations

import json
import math

import psutil
import pytest

from tests.system.test_bench_smoke import run_bench

pytestmark = pytest.mark.system
pytest.importorskip("p4p")


def test_w7_w8_quick_report_both_directions_and_the_pva_control(tmp_path):
    out = tmp_path / "results"
    run_bench("bench", "--quick", "--only", "W7,W8", "--servers", "carelay,control",
              "--out", str(out), timeout=300)  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    assert doc["workloads"] == ["W7", "W8"]
    assert not doc["errors"], doc["errors"]
    w7 = doc["results"]["W7"]
    # The control runs the PVA-to-PVA path, in the pva_to_ca column.
    assert set(w7["control"]) == {k for k in w7["carelay"] if k.endswith("_pva_to_ca")}
    assert w7["control"]["p99_ms_pva_to_ca"] > 0
    for way in ("ca_to_pva", "pva_to_ca"):
        for key in ("p50_ms", "p99_ms", "max_ms", "writer_puts_per_s"):
            value = w7["carelay"][f"{key}_{way}"]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, way)
        # The monitors of the other protocol saw puts (they may be coalesced, not lost).
        assert 0 < w7["carelay"][f"events_received_pct_{way}"] <= 100, way
    for server in ("carelay", "control"):
        figures = doc["results"]["W8"][server]
        assert figures["puts_per_s"] > 0, server
        assert math.isfinite(figures["cpu_us_per_put"]) and figures["cpu_us_per_put"] >= 0
        # The p4p clients' own CPU, which shares the cores with the server: a put costs
        # them something.
        assert 0 < figures["client_cpu_us_per_put"] < 1e6, server
    roles = doc["extra"]["cpu_seconds_by_process"]
    assert "pva" in roles["carelay"]["W8"], roles["carelay"]["W8"]
    assert set(roles["control"]["W8"]) == {"control"}
    puts = [t for t in doc["table"] if t["key"] == "puts_per_s"]
    assert puts and puts[0]["carelay_over_control"] > 0 and puts[0]["target"] == ">= 0.8x"
    for p in doc["server_processes"]:
        try:
            alive = psutil.Process(p["pid"]).create_time() == p["create_time"]
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"bench server process {p['pid']} survived"
