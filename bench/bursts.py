"""W10's client processes: bursts of puts or gets over many channels, and monitors.

Every channel is made with libca's ``ca_create_channel`` directly, never through
``epics.ca.create_channel``: pyepics keeps one channel per name in its cache and
hands the same one back on a second call, while W10 needs 1000 channels of one
name on one circuit, as a C client opens them.  Channels made without a
connection handler are connected by ``ca_pend_io``, as ``caget`` does it.

- A put burst is ``burst`` ``ca_array_put`` calls (no callback), one per channel
  in turn, then one ``ca_flush_io``.  The bursts go back to back; the run ends
  with one get round trip on the same circuit, which the server answers only
  after it has taken every put before it.  Then, untimed, every channel must read
  its last value.
- A get burst is ``burst`` ``ca_array_get`` calls and one ``ca_pend_io``.
- A monitor subscribes to each name once, with a callback that only counts.

Each client function takes ``(epics, sync, **kwargs)`` (see bench.clients).
"""

from __future__ import annotations

import ctypes
import threading
import time

#: Seconds for channels to connect and primed values to be confirmed.
CONNECT_TIMEOUT = 60.0
#: Seconds for a get round trip; the untimed check of the last values.
IO_TIMEOUT = 30.0


def _channels(ca, names: list[str]) -> list:
    """A new channel per entry of ``names`` (repeats included), all connected."""
    libca = ca.libca or ca.initialize_libca()
    chids = []
    for name in names:
        chid = ca.dbr.chid_t()
        ret = libca.ca_create_channel(name.encode(), None, None, 0, ctypes.byref(chid))
        ca.PySEVCHK("create_channel", ret)
        chids.append(chid)
    ret = libca.ca_pend_io(CONNECT_TIMEOUT)
    if ret != ca.dbr.ECA_NORMAL:
        raise TimeoutError(f"{len(names)} channels: not all connected ({ca.message(ret)})")
    return chids


def _put_all_wait(ca, chids: list, values: list[float]) -> None:
    """A put with callback of ``values[i]`` to ``chids[i]``, all sent, then all confirmed."""
    lock = threading.Condition()
    count = [0]

    def completed(**_kw):
        with lock:
            count[0] += 1
            lock.notify_all()

    keep = []
    for chid, value in zip(chids, values, strict=True):
        data = ctypes.c_double(value)
        keep.append(data)
        ret = ca.libca.ca_array_put_callback(
            ca.dbr.DOUBLE, 1, chid, ctypes.byref(data), ca._CB_PUTWAIT, ctypes.py_object(completed)
        )
        ca.PySEVCHK("put", ret)
    ca.libca.ca_flush_io()
    deadline = time.monotonic() + CONNECT_TIMEOUT
    with lock:
        while count[0] < len(chids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(chids) - count[0]} puts with callback not confirmed")
            lock.wait(1.0)


def _get_all(ca, chids: list, buf) -> None:
    """One get burst: a ``ca_array_get`` per channel into ``buf``, one ``ca_pend_io``."""
    libca = ca.libca
    for i, chid in enumerate(chids):
        ret = libca.ca_array_get(ca.dbr.DOUBLE, 1, chid, ctypes.byref(buf, i * 8))
        if ret != ca.dbr.ECA_NORMAL:
            ca.PySEVCHK("get", ret)
    ret = libca.ca_pend_io(IO_TIMEOUT)
    if ret != ca.dbr.ECA_NORMAL:
        raise TimeoutError(f"get burst of {len(chids)}: {ca.message(ret)}")


def burst_driver(epics, sync, names: list[str], op: str, bursts: int, base: float) -> dict:
    """``bursts`` bursts of ``len(names)`` puts or gets, one op per channel of ``names``
    (a name repeated is a channel of its own).  Returns the timed span and the op count."""
    ca = epics.ca
    chids = _channels(ca, names)
    # One channel per distinct name gets a put with callback first: it creates the PV on a
    # relay and gives a get something to read back.  Untimed.
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    primed = {name: base + i for i, name in enumerate(first)}
    _put_all_wait(ca, [chids[i] for i in first.values()], list(primed.values()))
    n = len(chids)
    buf = (ctypes.c_double * n)()
    libca = ca.libca
    value = ctypes.c_double()
    t0 = sync.ready()
    cpu0 = time.process_time()
    if op == "put":
        # Each put a new value, so that every put changes the PV (and may post an event).
        v = base + len(first)
        for _ in range(bursts):
            for chid in chids:
                v += 1.0
                value.value = v
                libca.ca_array_put(ca.dbr.DOUBLE, 1, chid, ctypes.byref(value))
            libca.ca_flush_io()
        _get_all(ca, chids[-1:], buf)
        end = time.monotonic()
        cpu = time.process_time() - cpu0
        last = {name: base + len(first) + bursts * n - (n - 1 - i) for i, name in enumerate(names)}
        expected = [last[name] for name in names]
    elif op == "get":
        for _ in range(bursts):
            _get_all(ca, chids, buf)
        end = time.monotonic()
        cpu = time.process_time() - cpu0
        expected = [primed[name] for name in names]
    else:
        raise ValueError(f"unknown op {op!r}")
    # Untimed: every channel reads what it should (a relay may apply a put a little later).
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        _get_all(ca, chids, buf)
        wrong = [(names[i], buf[i], x) for i, x in enumerate(expected) if buf[i] != x]
        if not wrong:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(wrong)} channels read a wrong value, e.g. {wrong[:3]}")
        time.sleep(0.05)
    # The client's own CPU (all its threads): near the span, it is the client that limits.
    return {"start": t0, "end": end, "ops": bursts * n, "cpu_s": cpu}


def burst_monitor(epics, sync, names: list[str], above: float) -> dict:
    """A subscription (DBE_VALUE | DBE_ALARM) to each of ``names``; counts the events
    of values above ``above`` (the timed puts' values, not the primed ones)."""
    ca = epics.ca
    chids = _channels(ca, names)
    count = [0]
    timed = [0]
    as_double = ctypes.POINTER(ctypes.c_double)

    def on_event(args):
        count[0] += 1
        if args.status == ca.dbr.ECA_NORMAL and ctypes.cast(args.raw_dbr, as_double)[0] > above:
            timed[0] += 1

    callback = ca.dbr.make_callback(on_event, ca.dbr.event_handler_args)
    mask = ca.dbr.DBE_VALUE | ca.dbr.DBE_ALARM
    evids = []
    for chid in chids:
        evid = ctypes.c_void_p()
        ret = ca.libca.ca_create_subscription(
            ca.dbr.DOUBLE, 1, chid, mask, callback, None, ctypes.byref(evid)
        )
        ca.PySEVCHK("create_subscription", ret)
        evids.append(evid)
    ca.libca.ca_flush_io()
    # Every subscription gives its first event; then the monitor is in place.
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while count[0] < len(chids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(chids) - count[0]} subscriptions gave no first event")
        time.sleep(0.01)
    sync.ready()
    sync.stop.wait(600)
    time.sleep(0.1)  # the last events on their way
    return {"events": timed[0], "subscriptions": len(chids)}
