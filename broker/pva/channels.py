"""p4p's side of the PVA front-end: the channels clients hold, and the name lookup.

p4p calls a provider's ``testChannel``/``makeChannel`` from its own threads, and a
SharedPV's handler (put, first connect, last disconnect) from a work queue.  Here a
``Channel`` hands every handler call to the front-end's inbox instead (``_exec``), so it
runs on the loop thread, with the mirror and the shard links; and the name lookup
answers from what the loop keeps, under the front-end's channel lock (see front.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

from p4p import Value
from p4p.nt import NTScalar
from p4p.server import DynamicProvider
from p4p.server.raw import SharedPV

log = logging.getLogger(__name__)


@functools.cache
def nt_type(code: str):
    """The NTScalar (or NTScalarArray) type with every metadata field the relay fills."""
    return NTScalar.buildType(code, display=True, control=True, valueAlarm=True, form=True)


class _ThreadStates(threading.local):
    """Keeps the Python thread state of each p4p thread that calls in.

    p4p enters Python from its own threads through PyGILState_Ensure, and its
    PyGILState_Release deletes a thread state it made: each call into Python from a
    p4p thread made a thread state and deleted it again, mapping and unmapping its
    frame stack each time (system calls, TLB shootdowns on the other cores).  One more
    Ensure, never released, keeps the state for the thread's life (the p4p threads end
    with the server, before the interpreter).  A ``threading.local`` lives in the
    thread state, so ``kept`` is False again exactly when a new one was made."""

    kept = False

    def keep(self) -> None:
        if not self.kept:
            ctypes.pythonapi.PyGILState_Ensure()
            self.kept = True


_states = _ThreadStates()


def _run(op, method, args) -> None:
    """One handler call, on the loop thread: an error fails the operation, never the loop."""
    try:
        method(*args)
    except Exception as e:
        log.exception("PVA handler %s failed", getattr(method, "__name__", method))
        if op is not None:
            op.done(error=f"relay error: {e}")


class _Calls:
    """A channel's handler: each call goes on to the front-end, by the channel's name."""

    def __init__(self, front) -> None:
        self.front = front

    def put(self, channel, op) -> None:
        self.front.on_put(channel, op)

    def onFirstConnect(self, channel) -> None:  # noqa: N802 - p4p's name
        self.front.on_first_connect(channel)

    def onLastDisconnect(self, channel) -> None:  # noqa: N802 - p4p's name
        self.front.on_last_disconnect(channel)


class Channel(SharedPV):
    """The SharedPV of one name.  Made closed by ``makeChannel`` (its clients wait), then
    opened, posted and closed only by the loop thread."""

    def __init__(self, front, name: str) -> None:
        self._front = front
        self.name = name
        self.code = ""
        self.opened = False
        super().__init__(handler=_Calls(front))

    def _exec(self, op, method, *args) -> None:
        _states.keep()
        self._front.inbox.push(_run, op, method, args)

    def open(self, code: str, fields: dict) -> None:  # type: ignore[override]
        self.code = code
        SharedPV.open(self, Value(nt_type(code), fields))
        self.opened = True

    def show(self, fields: dict) -> None:
        """Post ``fields`` to the channel's monitors (all of them, each time)."""
        if self.opened:
            SharedPV.post(self, Value(nt_type(self.code), fields))

    def shut(self) -> None:
        self.opened = False
        self.close()


class Names:
    """The DynamicProvider handler: which names this front-end serves."""

    def __init__(self, front) -> None:
        self.front = front

    def testChannel(self, name: str):  # noqa: N802 - p4p's name
        _states.keep()
        answer = self.front.test_channel(name)
        return DynamicProvider.NotYet if answer is None else answer

    def makeChannel(self, name: str, peer: str):  # noqa: N802 - p4p's name
        return self.front.make_channel(name, peer)


def denied() -> SharedPV:
    """The channel of a client without read access: never opened, so the client's
    gets, monitors and puts wait and time out, and it learns nothing of the PV."""
    return SharedPV()


def provider(front) -> DynamicProvider:
    return DynamicProvider("carelay", Names(front))
