"""Smoke test of ``python -m bench.pva_cost`` at a tiny size: it runs against carelay
with PVA, the PVA floor and the PVA control and names the threads a PVA put crosses.  No timed
assertions: the figures depend on the machine."""

from __future__ import annotations

import math
import re

import pytest

from tests.system.test_bench_smoke import busy_shares, run_bench, thread_rows

pytestmark = pytest.mark.system
pytest.importorskip("p4p")


def test_pva_cost_names_the_threads_a_pva_put_crosses():
    stdout = run_bench("bench.pva_cost", "--n", "30", "--clients", "1", timeout=240)
    rows = thread_rows(stdout)
    assert set(rows) == {"carelay", "floor", "control"}, stdout
    # p4p's network thread, the front-end's loop, a shard and the CA broker that mirrors.
    for thread in ("pva PVXTCP", "pva main", "broker main", "all"):
        assert thread in rows["carelay"], stdout
    assert any(t.startswith("shard") for t in rows["carelay"]), stdout
    assert "control PVXTCP" in rows["control"], stdout
    # The floor's front and the process that keeps its values.
    for thread in ("floor PVXTCP", "truth main", "all"):
        assert thread in rows["floor"], stdout
    for server, threads in rows.items():
        for thread, (cpu, switches) in threads.items():
            assert math.isfinite(cpu) and cpu >= 0 and switches >= 0, (server, thread)
    # How busy the cores were, for each of the three.
    shares = busy_shares(stdout)
    assert len(shares) == 3 and all(0 <= b <= 100 for b in shares), stdout
    # And what the p4p client spent on each put, beside each server.
    clients = [float(x) for x in re.findall(r"the clients ([0-9.]+) us of CPU per put", stdout)]
    assert len(clients) == 3 and all(0 < c < 1e6 for c in clients), stdout
