"""The benchmark report from several runs: ranges, targets and the plot options."""

import pytest

from bench import plots, report
from bench.workloads import FULL

SERVERS = ["carelay", "control", "softioc"]


def fake_run(scale: float) -> dict:
    """A results.json document with every figure of the full table, carelay ``scale``
    times the control's and softioc twice the control's."""
    results: dict = {}
    for row in report.rows_for(FULL):
        per = results.setdefault(row.workload, {})
        for i, s in enumerate(SERVERS):
            base = 100.0 if s == "control" else 100.0 * (scale if s == "carelay" else 2.0)
            per.setdefault(s, {})[row.key_for(s)] = base + i
    return {
        "params": FULL.as_dict(),
        "results": results,
        "servers": SERVERS,
        "extra": {},
    }


def test_combine_keeps_every_run_and_counts_targets_met():
    table = report.combine([fake_run(0.5), fake_run(1.5), fake_run(3.0)])
    w1 = next(t for t in table if t["key"] == "puts_per_s_2c")
    assert w1["values"]["carelay"] == [50.0, 150.0, 300.0]
    assert w1["met"] == [False, True, True]
    text = report.ranges_text(table, SERVERS)
    assert "| W1 puts/s, 2 clients | 50.0-300 | 101 |" in text
    assert "1 of 3" in text or "2 of 3" in text
    assert [t["workload"] for t in table][-1] == "W10"


def test_log_axis_only_where_values_span_decades():
    assert plots.wants_log([25.0, 1412.0])
    assert not plots.wants_log([0.5, 0.6])
    assert not plots.wants_log([0.0, 100.0])  # a zero cannot go on a log axis


def test_which_way_is_better_and_where_the_target_is():
    assert plots.better("cpu_us_per_put_2c") == "lower is better"
    assert plots.better("p99_ms") == "lower is better"
    assert plots.better("appends_per_s") == "higher is better"
    assert plots.better("monitor_events_per_append") == ""
    entry = {"target_spec": (">=", 10.0, "ratio"), "values": {"control": [20.0, 30.0, 25.0]}}
    assert plots.target_level(entry) == (250.0, "target >= 10x control")
    assert plots.target_level({"target_spec": ("<", 2.0, "abs"), "values": {}})[0] == 2.0


def test_draw_writes_one_plot_per_workload(tmp_path):
    pytest.importorskip("matplotlib")
    docs = [fake_run(0.5), fake_run(1.5), fake_run(3.0)]
    written = plots.draw(tmp_path, report.combine(docs), SERVERS, docs)
    names = sorted(p.name for p in written)
    assert names == [
        *("w1.png", "w10.png", "w2.png", "w3.png", "w4.png", "w5.png", "w6_scaling.png"),
        *("w7.png", "w8.png"),
    ]
