"""The relay's own health PVs, ``<prefix>relay:...``, read with real CA clients."""

from __future__ import annotations

import os
import signal

import pytest
from caproto import ChannelType

from tests.system.conftest import wait_for
from tests.system.test_status_truth import shard_pid

pytestmark = pytest.mark.system


def _get(ca, relay, part: str, **kw):
    (pv,) = ca.get_pvs(f"{relay.prefix}relay:{part}", timeout=5)
    pv.wait_for_connection(timeout=10)
    return pv.read(timeout=5, **kw)


def _value(ca, relay, part: str):
    data = _get(ca, relay, part).data
    return data[0]


def _text(ca, relay, part: str) -> str:
    data = _get(ca, relay, part, data_count=0).data
    return bytes(data).split(b"\0", 1)[0].decode()


def _put_ok(pv, value) -> bool:
    try:
        return pv.write(value, wait=True, timeout=10).status.success
    except Exception:
        return False


def test_every_health_pv_reads_with_its_desc(relay, ca):
    from carelay.broker.healthpvs import relay_metas

    metas = relay_metas(relay.shards, 1.0)
    names = [f"{relay.prefix}relay:{part}" for part in metas]
    pvs = ca.get_pvs(*names, timeout=5)
    for pv in pvs:
        pv.wait_for_connection(timeout=10)
        assert pv.read(timeout=5).status.success, pv.name
    desc = _get(ca, relay, "PUT_RATE.DESC").data[0].decode()
    assert desc == metas["PUT_RATE"].desc
    ctrl = _get(ca, relay, "MAX_BYTES_USED", data_type=ChannelType.CTRL_DOUBLE)
    assert ctrl.metadata.units == b"%"
    assert (ctrl.metadata.upper_warning_limit, ctrl.metadata.upper_alarm_limit) == (80.0, 95.0)
    assert _get(ca, relay, "VERSION").data[0].decode()


def test_health_pvs_say_their_name_and_record_type(relay, ca):
    """NAME, NAME$ and RTYP of a health PV, as of an IOC's record: it takes no puts, so
    it reads as an input record."""
    for part, rtyp in (("HEARTBEAT", "longin"), ("PUT_RATE", "ai"), ("VERSION", "stringin")):
        name = f"{relay.prefix}relay:{part}"
        assert _get(ca, relay, f"{part}.RTYP").data[0].decode() == rtyp
        assert _get(ca, relay, f"{part}.NAME").data[0].decode() == name
        assert _text(ca, relay, f"{part}.NAME$") == name
        assert _get(ca, relay, f"{part}.NAME$", data_count=0).data.shape == (len(name) + 1,)
        (pv,) = ca.get_pvs(f"{name}.RTYP", timeout=5)
        pv.wait_for_connection(timeout=10)
        assert not _put_ok(pv, "ao")


def test_heartbeat_moves(relay, ca):
    first = _value(ca, relay, "HEARTBEAT")
    wait_for(lambda: _value(ca, relay, "HEARTBEAT") >= first + 2, what="HEARTBEAT +2")


def test_counts_and_rates_move_with_real_puts(relay, ca):
    before = _value(ca, relay, "PV_CNT")
    names = [relay.name("h", "f1") for _ in range(5)]
    for pv in ca.get_pvs(*names, timeout=5):
        assert _put_ok(pv, 1.5)
    wait_for(lambda: _value(ca, relay, "PV_CNT") >= before + 5, what="PV_CNT +5")
    wait_for(lambda: _value(ca, relay, "CREATE_RATE_10S") > 0, what="CREATE_RATE_10S > 0")
    wait_for(lambda: _value(ca, relay, "PUT_RATE_10S") > 0, what="PUT_RATE_10S > 0")
    wait_for(
        lambda: (
            sum(_value(ca, relay, f"shard{k}:PV_CNT") for k in range(relay.shards)) >= before + 5
        ),
        what="the shards' PV_CNT",
    )


def test_a_refused_name_shows_in_last_error_and_errors(relay, ca):
    bad = f"{relay.prefix}no_type_here{os.getpid()}"
    (pv,) = ca.get_pvs(bad, timeout=2)
    with pytest.raises(TimeoutError):
        pv.wait_for_connection(timeout=1)

    def shown():
        last = _text(ca, relay, "LAST_ERROR")
        return bad in last and "does not follow" in last and bad in _text(ca, relay, "ERRORS")

    wait_for(shown, what="the refused name in LAST_ERROR and ERRORS")


def test_a_refused_put_names_its_client_and_reason(relay, ca):
    name = relay.name("prov", "f1")
    (pv,) = ca.get_pvs(f"{name}.DESC", timeout=5)
    pv.wait_for_connection(timeout=10)
    assert not _put_ok(pv, "a description"), "a field put to a provisional PV succeeded"

    def shown():
        last = _text(ca, relay, "LAST_ERROR")
        return last if name in last and "no put yet" in last else None

    last = wait_for(shown, what="the refused field put in LAST_ERROR")
    assert f"client {ca.client_name}@{ca.host_name}" in last


def test_monitors_post_only_on_change(relay, ca):
    (beat, count) = ca.get_pvs(
        f"{relay.prefix}relay:HEARTBEAT", f"{relay.prefix}relay:PV_CNT", timeout=5
    )
    beats, counts = [], []

    # Named: caproto keeps only weak references to its callbacks.
    def on_beat(sub, response):
        beats.append(response.data[0])

    def on_count(sub, response):
        counts.append(response.data[0])

    subs = [beat.subscribe(), count.subscribe()]
    subs[0].add_callback(on_beat)
    subs[1].add_callback(on_count)
    try:
        wait_for(lambda: len(beats) >= 4, what="four HEARTBEAT events")
        assert len(counts) == 1, f"PV_CNT posted {len(counts)} events without a change"
    finally:
        for sub in subs:
            sub.clear()


@pytest.mark.slow
def test_a_stopped_shard_is_not_answering_then_ok(make_relay, ca):
    relay = make_relay(shards=2)
    state = f"{relay.prefix}relay:shard1:STATE"
    (pv,) = ca.get_pvs(state, timeout=5)

    def reads(text: str):
        r = pv.read(data_type=ChannelType.TIME_ENUM, timeout=5)
        labels = pv.read(data_type=ChannelType.CTRL_ENUM, timeout=5).metadata.enum_strings
        return r if labels[r.data[0]] == text.encode() else None

    wait_for(lambda: reads("OK"), timeout=30, interval=0.2, what="shard1:STATE OK")
    pid = shard_pid(relay, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        r = wait_for(lambda: reads("NOT_ANSWERING"), timeout=30, interval=0.2, what="NOT_ANSWERING")
        assert r.metadata.severity >= 2, "NOT_ANSWERING without a MAJOR or INVALID severity"
        assert _value(ca, relay, "shard0:STATE") == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    r = wait_for(lambda: reads("OK"), timeout=30, interval=0.2, what="shard1:STATE OK again")
    assert r.metadata.severity == 0


@pytest.mark.slow
def test_an_unwritable_store_shows_store_failed_and_the_refused_put(make_relay, ca):
    from tests.system.clients import name_on_shard
    from tests.system.test_storage_faults import FAST, connect, limit_store, put_ok, unlimit

    relay = make_relay(shards=2, extra=FAST)
    name = name_on_shard(relay, 0, "sf")
    (pv,) = connect(ca, name)
    assert put_ok(pv, [1.0])
    (state,) = connect(ca, f"{relay.prefix}relay:shard0:STATE")

    def is_(value: int):
        r = state.read(data_type=ChannelType.TIME_ENUM, timeout=5)
        return r if r.data[0] == value else None

    pid = limit_store(relay, ca)
    pv.write([1.5], wait=False)  # a plain put: its flush fails
    try:
        r = wait_for(lambda: is_(3), what="shard0:STATE STORE_FAILED")
        assert r.metadata.severity == 2
        assert not put_ok(pv, [2.0])

        def shown():
            last = _text(ca, relay, "LAST_ERROR")
            return name in last and "cannot be written" in last

        wait_for(shown, what="the refused put and the store's error in LAST_ERROR")
    finally:
        unlimit(pid)
    wait_for(lambda: is_(0), timeout=30, what="shard0:STATE OK again")


@pytest.mark.slow
def test_a_shard_that_keeps_dying_is_failing(make_relay, ca):
    relay = make_relay(shards=2)
    (state,) = ca.get_pvs(f"{relay.prefix}relay:shard1:STATE", timeout=5)
    state.wait_for_connection(timeout=10)
    seen = []

    def on_state(sub, response):
        seen.append((response.data[0], response.metadata.severity))

    sub = state.subscribe(data_type=ChannelType.TIME_ENUM)
    sub.add_callback(on_state)
    try:
        for _ in range(4):
            mark = len(relay.log())
            os.kill(shard_pid(relay, 1), signal.SIGKILL)
            relay.wait_log("shard 1 in sync", start=mark)
        wait_for(lambda: (4, 3) in seen, what="shard1:STATE FAILING with INVALID severity")
        wait_for(lambda: seen[-1] == (0, 0), what="shard1:STATE OK again")
        wait_for(
            lambda: _value(ca, relay, "shard1:RESTART_CNT") == 4, what="shard1's 4 restarts counted"
        )
        assert _value(ca, relay, "shard0:RESTART_CNT") == 0
    finally:
        sub.clear()


def test_a_put_refused_again_and_again_leaves_the_log_and_errors_to_others(relay, ca):
    """A client that repeats a refused put fast (a delpv of no such PV, 200 times) is
    logged and entered in ERRORS once: another client's refusal stays in ERRORS, and every
    one of them is counted."""
    other = relay.name("keep", "f1")
    (pv,) = ca.get_pvs(f"{other}.DESC", timeout=5)
    pv.wait_for_connection(timeout=10)
    assert not _put_ok(pv, "no put yet")
    wait_for(lambda: other in _text(ca, relay, "ERRORS"), what="the first refusal in ERRORS")
    gone = relay.name("gone", "f1")
    (delpv,) = ca.get_pvs(f"{relay.prefix}delpv", timeout=5)
    delpv.wait_for_connection(timeout=10)
    start = len(relay.log())
    before = _value(ca, relay, "REFUSE_RATE")
    for _ in range(200):
        assert not delpv.write(gone.encode(), wait=True, timeout=10).status.success
    wait_for(lambda: gone in _text(ca, relay, "ERRORS"), what="the delpv refusal in ERRORS")
    errors = _text(ca, relay, "ERRORS").splitlines()
    assert any(other in line for line in errors), errors
    assert sum(gone in line for line in errors) == 1, errors
    assert relay.log()[start:].count(f"delpv {gone} failed") == 1
    wait_for(lambda: _value(ca, relay, "REFUSE_RATE") > before, what="the refusals counted")
