"""Smoke test of the benchmark suite: ``python -m bench --quick`` runs and reports numbers.

No timed assertions: the figures depend on the machine.  The suite chooses its
own free ports and sets its own EPICS environment for its servers and clients,
so it runs beside this session's relay without sharing its port.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.system


def run_bench(module: str, *args: str, timeout: float) -> str:
    """``python -m module args``, which must exit 0; its standard output."""
    # The inherited EPICS_CA_* variables (the harness's port) must not matter.
    env = {**os.environ, "EPICS_CA_SERVER_PORT": "5064", "EPICS_CAS_SERVER_PORT": "5064"}
    r = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def test_quick_bench_runs_and_reports_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "results"
    run_bench("bench", "--quick", "--out", str(out), timeout=240)
    doc = json.loads((out / "results.json").read_text())
    assert doc["workloads"] == ["W1", "W3"]
    assert doc["servers"] == ["carelay", "control"]
    assert not doc["errors"]
    for w in doc["workloads"]:
        for s in doc["servers"]:
            figures = doc["results"][w][s]
            assert figures and "error" not in figures, (w, s, figures)
            for key, value in figures.items():
                assert isinstance(value, int | float) and math.isfinite(value), (w, s, key, value)
                assert value >= 0, (w, s, key, value)
    assert doc["table"], "no table rows"
    assert (out / "w1.png").stat().st_size > 0
    assert (out / "w3.png").stat().st_size > 0
    # No server process of the bench outlives it.
    procs = doc["server_processes"]
    assert procs, "no server process recorded"
    for p in procs:
        try:
            alive = psutil.Process(p["pid"]).create_time() == p["create_time"]
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"server process {p['pid']} outlived the bench"


def thread_rows(stdout: str) -> dict:
    """{server: {thread: (CPU us per op, switches per op)}} of a per-thread cost tool's
    output (bench.callback_cost, bench.pva_cost, bench.shard_cost): a line per server,
    then its rows.  Each row's CPU in the kernel is part of its CPU (asserted here)."""
    rows: dict = {}
    server = None
    for line in stdout.splitlines():
        if not line.startswith(" "):
            server = line.split(":")[0]
            rows[server] = {}
        elif server is not None and line.split()[0] != "thread":
            thread, cpu, kernel, switches = line.rsplit(maxsplit=3)
            assert 0 <= float(kernel) <= float(cpu), line
            rows[server][thread.strip()] = (float(cpu), float(switches))
    return rows


def busy_shares(stdout: str) -> list[float]:
    """The share of the machine's cores busy during each server's puts, as a per-thread
    cost tool's line for that server says it."""
    return [float(m) for m in re.findall(r"cores (\d+) % busy", stdout)]


def test_callback_cost_runs_and_reports_every_thread_kind():
    stdout = run_bench("bench.callback_cost", "--n", "30", timeout=180)
    rows = thread_rows(stdout)
    assert set(rows) == {"carelay", "control"}, stdout
    # carelay's round trip goes through the broker's and the shard's main threads and
    # ZeroMQ's I/O threads; the control has a main thread.
    for kind in ("broker main", "broker ZeroMQ I/O", "shard0 main", "shard0 ZeroMQ I/O"):
        assert kind in rows["carelay"], stdout
    assert "control main" in rows["control"], stdout
    shares = busy_shares(stdout)
    assert len(shares) == 2 and all(0 <= b <= 100 for b in shares), stdout
    for server, kinds in rows.items():
        for kind, (cpu, switches) in kinds.items():
            assert math.isfinite(cpu) and cpu >= 0 and switches >= 0, (server, kind)


def test_the_soak_runs_its_cycles_and_reports_each_process():
    """``python -m bench.soak`` (on demand, for minutes): three cycles here, each one's
    PVs made and deleted, and the growth of every process of the relay reported."""
    out = run_bench("bench.soak", "--cycles", "3", "--every", "1", timeout=120)
    assert "3 cycles, 0 failed" in out, out
    for role in ("broker", "shard0", "shard1", "supervisor"):
        assert f"  {role} " in out, out
    assert out.count("per 1,000 cycles") == 4, out


def test_a_slope_is_the_least_squares_one():
    from bench.soak import slope

    assert slope([(0, 10), (1, 12), (2, 14)]) == 2.0
    assert slope([(0, 5)]) == 0.0 and slope([(1, 5), (1, 7)]) == 0.0


def test_the_creation_race_reports_what_two_brokers_made():
    """``python -m bench.creation_race``: one run, small, and the PVs stored printed
    against max_pvs (tests/system/test_two_brokers.py holds the relay to its bound)."""
    out = run_bench(
        "bench.creation_race", "--max-pvs", "20", "--each", "30", "--runs", "1", timeout=120
    )
    m = re.search(r"run 1: (\d+) PVs stored, max_pvs 20 \(([+-]\d+)\)", out)
    assert m is not None, out
    assert int(m[1]) - 20 == int(m[2]) and 0 < int(m[1]) <= 60, out


@pytest.mark.slow
def test_chaos_finds_every_promise_kept_under_faults():
    """``python -m bench.chaos`` (on demand, for minutes): three faults here, front-ends
    killed or hung and shards hung while three writers put, and every PV then read the
    same through every door and within what its writer was told."""
    pytest.importorskip("p4p")
    out = run_bench("bench.chaos", "--faults", "3", "--seed", "7", timeout=240)
    assert "3 faults, 12 PVs, 0 broken promises" in out, out
    assert out.count("fault ") == 3 and out.count("  chaos") == 12, out


def test_the_chaos_verdict_names_each_broken_promise():
    from bench.chaos import BUFFER, Tally, verdict

    tally = Tally(ok=10, tried=12, refused={11})
    assert verdict("a", tally, [(10.0,)] * 3) is None
    assert verdict("a", tally, [(12.0,)] * 3) is None  # timed out, yet applied
    assert "succeeded" in verdict("a", tally, [(9.0,)] * 3)
    assert "said failed" in verdict("a", tally, [(11.0,)] * 3)
    assert "above the last put" in verdict("a", tally, [(13.0,)] * 3)
    assert "different values" in verdict("a", tally, [(10.0,), (12.0,), (10.0,)])
    assert "serves no value" in verdict("a", tally, [(10.0,), None, (10.0,)])
    assert "never put" in verdict("a", tally, [(10.5,)] * 3)
    # Every door shows the shard's stamp of the value (each client's float of it).
    same = [1000.0000001, 1000.0000004, 1000.0]
    assert verdict("a", tally, [(10.0,)] * 3, stamps=same) is None
    assert "time stamps" in verdict("a", tally, [(10.0,)] * 3, stamps=[1000.0, 1000.001, 1000.0])
    assert "time stamps" in verdict("a", tally, [(10.0,)] * 3, stamps=[1000.0, None, 1000.0])
    assert verdict("a", tally, [(10.0,)] * 3, severities=[0, 0, 0]) is None
    assert "severities" in verdict("a", tally, [(10.0,)] * 3, severities=[0, 3, 0])
    # A shard killed: what it applied since its last flush may be gone.
    assert verdict("a", tally, [(9.0,)] * 3, kept=False) is None
    assert "said failed" in verdict("a", tally, [(11.0,)] * 3, kept=False)
    # A buffer keeps every acknowledged append, once, in order.
    appended = Tally(ok=20, tried=25, refused={15}, acked=[5, 10, 20])
    assert verdict("b", appended, [(5.0, 10.0, 20.0, 25.0)] * 3, buffer=True) is None
    assert "lost 1" in verdict("b", appended, [(5.0, 20.0)] * 3, buffer=True)
    assert verdict("b", appended, [(5.0, 20.0)] * 3, kept=False, buffer=True) is None
    assert "twice" in verdict("b", appended, [(5.0, 10.0, 10.0, 20.0)] * 3, buffer=True)
    # A client that sends a put again after a reconnect (pvxs): an acknowledged append
    # may be there twice, next to itself; never out of order, nor one not acknowledged.
    twice = [(5.0, 10.0, 10.0, 20.0)] * 3
    assert verdict("b", appended, twice, buffer=True, resent=True) is None
    assert "twice" in verdict("b", appended, [(5.0, 25.0, 25.0)] * 3, buffer=True, resent=True)
    assert "order" in verdict("b", appended, [(10.0, 5.0, 20.0)] * 3, buffer=True, resent=True)
    assert "said failed" in verdict("b", appended, [(5.0, 10.0, 15.0, 20.0)] * 3, buffer=True)
    full = Tally(ok=BUFFER + 1, tried=BUFFER + 1, acked=list(range(1, BUFFER + 2)))
    kept = tuple(float(v) for v in range(2, BUFFER + 2))  # the first one let go
    assert verdict("c", full, [kept] * 3, buffer=True) is None
