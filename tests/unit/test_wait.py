"""The select hook's own parts (broker/wait.py), with real descriptors and ZeroMQ sockets
but no PCAS: the fd sets, the timeout arithmetic, the edge-trigger check, the fallback."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time

import pytest
import zmq

from carelay.broker.link import LinkState, ShardLink
from carelay.broker.wait import FdSet, SelectHook, fd_clear, fd_isset, fd_set, sleep_for, timeval
from carelay.common.config import FD_SETSIZE, HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS


def test_fd_set_bits():
    words = FdSet()
    for fd in (0, 63, 64, FD_SETSIZE - 1):
        assert not fd_isset(words, fd)
        fd_set(words, fd)
        assert fd_isset(words, fd)
    fd_clear(words, 64)
    assert not fd_isset(words, 64)
    assert fd_isset(words, 63) and fd_isset(words, 0)
    assert ctypes.sizeof(words) == FD_SETSIZE // 8


def test_timeout_arithmetic():
    assert timeval(1.25) == (1, 250_000)
    assert timeval(-0.5) == (0, 0)
    assert sleep_for(10.0, 10.4, 1.0) == pytest.approx(0.4)
    assert sleep_for(10.0, 9.0, 1.0) == 0.0  # overdue: no sleep
    assert sleep_for(10.0, 30.0, 1.0) == 1.0  # capped


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


@pytest.fixture
def pair():
    """A connected pair of ZeroMQ sockets (the shard's end, the broker's end)."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wait-test")
    b.connect("inproc://wait-test")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


@pytest.fixture
def ca_fds():
    """A socket pair standing for a CA circuit: (PCAS's end, the client's end)."""
    s, c = socket.socketpair()
    yield s, c
    s.close()
    c.close()


def _hook(socks, wake_fd=-1) -> SelectHook:
    hook = SelectHook(wake_fd)
    hook._installed = True  # as install() leaves it, without a GOT to point
    assert hook.watch(tuple(socks))
    return hook


def _select(hook, fds, seconds):
    """Call the hook as PCAS does: a read set of ``fds`` and a timeout; returns (count,
    the descriptors left in the set)."""
    rset = FdSet()
    for fd in fds:
        fd_set(rset, fd)
    sec, usec = timeval(seconds)
    tv = _Timeval(sec, usec)
    n = hook._select(max(fds) + 1, ctypes.addressof(rset), None, None, ctypes.addressof(tv))
    return n, [fd for fd in range(FD_SETSIZE) if fd_isset(rset, fd)]


def test_a_message_queued_before_the_wait_ends_it(pair, ca_fds):
    """Edge-triggered: a message already queued does not make the descriptor readable
    again, so the hook must look at ZMQ_EVENTS before it sleeps."""
    shard, broker = pair
    shard.send(b"answer")
    time.sleep(0.05)
    broker.getsockopt(zmq.EVENTS)  # what a poll elsewhere did: the edge is used up
    hook = _hook([broker])
    n, left = _select(hook, [ca_fds[0].fileno()], 5.0)
    assert hook.woken
    assert (n, left) == (0, [])
    assert broker.recv() == b"answer"


def test_a_message_during_the_wait_ends_it(pair, ca_fds):
    shard, broker = pair
    hook = _hook([broker])
    threading.Timer(0.1, shard.send, (b"answer",)).start()
    n, left = _select(hook, [ca_fds[0].fileno()], 5.0)
    assert hook.woken
    assert (n, left) == (0, []), "the hook's descriptors must not reach PCAS"


def test_ca_traffic_is_counted_and_left_in_the_set(pair, ca_fds):
    _, broker = pair
    pcas, client = ca_fds
    client.send(b"x")
    hook = _hook([broker])
    n, left = _select(hook, [pcas.fileno()], 5.0)
    assert (n, left) == (1, [pcas.fileno()])
    assert not hook.woken


def test_a_signal_pipe_ends_the_wait(pair, ca_fds):
    _, broker = pair
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        hook = _hook([broker], wake_fd=r)
        threading.Timer(0.1, os.write, (w, b"\x0f")).start()
        n, left = _select(hook, [ca_fds[0].fileno()], 5.0)
        assert hook.woken
        assert (n, left) == (0, [])
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # drained
    finally:
        os.close(r)
        os.close(w)


def test_timeout_with_nothing_to_read(pair, ca_fds):
    _, broker = pair
    hook = _hook([broker])
    assert _select(hook, [ca_fds[0].fileno()], 0.01) == (0, [])
    assert not hook.woken


class _Broken:
    closed = False

    def getsockopt(self, _opt):
        return 3

    def get(self, _opt):
        raise RuntimeError("broken")


def test_an_error_falls_back_to_the_plain_select(ca_fds):
    pcas, client = ca_fds
    client.send(b"x")
    hook = _hook([_Broken()])
    n, left = _select(hook, [pcas.fileno()], 5.0)
    assert (n, left) == (1, [pcas.fileno()])
    assert not hook.watching
    assert not hook.watch(hook.sockets), "a failed hook stays off"


class _HighFd:
    closed = False

    def getsockopt(self, _opt):
        return FD_SETSIZE


def test_a_descriptor_above_fd_setsize_is_not_watched():
    hook = SelectHook()
    hook._installed = True
    assert not hook.watch((_HighFd(),))
    assert not hook.watching


def test_link_due_times():
    link = ShardLink(zmq.Context.instance(), 0, "ipc:///nonexistent")
    link.timers.retry_at = 12.0
    assert link.due() == 12.0  # down: at the retry
    link.state = LinkState.CONNECTING
    assert link.due() == 0.0  # every tick
    link.state = LinkState.LIVE
    link.timers.last_ping, link.timers.last_heard = 100.0, 99.0
    assert link.due() == 100.0 + HEARTBEAT_INTERVAL  # heard since it asked: the next ping
    link.timers.asked_at = 99.5  # asked, no answer yet: when it is taken for silent, if sooner
    assert link.due() == min(
        100.0 + HEARTBEAT_INTERVAL, 99.5 + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
    )


def test_a_read_only_socket_wakes_the_wait_too(pair, ca_fds):
    """A monitor or parked socket: its events are not read before the sleep (the loop reads
    it to the end), but a message on it ends the wait."""
    shard, broker = pair
    broker.getsockopt(zmq.EVENTS)  # read to the end, as the loop does: the edge is armed
    hook = SelectHook()
    hook._installed = True
    assert hook.watch((), (broker,))
    threading.Timer(0.1, shard.send, (b"event",)).start()
    n, left = _select(hook, [ca_fds[0].fileno()], 5.0)
    assert hook.woken
    assert (n, left) == (0, [])


def test_a_select_that_cannot_sleep_goes_through(pair, ca_fds):
    shard, broker = pair
    shard.send(b"answer")
    hook = _hook([broker])
    assert _select(hook, [ca_fds[0].fileno()], 0.0) == (0, [])
    assert not hook.woken  # seen by the next select that could sleep


def test_shard_wait_arithmetic():
    from carelay.shard.server import wait_ms

    assert wait_ms(10.0, 10.5, busy=False) == 501  # until the timer, looked at just after
    assert wait_ms(10.0, 9.0, busy=False) == 0  # overdue
    assert wait_ms(10.0, 12.0, busy=True) == 100  # a failed store, a flush in parts
    assert wait_ms(10.0, 10.05, busy=True) == 51
