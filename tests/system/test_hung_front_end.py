"""A front-end that was hung (kill -STOP, a paused VM) longer than its shards wait for it.

The shards stop serving a front-end that sends nothing for PEER_SILENCE while another
keeps talking to them (the PVA front-end here): what they would publish to it waits in
their memory.  When it runs again, the first thing it sends
through its old connection is refused, and it reconnects and resyncs.  A client's put
that came in meanwhile is no fault of the client's: it waits for the new connection and
is applied, as a put waits for a restarting shard, and its client is told it succeeded.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from functools import partial

import pytest

from carelay.common.config import PUT_TIMEOUT
from tests.system.clients import connect, get, role_pid, write_status
from tests.system.conftest import wait_for
from tests.system.pva import PvaRelay, pva_context

#: What a shard logs when it stops serving a silent front-end (shard/server.py).
_DROPPED = "not even a PING"


def _hang(relay, pid: int) -> None:
    """Stop ``pid`` until the relay's one shard has stopped serving it."""
    mark = len(relay.log())
    os.kill(pid, signal.SIGSTOP)
    try:
        relay.wait_log(_DROPPED, timeout=30, start=mark)
    except BaseException:
        os.kill(pid, signal.SIGCONT)
        raise


@pytest.mark.slow
def test_a_ca_put_right_after_the_broker_hung_is_applied(make_relay, ca):
    relay = make_relay(shards=1, kind=PvaRelay)
    name = relay.name("hung", "f1")
    pv = connect(ca, name)
    assert write_status(pv, [1.5]).success
    egu = connect(ca, f"{name}.EGU")
    pid = role_pid(relay, "broker")
    _hang(relay, pid)
    mark = len(relay.log())
    os.kill(pid, signal.SIGCONT)
    # A field change first (the first request through the old connection), then a put.
    status = write_status(egu, "V")
    assert status.success, status
    status = write_status(pv, [2.5])
    assert status.success, status
    assert pv.read(timeout=5).data[0] == 2.5
    assert egu.read(timeout=5).data[0] == b"V"
    relay.wait_log("shard 0 in sync", start=mark)
    assert get(name) == 2.5
    assert f"refused {name}" not in relay.log()[mark:], relay.log()[mark:]


@pytest.mark.slow
def test_a_pva_put_right_after_the_pva_front_end_hung_is_applied(make_relay):
    relay = make_relay(shards=1, kind=PvaRelay)
    name = relay.name("hung", "f1")
    ctx = pva_context()
    try:
        ctx.put(name, 1.5, timeout=5)
        pid = role_pid(relay, "pva")
        _hang(relay, pid)
        mark = len(relay.log())
        os.kill(pid, signal.SIGCONT)
        # A value and a field change in one put: each part goes again.
        ctx.put(name, {"value": 2.5, "display.units": "V"}, timeout=10)  # raises if it fails
        got = ctx.get(name, timeout=5)
        assert got == 2.5 and got.raw["display.units"] == "V"
    finally:
        ctx.close()
    wait_for(lambda: get(name) == 2.5, what="CA to read the put")
    assert f"refused {name}" not in relay.log()[mark:], relay.log()[mark:]


@pytest.mark.slow
def test_plain_ca_puts_made_while_the_broker_hung_are_applied(make_relay, ca):
    """Puts without callback that go as requests (a creation, a field change) through the
    old connection: refused there, they go again through the new one, as their clients,
    told nothing by CA, expect."""
    relay = make_relay(shards=1, kind=PvaRelay)
    old = relay.name("hungold", "f1")
    new = relay.name("hungnew", "f1")
    assert write_status(connect(ca, old), [1.5]).success
    egu = connect(ca, f"{old}.EGU")
    made = connect(ca, new)  # provisional: its first put creates it
    pid = role_pid(relay, "broker")
    _hang(relay, pid)
    mark = len(relay.log())
    # Sent while the broker is stopped: it reads them first when it runs again.
    made.write([3.5], wait=False)
    egu.write("A", wait=False)
    os.kill(pid, signal.SIGCONT)
    relay.wait_log("shard 0 in sync", start=mark)
    wait_for(lambda: get(new) == 3.5, what=f"{new} to be created by its put")
    wait_for(lambda: egu.read(timeout=5).data[0] == b"A", what="the EGU put")
    assert f"refused {new}" not in relay.log()[mark:], relay.log()[mark:]


def _answered_while_stopped(relay, role: str, put):
    """``put`` (a put with callback, run on a thread of its own) reaches the relay's one
    shard, which is stopped; front-end ``role`` is stopped once the put has gone, the
    shard is let go to apply and answer it, in time, and ``role`` stays stopped past the
    put's deadline (the fault itself) before it is let go too.  What ``put`` returns."""
    shard, front = role_pid(relay, "shard 0"), role_pid(relay, role)
    os.kill(shard, signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            done = pool.submit(put)
            sent = time.monotonic()
            # A put with callback goes to its shard at once; nothing outside the
            # front-end shows that it went.
            time.sleep(1.0)
            os.kill(front, signal.SIGSTOP)
        finally:
            os.kill(shard, signal.SIGCONT)
        try:
            time.sleep(max(0.0, sent + PUT_TIMEOUT + 1.5 - time.monotonic()))
        finally:
            os.kill(front, signal.SIGCONT)
        return done.result(timeout=30)


@pytest.mark.slow
def test_a_put_its_shard_answered_while_the_broker_was_stopped_succeeds(make_relay, ca):
    """A put with callback reached its shard, which applied and answered it in time while
    the broker was stopped for longer than the put's timeout.  When the broker runs again,
    its loop and ZeroMQ's I/O thread start together, and the loop may look for the answer
    before the I/O thread has read it in: the put must not be failed for want of an
    answer that is there.  Told it failed, the client would count as not done a put that
    the relay kept (seen under ``bench.chaos``)."""
    relay = make_relay(shards=1)
    name = relay.name("answered", "f1")
    pv = connect(ca, name)
    assert write_status(pv, [1.0]).success
    mark = len(relay.log())
    put = partial(pv.write, [2.0], wait=True, timeout=PUT_TIMEOUT + 20)
    answer = _answered_while_stopped(relay, "broker", put).status
    assert answer.success, (answer, relay.log()[mark:])
    assert get(name) == 2.0
    assert "no answer from shard 0" not in relay.log()[mark:], relay.log()[mark:]


@pytest.mark.slow
def test_a_pva_put_its_shard_answered_while_the_pva_front_end_was_stopped_succeeds(make_relay):
    """The same through the PVA front-end, whose loop is its own: the answer that came
    while it was stopped past the put's deadline completes the put."""
    relay = make_relay(shards=1, kind=PvaRelay)
    name = relay.name("answered", "f1")
    ctx = pva_context()
    try:
        ctx.put(name, 1.0, timeout=5)
        mark = len(relay.log())
        # ctx.put raises the relay's refusal if it failed the put.
        _answered_while_stopped(relay, "pva", partial(ctx.put, name, 2.0, timeout=PUT_TIMEOUT + 20))
    finally:
        ctx.close()
    assert get(name) == 2.0
    assert "no answer from shard 0" not in relay.log()[mark:], relay.log()[mark:]
