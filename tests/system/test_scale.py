"""Scale: many PVs, a megabyte of text, a million-element buffer, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from pathlib import Path

import epics
import numpy as np

from tests.system.clients import get_array
from tests.system.conftest import CA_ENV, wait_for
from tests.system.test_processes import status_rows

MILLION = 1_000_000


def get(name, **kw):
    value = epics.caget(name, use_monitor=False, timeout=10, **kw)
    assert value is not None, f"caget {name} failed"
    return value


def status_pvs(relay) -> dict[str, int | None]:
    """PV count per shard from ``carelay status``: {"shard 0": 150, ...}."""
    rows = status_rows(relay)
    return {name: row["pvs"] for name, row in rows.items() if name.startswith("shard")}


def test_300_pvs_over_both_shards(make_relay):
    # Its own relay, for an exact count.
    relay = make_relay(shards=2)
    names = [relay.name(f"many{k}", "f1") for k in range(300)]
    values = {name: 1000.0 + k + k / 1000 for k, name in enumerate(names)}
    # Connect all first: libca searches for many channels at once, one by one it
    # takes about 25 ms per new name on the client side.
    pvs = {name: epics.PV(name, auto_monitor=False) for name in names}
    for name, pv in pvs.items():
        assert pv.wait_for_connection(timeout=10), name
    for name, value in values.items():
        assert pvs[name].put(value, wait=True, timeout=5) == 1, name
    for name, value in values.items():
        assert get(name) == value, name

    listed = get(relay.prefix + "pvlist", as_string=True).split(",")
    assert sorted(listed) == sorted(names)

    def counts():
        c = status_pvs(relay)
        ok = c.keys() == {"shard 0", "shard 1"} and None not in c.values()
        return c if ok and sum(c.values()) == 300 else None

    c = wait_for(counts, timeout=10, interval=0.2, what="status PV counts adding up to 300")
    assert c["shard 0"] > 0 and c["shard 1"] > 0, c


def test_million_char_text_round_trip(relay):
    # The relay got no EPICS_CA_MAX_ARRAY_BYTES (conftest removes it): the broker sets its own.
    for pid in relay.children():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"EPICS_CA_MAX_ARRAY_BYTES=") for e in environ), pid
    name = relay.name("bigtext", "c1000000")
    # pyepics sends a str to a char waveform as its characters plus a NUL.
    rng = np.random.default_rng(1)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 ", dtype=np.uint8)
    text = rng.choice(letters, MILLION - 1).tobytes().decode()
    assert epics.caput(name, text, wait=True, timeout=20) == 1
    assert get(name, as_string=True) == text
    raw = get(name)
    assert len(raw) == MILLION
    np.testing.assert_array_equal(raw[:-1], np.frombuffer(text.encode(), dtype=np.uint8))
    assert raw[-1] == 0

    # All one million bytes, no terminator, as a raw array.
    data = rng.integers(1, 256, MILLION, dtype=np.uint8)
    assert epics.caput(name, data, wait=True, timeout=20) == 1
    np.testing.assert_array_equal(get(name), data)

    # The same through caproto, the pure-Python client.
    from caproto import ChannelType

    from tests.system.clients import Context

    ctx = Context(timeout=10)
    try:
        (pv,) = ctx.get_pvs(name, timeout=10)
        resp = pv.read(data_type=ChannelType.CHAR, timeout=20)
        assert len(resp.data) == MILLION
        np.testing.assert_array_equal(np.asarray(resp.data, dtype=np.uint8), data)
        chars = np.frombuffer(text.encode() + b"\0", dtype=np.uint8)
        done = pv.write(chars, wait=True, timeout=20)
        assert done.status.name == "ECA_NORMAL", done.status
        resp = pv.read(data_type=ChannelType.CHAR, timeout=20)
        assert bytes(resp.data).split(b"\0", 1)[0].decode() == text
    finally:
        ctx.disconnect()
    assert get(name, as_string=True) == text


def test_million_element_buffer_keeps_the_newest(relay):
    name = relay.name("bigbuffer", "F1000000")
    chunk, appends = 1000, 1100
    pv = epics.PV(name, auto_monitor=False)
    assert pv.wait_for_connection(timeout=5)
    for k in range(appends):
        values = np.arange(k * chunk, (k + 1) * chunk, dtype=np.float64) * 0.5
        assert pv.put(values, wait=True, timeout=5) == 1, k
        if k == appends // 2:
            # Half full: everything so far, oldest first.
            got = get_array(name)
            np.testing.assert_array_equal(got, np.arange((k + 1) * chunk, dtype=np.float64) * 0.5)
    expected = np.arange((appends * chunk - MILLION), appends * chunk, dtype=np.float64) * 0.5
    got = get_array(name)
    assert len(got) == MILLION
    np.testing.assert_array_equal(got, expected)


def _writer(args):
    """One writer process: its own values, in order, to the shared buffer and scalar."""
    env, buffer, scalar, values = args
    # The session's CA environment, explicitly, before libca reads it.
    os.environ.update(env)
    import epics as ep

    codes = []
    for v in values:
        codes.append(ep.caput(buffer, [v], wait=True, timeout=10))
        codes.append(ep.caput(scalar, v, wait=True, timeout=10))
    ep.ca.finalize_libca()
    return codes


def test_concurrent_writers_to_one_pv(relay):
    buffer = relay.name("shared", "F2000")
    scalar = relay.name("shared", "f1")
    writers, puts = 4, 150
    values = [[w * 10_000.0 + i for i in range(puts)] for w in range(writers)]
    env = {k: os.environ[k] for k in CA_ENV}
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        jobs = [(env, buffer, scalar, v) for v in values]
        results = pool.map_async(_writer, jobs, chunksize=1).get(timeout=120)
    for w, codes in enumerate(results):
        assert codes == [1] * (2 * puts), f"writer {w}: {Counter(codes)}"

    got = get_array(buffer)
    assert len(got) == writers * puts
    assert Counter(got.tolist()) == Counter(v for vs in values for v in vs)
    for w, vs in enumerate(values):
        mine = [x for x in got.tolist() if w * 10_000 <= x < (w + 1) * 10_000]
        assert mine == vs, f"writer {w}'s values out of order"
    assert get(scalar) in {vs[-1] for vs in values}


def test_large_buffer_monitor_events_each_carry_a_whole_state(relay):
    """A large buffer's events may be fewer than its puts (coalesced), but each is the
    buffer as it stood after some put, in order, and the last is the final buffer."""
    from tests.system.clients import Context

    name = relay.name("coalesced", "F100000")
    chunk, puts = 1000, 150
    assert epics.caput(name, np.zeros(chunk), wait=True, timeout=10) == 1
    states = [np.zeros(chunk)]
    for k in range(1, puts + 1):
        states.append(np.concatenate([states[-1], np.full(chunk, float(k))])[-100_000:])
    lengths = {len(s): i for i, s in enumerate(states)}
    ctx = Context()
    seen = []
    try:
        (pv,) = ctx.get_pvs(name, timeout=5)
        pv.wait_for_connection(timeout=10)
        sub = pv.subscribe(data_count=0)

        def on_event(sub, response):  # caproto keeps only a weak reference: keep a name
            seen.append(np.array(response.data))

        sub.add_callback(on_event)
        wait_for(lambda: seen, what="the first event")
        for k in range(1, puts + 1):
            assert epics.caput(name, np.full(chunk, float(k)), wait=True, timeout=10) == 1
        wait_for(
            lambda: len(seen[-1]) == 100_000 and seen[-1][-1] == float(puts),
            timeout=20,
            what="an event with the final buffer",
        )
        order = []
        for event in seen:
            # Which put's state is this?  The last element names the put once full.
            k = int(event[-1]) if len(event) == 100_000 else lengths[len(event)]
            np.testing.assert_array_equal(event, states[k])
            order.append(k)
        assert order == sorted(order)
        sub.clear()
    finally:
        ctx.disconnect()
