"""A shard whose wall clock is not the broker's, as on another host without NTP.

A put with callback carries an expiry in wall-clock time, after which the shard drops
it: the broker has failed it by then, and a put reported failed must never be applied.
The shard judges it by its own clock, so the broker says it in the shard's time, as
far off as the shard's PONGs show it to be.  Here the shards' ``time.time`` runs ahead
of the broker's, or behind it (a ``sitecustomize`` that only the shard processes act
on), on one host.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.system.conftest import wait_for
from tests.system.test_refused_puts import _values, _write_ok, fail_while_stopped

pytestmark = pytest.mark.slow

_SITE = """\
import os, sys, time

_skew = float(os.environ.get("CARELAY_TEST_SHARD_SKEW", "0"))
if _skew and "shard" in sys.argv[1:]:
    _time = time.time
    time.time = lambda: _time() + _skew
"""


@pytest.fixture
def skewed(tmp_path, monkeypatch, make_relay):
    """Start a relay whose shards' clocks are off by ``skew`` seconds."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITE)

    def start(skew: float, shards: int = 1, kind=None):
        path = os.environ.get("PYTHONPATH")
        monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{path}" if path else str(site))
        monkeypatch.setenv("CARELAY_TEST_SHARD_SKEW", str(skew))
        return make_relay(shards=shards, kind=kind)

    return start


def _shard_clock(relay, k: int) -> float:
    """How far shard ``k``'s clock is from ours: its last flush, as its status says."""
    status = relay.data_dir / "run" / f"shard-{k}.json"

    def flushed():
        try:
            return json.loads(status.read_text()).get("last_flush")
        except (OSError, ValueError):
            return None

    wait_for(flushed, 10, what=f"shard {k}'s status with a flush")
    return flushed() - time.time()


def _health(relay, ca, part: str):
    (pv,) = ca.get_pvs(f"{relay.prefix}relay:{part}", timeout=5)
    return pv


def test_a_shard_clock_ahead_of_the_brokers_takes_puts_and_shows_its_offset(skewed, ca):
    relay = skewed(30.0)
    name = relay.name("ahead", "F10")
    (pv,) = ca.get_pvs(name, timeout=5)
    # Its creation and the puts that follow: none dropped as expired.
    for k in range(5):
        assert _write_ok(pv, [float(k)], timeout=10), f"put {k} failed"
    assert _values(pv) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert 25.0 < _shard_clock(relay, 0) < 31.0
    assert "expired" not in relay.log()
    age = _health(relay, ca, "shard0:FLUSH_AGE").read(data_type="time")
    assert 0.0 <= age.data[0] < 5.0 and age.metadata.severity == 0
    # What it allows for, it shows: 30 s ahead, a MINOR HIGH alarm (the host keeps no time).
    offset = _health(relay, ca, "shard0:CLOCK_OFFSET")
    wait_for(lambda: 29.0 < offset.read().data[0] < 31.0, 10, what="an offset of 30 s")
    assert offset.read(data_type="time").metadata.severity == 1
    # And so does ``carelay status``, the relay still running.
    said = re.compile(r"shard 0: its clock is (29|30|31) s ahead of the front-ends'")
    wait_for(lambda: said.search(relay.status().stdout), 10, what="the offset in carelay status")
    assert relay.status().returncode == 0


def test_a_put_failed_while_a_shard_behind_was_stopped_is_never_applied(skewed, ca):
    # Behind by 3 s: past the expiry margin (1 s), within the put's deadline (5 s).
    relay = skewed(-3.0)
    name = relay.name("behind", "F10")
    (pv,) = ca.get_pvs(name, timeout=5)
    assert _write_ok(pv, [1.0])
    # Its last flush, read from its status: up to a flush period and a status write old
    # (-4.05 seen), on a clock 3 s behind.
    assert -5.5 < _shard_clock(relay, 0) < -2.0
    # The shard saves every second: its last flush is at most a second or so old, not 3 s
    # more (as read on the broker's clock).
    age = _health(relay, ca, "shard0:FLUSH_AGE")
    wait_for(lambda: age.read().data[0] < 2.5, 10, what="a flush age under 2.5 s")
    fail_while_stopped(relay, pv, [2.0])
    assert _values(pv) == [1.0], "a put reported failed was applied"
    assert _write_ok(pv, [2.0], timeout=5)
    assert _values(pv) == [1.0, 2.0]


def test_pva_puts_to_a_shard_ahead_of_the_front_ends_create_and_update(skewed):
    pytest.importorskip("p4p")
    from tests.system.pva import PvaRelay, with_context

    relay = skewed(30.0, kind=PvaRelay)
    name = relay.name("pvaahead", "f1")

    def puts(ctx):
        for k in range(3):
            ctx.put(name, float(k), wait=True, timeout=5)
        return ctx.get(name, timeout=5)

    assert with_context(puts) == 2.0
    assert 25.0 < _shard_clock(relay, 0) < 31.0
    assert "expired" not in relay.log()
