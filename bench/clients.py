"""CA client processes of the suite: pyepics (libca, C), started with 'spawn'.

Nothing here imports epics at module level: a client sets its EPICS
environment first (port, address list, EPICS_CA_MAX_ARRAY_BYTES), then
imports epics.  pyepics must never be forked once its context exists, so the
suite starts these with the multiprocessing 'spawn' context only.

Channels, connections and subscriptions go through ``epics.ca``; puts and
gets go through pyepics' libca binding (``epics.ca.libca``) directly:

- array puts hand libca a zero-copy view of the numpy buffer (pyepics' own
  ``put`` converts every element through a Python list: about 80 ms per
  million doubles, which would measure the client instead of the server);
- a put with callback waits on an Event set by its completion callback, and a
  get is ``ca_array_get`` + ``ca_pend_io``, the way ``caput -c``/``caget`` do it,
  instead of pyepics' busy polling loop, which on a 2-core machine takes CPU
  from the server under test.

Each client function takes ``(epics, sync, **kwargs)`` and returns a dict;
``sync.ready()`` reports the client connected and waits for the common start.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
import time
import traceback

#: Values below this are warm-up puts, not timestamps (W2).
_STAMP_MIN = 1e9


class Sync:
    """Start and stop signals shared with the suite."""

    def __init__(self, index, ready_q, go, stop) -> None:
        self.index = index
        self._ready_q = ready_q
        self.go = go
        self.stop = stop
        self.was_ready = False

    def ready(self, timeout: float = 300.0) -> float:
        """Report ready, wait for the start; returns the monotonic start time seen."""
        self.was_ready = True
        self._ready_q.put((self.index, "ready", None))
        if not self.go.wait(timeout):
            raise TimeoutError("no start signal")
        return time.monotonic()

    def report(self, result: dict) -> None:
        """Tell the suite the timed part is over, before the client's own end."""
        self._ready_q.put((self.index, "done", result))


def client_main(fn_name, env, kwargs, index, ready_q, go, stop, result_q) -> None:
    """Entry point of a client process."""
    sync = Sync(index, ready_q, go, stop)
    try:
        for key in [k for k in os.environ if k.startswith("EPICS_")]:
            del os.environ[key]
        os.environ.update(env)
        import epics

        if "." in fn_name:  # a client of another module of the suite: "bench.bursts.burst_driver"
            module, _, name = fn_name.rpartition(".")
            fn = getattr(importlib.import_module(module), name)
        else:
            fn = globals()[fn_name]
        out = fn(epics, sync, **kwargs)
        result_q.put((index, "ok", out))
    except BaseException:
        text = traceback.format_exc()
        if not sync.was_ready:
            ready_q.put((index, "error", text))
        result_q.put((index, "error", text))


# -- libca helpers -------------------------------------------------------------------


class Channel:
    """One connected channel with fast put/get through libca."""

    def __init__(self, epics, name: str, timeout: float = 30.0) -> None:
        import numpy as np

        self.ca = epics.ca
        self.name = name
        self.chid = self.ca.create_channel(name, connect=False, auto_cb=False)
        if not self.ca.connect_channel(self.chid, timeout=timeout):
            raise TimeoutError(f"{name}: not connected after {timeout} s")
        self.ftype = self.ca.field_type(self.chid)
        self.count = self.ca.element_count(self.chid)
        self.ctype = self.ca.dbr.Map[self.ftype]
        self.dtype = np.dtype(self.ctype)

    def _data(self, value):
        import numpy as np

        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value, dtype=self.dtype)
            n = min(arr.shape[0], self.count)
            return (self.ctype * n).from_buffer(arr), n, arr
        data = (self.ctype * 1)(value)
        return data, 1, data

    def put(self, value, wait: bool = False, timeout: float = 30.0) -> None:
        """A put (fire and forget), or with callback and wait for its completion."""
        data, n, keep = self._data(value)
        libca = self.ca.libca
        if not wait:
            ret = libca.ca_array_put(self.ftype, n, self.chid, data)
            self.ca.PySEVCHK("put", ret)
            libca.ca_flush_io()
            return
        done = threading.Event()

        def completed():
            done.set()

        ret = libca.ca_array_put_callback(
            self.ftype, n, self.chid, data, self.ca._CB_PUTWAIT, ctypes.py_object(completed)
        )
        self.ca.PySEVCHK("put", ret)
        libca.ca_flush_io()
        if not done.wait(timeout):
            raise TimeoutError(f"{self.name}: put with callback not completed after {timeout} s")
        del keep

    def get(self, count: int | None = None, timeout: float = 30.0):
        """``count`` elements (default all) as a numpy array, by ca_array_get + ca_pend_io."""
        import numpy as np

        n = self.count if count is None else count
        buf = np.zeros(n, dtype=self.dtype)
        data = (self.ctype * n).from_buffer(buf)
        libca = self.ca.libca
        ret = libca.ca_array_get(self.ftype, n, self.chid, data)
        self.ca.PySEVCHK("get", ret)
        ret = libca.ca_pend_io(timeout)
        if ret != self.ca.dbr.ECA_NORMAL:
            raise TimeoutError(f"{self.name}: get failed ({self.ca.message(ret)})")
        return buf


def connect_many(epics, names: list[str], timeout: float = 60.0) -> list:
    """Create all channels first (libca searches them together), then wait for each."""
    ca = epics.ca
    chids = [ca.create_channel(n, connect=False, auto_cb=False) for n in names]
    ca.flush_io()
    deadline = time.monotonic() + timeout
    for name, chid in zip(names, chids, strict=True):
        if not ca.connect_channel(chid, timeout=max(0.1, deadline - time.monotonic())):
            raise TimeoutError(f"{name}: not connected")
    return chids


# -- W1: scalar puts ------------------------------------------------------------------


def scalar_writer(epics, sync, name: str, n: int, every: int, base: float) -> dict:
    """n puts to one f1 PV, a put with callback every ``every`` (0: none) and the last one
    with callback, then a read that must show the last value."""
    ch = Channel(epics, name)
    ch.put(base, wait=True)  # creates the PV on a relay: not timed
    t0 = sync.ready()
    last = base
    for i in range(1, n + 1):
        last = base + i
        ch.put(last, wait=(i == n or (every > 0 and i % every == 0)))
    got = float(ch.get(1)[0])
    if got != last:
        raise AssertionError(f"{name}: read {got} after the last put of {last}")
    return {"start": t0, "end": time.monotonic(), "puts": n}


# -- W2: latency ----------------------------------------------------------------------


def latency_writer(epics, sync, name: str, n: int, rate: float) -> dict:
    """n puts at ``rate`` Hz, each the writer's time.time()."""
    ch = Channel(epics, name)
    ch.put(0.0, wait=True)
    sync.ready()
    time.sleep(0.2)  # let every monitor settle
    t0, late = paced_puts(ch.put, n, rate)
    ch.put(0.0, wait=True)  # every stamp has been applied
    return {"puts": n, "late": late, "elapsed": time.perf_counter() - t0}


def paced_puts(put, n: int, rate: float) -> tuple[float, int]:
    """``put(time.time())`` n times at ``rate`` Hz (a latency writer's stamps); the
    perf_counter at the start, and how many puts went more than a period late."""
    period = 1.0 / rate
    t0 = time.perf_counter()
    late = 0
    for k in range(n):
        left = t0 + k * period - time.perf_counter()
        if left > 0:
            time.sleep(left)
        elif left < -period:
            late += 1
        put(time.time())
    return t0, late


def latency_monitor(epics, sync, name: str) -> dict:
    """Receives monitors of ``name``; the latency of each is now - value."""
    ch = Channel(epics, name)
    lat: list[float] = []
    first = threading.Event()

    def on_event(value=None, **_kw):
        now = time.time()
        first.set()
        if value is not None and value > _STAMP_MIN:
            lat.append(now - value)

    keep = epics.ca.create_subscription(ch.chid, callback=on_event)  # noqa: F841
    if not first.wait(30):
        raise TimeoutError(f"{name}: no first monitor event")
    sync.ready()
    sync.stop.wait(600)
    time.sleep(0.05)
    return {"latency": list(lat)}


# -- W3/W6: buffer appends -------------------------------------------------------------


def buffer_writer(
    epics,
    sync,
    name: str,
    count: int,
    chunk: int,
    duration: float,
    max_appends: int,
    whole: bool,
) -> dict:
    """Fill the buffer, then append ``chunk`` elements with callback until ``duration`` s
    or ``max_appends``.  ``whole``: the server has no ring (an IOC waveform), so the client
    keeps the ring and writes the whole buffer each time."""
    import numpy as np

    ch = Channel(epics, name)
    ring = np.arange(count, dtype=np.float64)
    ch.put(ring, wait=True, timeout=120)
    sync.ready()
    t0 = time.monotonic()
    k = 0
    last = float(count - 1)
    while k < max_appends and time.monotonic() - t0 < duration:
        data = np.arange(chunk, dtype=np.float64) + (count + k * chunk)
        if whole:
            ring = np.concatenate((ring[chunk:], data))
            ch.put(ring, wait=True, timeout=120)
        else:
            ch.put(data, wait=True, timeout=120)
        last = float(data[-1])
        k += 1
    end = time.monotonic()
    got = ch.get(count, timeout=60)
    if float(got[-1]) != last:
        raise AssertionError(f"{name}: last element {got[-1]}, expected {last}")
    return {"start": t0, "end": end, "appends": k}


def buffer_monitor(epics, sync, name: str) -> dict:
    """One monitor on a buffer: counts the events (each the whole buffer)."""
    ch = Channel(epics, name)
    events = []
    first = threading.Event()

    def on_event(value=None, **_kw):
        events.append(len(value) if value is not None and hasattr(value, "__len__") else 1)
        first.set()

    keep = epics.ca.create_subscription(ch.chid, callback=on_event)  # noqa: F841
    if not first.wait(60):
        raise TimeoutError(f"{name}: no first monitor event")
    sync.ready()
    sync.stop.wait(600)
    return {"events": len(events), "elements": int(sum(events))}


# -- W4: text ------------------------------------------------------------------------------


def text_writer(epics, sync, name: str, size: int, duration: float, max_puts: int) -> dict:
    """Puts of ``size`` bytes of text (size-1 characters and a NUL, as pyepics sends a str)
    with callback, until ``duration`` s or ``max_puts``."""
    import numpy as np

    ch = Channel(epics, name)
    rng = np.random.default_rng(7)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 ", dtype=np.uint8)
    text = rng.choice(letters, size).astype(np.uint8)
    text[-1] = 0
    ch.put(text, wait=True, timeout=120)
    sync.ready()
    t0 = time.monotonic()
    k = 0
    while k < max_puts and time.monotonic() - t0 < duration:
        text[:8] = np.frombuffer(f"{k:08d}".encode(), dtype=np.uint8)
        ch.put(text, wait=True, timeout=120)
        k += 1
    end = time.monotonic()
    got = ch.get(size, timeout=60)
    if got[:8].tobytes() != f"{k - 1:08d}".encode():
        raise AssertionError(f"{name}: read {got[:8].tobytes()!r} after put {k - 1}")
    return {"start": t0, "end": end, "puts": k, "bytes": k * size}


def text_reader(epics, sync, name: str, size: int) -> dict:
    """Reads the whole text PV in a loop until told to stop."""
    ch = Channel(epics, name)
    ch.get(size, timeout=60)
    sync.ready()
    t0 = time.monotonic()
    reads = 0
    while not sync.stop.is_set():
        ch.get(size, timeout=60)
        reads += 1
    return {"reads": reads, "bytes": reads * size, "elapsed": time.monotonic() - t0}


# -- W5: creation --------------------------------------------------------------------------


def creator(epics, sync, names: list[str], batch: int) -> dict:
    """Create the PVs ``names`` (connect, then a put with callback each), ``batch`` at a time;
    stays connected until told to stop."""
    ca = epics.ca
    sync.ready()
    t0 = time.monotonic()
    channels = []
    done = 0
    connecting = 0.0  # seconds spent connecting (search, channel), the rest confirming
    for start in range(0, len(names), batch):
        part = names[start : start + batch]
        c0 = time.monotonic()
        chids = connect_many(epics, part)
        connecting += time.monotonic() - c0
        pending: list = []
        lock = threading.Condition()
        count = [0]
        for i, chid in enumerate(chids):

            def completed(count=count, lock=lock):
                with lock:
                    count[0] += 1
                    lock.notify_all()

            data = (ca.dbr.Map[ca.field_type(chid)] * 1)(float(start + i))
            pending.append((completed, data))
            ret = ca.libca.ca_array_put_callback(
                ca.field_type(chid), 1, chid, data, ca._CB_PUTWAIT, ctypes.py_object(completed)
            )
            ca.PySEVCHK("put", ret)
        ca.flush_io()
        deadline = time.monotonic() + 120
        with lock:
            while count[0] < len(chids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(chids) - count[0]} creations not confirmed")
                lock.wait(1.0)
        done += len(chids)
        channels.extend(chids)
    result = {"start": t0, "end": time.monotonic(), "created": done, "connect_s": connecting}
    # The suite measures the relay's RSS now, while the channels stay connected.
    sync.report(result)
    sync.stop.wait(600)
    return result
