"""A CA put with callback to a PV a PVA client holds completes once the PVA front-end
shows it, so a PVA get right after it reads the new value; a PVA front-end that hangs
delays CA puts by SHOWN_WAIT once, and a shard that restarts learns again which PVs the
PVA front-end watches.

CA puts go through caproto's client (a failed put raises); PVA reads through p4p.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from carelay.common.lifecycle import read_status, status_path
from tests.system.clients import put, role_pid
from tests.system.conftest import wait_for
from tests.system.pva import PvaRelay, pva_context

pytest.importorskip("p4p")


@pytest.fixture
def pva_relay(make_relay):
    """A relay of the test's own, with PVA and one shard: the test stops its processes."""
    return make_relay(shards=1, kind=PvaRelay)


@contextlib.contextmanager
def _held_over_pva(relay, stem: str):
    """A PV made by a CA put of 0.0, read by a p4p client that keeps its channel (so
    the PVA front-end watches it): (its name, the client), closed on leaving."""
    name = relay.name(stem, "f1")
    put(name, 0.0)
    ctx = pva_context()
    try:
        assert ctx.get(name, timeout=5) == 0.0
        yield name, ctx
    finally:
        ctx.close()


def _stale_reads(pv, ctx, name: str, values) -> list:
    """CA put with callback each value, then a PVA get at once: the reads that missed."""
    stale = []
    for v in values:
        pv.write([v], wait=True, timeout=5)
        if (got := ctx.get(name, timeout=5)) != v:
            stale.append((v, float(got)))
    return stale


def test_a_hung_pva_front_end_delays_ca_puts_once_and_is_waited_for_again_after(pva_relay, ca):
    relay = pva_relay
    pid = role_pid(relay, "pva")
    with _held_over_pva(relay, "hang") as (name, ctx):
        (pv,) = ca.get_pvs(name)
        pv.wait_for_connection(timeout=5)
        assert _stale_reads(pv, ctx, name, [1.0, 2.0, 3.0]) == []
        offset = len(relay.log())
        os.kill(pid, signal.SIGSTOP)
        try:
            # Every CA put completes: the first after SHOWN_WAIT, the next at once.
            for v in (4.0, 5.0, 6.0):
                pv.write([v], wait=True, timeout=5)
            relay.wait_log("did not show a change within", start=offset)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: ctx.get(name, timeout=5) == 6.0, what="PVA to catch up")
        # Its answer to a CONFIRM ends the lag: reads right after puts are fresh again.
        pv.write([7.0], wait=True, timeout=5)
        relay.wait_log("a front-end caught up", start=offset)
        assert _stale_reads(pv, ctx, name, [float(k) for k in range(8, 28)]) == []


@pytest.mark.slow
def test_a_restarted_shard_learns_again_what_the_pva_front_end_watches(pva_relay, ca):
    relay = pva_relay
    with _held_over_pva(relay, "again") as (name, ctx):
        shard = role_pid(relay, "shard 0")
        offset = len(relay.log())
        os.kill(shard, signal.SIGKILL)
        relay.wait_log(" pva: shard 0 in sync", start=offset)
        relay.wait_log(" broker: shard 0 in sync", start=offset)
        (pv,) = ca.get_pvs(name)
        wait_for(lambda: pv.read(timeout=5).data[0] == 0.0, what="CA to serve it again")
        assert _stale_reads(pv, ctx, name, [float(k) for k in range(1, 101)]) == []


def _status(relay, role: str) -> dict:
    return read_status(status_path(relay.data_dir / "run", role)) or {}


def test_a_pv_no_pva_client_holds_is_no_longer_watched(pva_relay):
    """A PV read once over PVA (a pvget) does not make every later CA put with callback
    to it wait for the PVA front-end: its channel goes with its last client."""
    relay = pva_relay
    # The CA broker watches the PV too, while the CA client that made it holds it (pyepics
    # keeps its channels): the shard's count is of both front-ends' watches.
    with _held_over_pva(relay, "once") as (name, _):
        wait_for(lambda: _status(relay, "shard 0").get("watched") == 2, what="the watch")
        wait_for(lambda: _status(relay, "pva").get("channels") == 1, what="the channel")
        wait_for(lambda: _status(relay, "pva").get("followed") == 1, what="the follow")
    wait_for(lambda: _status(relay, "pva").get("channels") == 0, what="the channel to go")
    wait_for(lambda: _status(relay, "shard 0").get("watched") == 1, what="the watch to go")
    wait_for(lambda: _status(relay, "pva").get("followed") == 0, what="the follow to go")
    # A new client gets a new channel, with the PV as it stands now: the PVA front-end,
    # which no longer followed it, was not sent this put; the channel opens with the
    # shard's answer to its FOLLOW.
    put(name, 5.0)
    ctx = pva_context()
    try:
        assert ctx.get(name, timeout=5) == 5.0
    finally:
        ctx.close()
