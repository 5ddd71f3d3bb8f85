"""A put whose failure the client was told is never applied later.

Each test makes a put with callback fail while its shard cannot answer (the shard
stopped, or the link to it broken), lets the shard go on, and checks that the
put never lands: not in the value served, not after a restart, and an append to
a buffer is not there twice when the client puts again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from carelay.common.sharding import shard_for
from tests.system.clients import Context
from tests.system.test_multihost import hosts, site  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def _write_ok(pv, value, timeout: float = 15) -> bool:
    """Whether a put with callback of ``value`` completed (caproto reports the failure)."""
    try:
        return pv.write(value, wait=True, timeout=timeout).status.success
    except TimeoutError:
        return False


def _shard_pid(relay, k: int) -> int:
    for pid in relay.children():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "shard" in argv and argv[argv.index("shard") + 1] == str(k):
            return pid
    raise AssertionError(f"no shard {k} process")


def _values(pv) -> list[float]:
    return list(pv.read(data_count=0).data)


def fail_while_stopped(relay, pv, value) -> None:
    """A put with callback of ``value`` while shard 0 is stopped (SIGSTOP), which the client
    is told failed; then the shard goes on, and is in sync again on return."""
    shard = _shard_pid(relay, 0)
    mark = len(relay.log())
    os.kill(shard, signal.SIGSTOP)
    try:
        assert not _write_ok(pv, value), "a put to a stopped shard completed"
    finally:
        os.kill(shard, signal.SIGCONT)
    relay.wait_log("shard 0 in sync", start=mark)


def test_a_put_failed_while_its_shard_was_stopped_is_never_applied(make_relay, ca):
    relay = make_relay(shards=1)
    name = relay.name("log", "F10")
    (pv,) = ca.get_pvs(name, timeout=5)
    assert _write_ok(pv, [1.0])
    fail_while_stopped(relay, pv, [2.0])
    # The client puts again, as one told of a failure does: the value is there once.
    assert _write_ok(pv, [2.0], timeout=5)
    assert _values(pv) == [1.0, 2.0]
    relay.stop()
    relay.start()
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.wait_for_connection(timeout=10)
    assert _values(pv) == [1.0, 2.0]


def test_a_put_in_flight_when_the_link_went_down_is_reported_as_it_went(make_relay, ca):
    relay = make_relay(shards=1)
    name = relay.name("log", "F10")
    (pv,) = ca.get_pvs(name, timeout=5)
    assert _write_ok(pv, [1.0])
    shard = _shard_pid(relay, 0)
    mark = len(relay.log())
    done = threading.Event()
    outcome = []

    def completed(response):
        outcome.append(response.status.success)
        done.set()

    os.kill(shard, signal.SIGSTOP)
    try:
        pv.write([2.0], wait=False, callback=completed, timeout=15)
        # Stopped past the heartbeats, not past the put's deadline: the link goes down
        # with the put in flight, and the shard goes on in time to apply it.
        relay.wait_log("shard 0 unreachable", start=mark)
    finally:
        os.kill(shard, signal.SIGCONT)
    assert done.wait(15), "the put never completed"
    relay.wait_log("shard 0 in sync", start=mark)
    # Whatever the client was told is what happened.
    assert _values(pv) == ([1.0, 2.0] if outcome[0] else [1.0])


def _name_on(prefix: str, shard: int) -> str:
    while True:
        name = f"{prefix}log{uuid.uuid4().hex[:6]}_F10"
        if shard_for(name, 2) == shard:
            return name


def _stall(hosts, on: bool) -> None:  # noqa: F811
    """Take the shard host's end of the link down (``on``) or up again.  The broker's end
    stays up, so its connections stay open and deliver what waited once it is mended."""
    r = subprocess.run(
        ["ip", "netns", "exec", hosts.ns, "ip", "link", "set", hosts.there,
         "down" if on else "up"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_a_put_failed_across_a_broken_link_is_never_applied(site):  # noqa: F811
    broker = site["broker"]
    name = _name_on(site["prefix"], 0)
    ctx = Context()
    try:
        (pv,) = ctx.get_pvs(name, timeout=5)
        pv.wait_for_connection(timeout=5)
        assert _write_ok(pv, [1.0])
        mark = len(broker.log())
        _stall(site["hosts"], True)
        try:
            # Sent while the link still counts as up: it waits in the broken connection.
            assert not _write_ok(pv, [2.0]), "a put across a broken link completed"
        finally:
            _stall(site["hosts"], False)
        broker.wait_log("shard 0 in sync", start=mark, timeout=30)
        assert _write_ok(pv, [2.0], timeout=5)
        np.testing.assert_array_equal(_values(pv), [1.0, 2.0])
    finally:
        ctx.disconnect()
