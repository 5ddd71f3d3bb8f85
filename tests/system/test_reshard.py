"""Changing the shard count and starting again moves PVs to their new owners first."""

from __future__ import annotations

import subprocess

import epics
import pytest

from carelay.common.sharding import shard_for
from tests.system.clients import Context
from tests.system.conftest import wait_for


def read(ctx, name):
    """A fresh read through caproto (pyepics' channels from before the restart may take
    seconds to reconnect, which is not what this test is about)."""
    (pv,) = ctx.get_pvs(name, timeout=5)
    pv.wait_for_connection(timeout=10)
    return pv.read(timeout=5).data


@pytest.mark.parametrize("before, after", [(2, 3), (3, 2)])
def test_restart_with_another_shard_count_keeps_every_pv(make_relay, before, after):
    relay = make_relay(shards=before)
    names = [relay.name(f"rs{k}", "f1") for k in range(60)]
    pvs = [epics.PV(n, auto_monitor=False) for n in names]
    for pv in pvs:
        assert pv.wait_for_connection(timeout=10), pv.pvname
    for k, pv in enumerate(pvs):
        assert pv.put(float(k), wait=True, timeout=5) == 1
    assert epics.caput(names[0] + ".EGU", "mm", wait=True, timeout=5) == 1
    assert relay.stop() == 0

    relay.shards = after
    mark = len(relay.log())
    relay.start()
    moved = sum(1 for n in names if shard_for(n, before) != shard_for(n, after))
    assert moved > 0
    log = relay.log()[mark:]
    assert f"resharding to {after} shards moved" in log, log
    ctx = Context()
    try:
        for k, name in enumerate(names):
            assert read(ctx, name)[0] == float(k), name
        assert read(ctx, names[0] + ".EGU")[0] == b"mm"
        listed = read(ctx, relay.prefix + "pvlist").tobytes().decode().rstrip("\0").split(",")
        assert sorted(listed) == sorted(names)
    finally:
        ctx.disconnect()

    # carelay status --pv names the owner under the new count.
    r = subprocess.run(
        [*relay.argv("status"), "--pv", names[1]], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"shard {shard_for(names[1], after)} of {after} (stored)" in r.stdout
    wait_for(lambda: relay.status().returncode == 0, timeout=10, what="status 0")
