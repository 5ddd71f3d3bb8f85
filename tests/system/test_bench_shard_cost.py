"""Smoke test of ``python -m bench.shard_cost`` at a tiny size: it runs the real shard
and the echo floor and names the threads a put crosses in each.  No timed assertions:
the figures depend on the machine."""

from __future__ import annotations

import math

import pytest

from tests.system.test_bench_smoke import run_bench, thread_rows

pytestmark = pytest.mark.system


def test_shard_cost_names_the_threads_a_put_crosses():
    stdout = run_bench("bench.shard_cost", "--n", "300", timeout=120)
    ratio = [line for line in stdout.splitlines() if line.startswith("shard / echo")]
    rows = thread_rows("\n".join(line for line in stdout.splitlines() if line not in ratio))
    assert set(rows) == {"shard", "echo"}, stdout
    for server, threads in rows.items():
        assert f"{server} main" in threads and "all" in threads, stdout
        for thread, (cpu, switches) in threads.items():
            assert math.isfinite(cpu) and cpu >= 0 and switches >= 0, (server, thread)
    assert len(ratio) == 1, stdout
