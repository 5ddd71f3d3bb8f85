"""CA client helpers the system tests share: fresh reads, puts with callback, statuses."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import caproto.threading.client
import epics
import numpy as np
from caproto import CaprotoNetworkError, CaprotoTimeoutError

from carelay.common.sharding import shard_for


class _Broadcaster(caproto.threading.client.SharedBroadcaster):
    """caproto's broadcaster, whose search-retry thread ends at once when it is closed.

    caproto 1.3's thread sleeps between searches for up to the longest search interval
    before it sees the close, and the close waits for it: seconds at the end of every
    test module that held a context (3 s and more, ten times in a run of the suite)."""

    def disconnect(self, *, wait=True):
        self._close_event.set()
        self._search_now.set()  # what the thread sleeps on
        super().disconnect(wait=wait)

    def send(self, *commands):
        """Woken by the close, the thread may send its searches once more as the socket
        closes (caproto looks at the socket, then sends on it): the error is the close's,
        and the thread, which then ends, would report it as a fault of its own."""
        try:
            super().send(*commands)
        except CaprotoNetworkError:
            if not self._close_event.is_set():
                raise


class Context(caproto.threading.client.Context):
    """caproto's threading client context, whose search thread outlives a server that
    answered a search and then could not be reached: a broker killed (or stopped) just
    after it answered, before the supervisor started it again.

    caproto 1.3 opens the circuit inside its search-results thread and catches neither a
    refused connection nor a handshake timeout there: the thread dies and the context
    connects nothing more, which would fail a test for the client's sake, not the relay's.
    Here the connection is tried again, for a while, as the broker comes back on its port.
    """

    patience = 15.0  # seconds a circuit is tried again before the error is let through

    def __init__(self, broadcaster=None, **kwargs) -> None:
        super().__init__(broadcaster or _Broadcaster(), **kwargs)

    def get_circuit_manager(self, address, priority):
        deadline = time.monotonic() + self.patience
        while True:
            try:
                return super().get_circuit_manager(address, priority)
            except (OSError, CaprotoTimeoutError):
                if self._close_event.is_set():
                    raise _Closed from None
                if time.monotonic() >= deadline:
                    raise
                self._close_event.wait(0.1)

    def _process_search_results_loop(self):
        # Closed while a circuit was tried again: the search thread ends, quietly.
        with contextlib.suppress(_Closed):
            super()._process_search_results_loop()


class _Closed(Exception):
    """The context was closed while its search thread tried a circuit again."""


def get(name, timeout: float = 5, **kw):
    """A fresh read through pyepics (never the monitor cache)."""
    value = epics.caget(name, use_monitor=False, timeout=timeout, **kw)
    assert value is not None, f"caget {name} failed"
    return value


def put(name, value):
    """A put with callback through pyepics, which must report completion."""
    assert epics.caput(name, value, wait=True, timeout=5) == 1, f"caput {name} {value!r}"


def get_array(name, **kw):
    """A fresh read of an array at its current length, through pyepics.

    Not ``caget``: ``PV.get`` asks for as many elements as its last monitor
    event had, which lags behind a put made by another client, and
    ``caget(count=0)`` returns an empty array.  ``ca.get`` asks for count 0,
    the current length, as a waveform client does.
    """
    chid = epics.ca.create_channel(name, connect=True, auto_cb=False)
    value = epics.ca.get(chid, timeout=5, **kw)
    assert value is not None, f"ca.get {name} failed"
    # pyepics unpacks a one-element answer as a scalar.
    return value if kw.get("as_string") else np.atleast_1d(value)


def pvlist(relay) -> list[str]:
    """The names in ``<prefix>pvlist``."""
    text = get_array(relay.prefix + "pvlist", as_string=True)
    return text.split(",") if text else []


def connect(ca, name):
    """A connected caproto PV of context ``ca``."""
    (pv,) = ca.get_pvs(name, timeout=5)
    pv.wait_for_connection(timeout=5)
    return pv


def write_status(pv, data, **kw):
    """Put with callback through caproto; the CA status the server answered (pyepics does
    not report a failed put callback)."""
    return pv.write(data, wait=True, timeout=5, **kw).status


def close(ctx) -> None:
    """Disconnect a caproto context (of ``Context``: its threads end at once)."""
    ctx.disconnect()


def role_pid(relay, role: str) -> int | None:
    """PID of the relay's running ``carelay <role>`` process (``broker``, ``shard K``,
    ``pva``, ...), if any."""
    want = role.split()
    for pid in relay.children():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        # python -m carelay.supervisor.cli ROLE ...
        i = next((i + 1 for i, a in enumerate(argv) if a == "carelay.supervisor.cli"), None)
        if i is not None and argv[i : i + len(want)] == want:
            return pid
    return None


def name_on_shard(relay, shard: int, stem: str, type_count: str = "f1") -> str:
    """A fresh PV name that the rendezvous hash gives to ``shard``."""
    while True:
        name = relay.name(stem, type_count)
        if shard_for(name, relay.shards) == shard:
            return name


def read_sevr(ca, name: str) -> tuple[float, int] | None:
    """(value, alarm severity) of ``name`` read through the caproto context ``ca``; None
    if the read timed out."""
    (pv,) = ca.get_pvs(name, timeout=5)
    try:
        reading = pv.read(data_type="time", timeout=5)
    except TimeoutError:
        return None
    return float(reading.data[0]), int(reading.metadata.severity)
