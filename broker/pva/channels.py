"""p4p's side of the PVA front-end: the channels clients hold, and the name lookup.

p4p calls a provider's ``testChannel``/``makeChannel`` from its own threads, and a
SharedPV's handler (put, first connect, last disconnect) from a work queue.  Here a
``Channel`` hands every handler call to the front-end's inbox instead (``_exec``), so it
runs on the loop thread, with the mirror and the shard links; and the name lookup
answers from what the loop keeps, under the front-end's channel lock (see front.py).

When a channel opens and closes.  pvxs's ``SharedPV.open`` connects the monitors that
wait for a closed PV while it holds the PV's lock, and each connect waits for the
server's own thread; that thread takes the same lock whenever a client attaches to the
PV or starts an operation on it.  Opened from any other thread while a client connects,
the PV and with it the whole PVA server hang for good.  So a channel is opened on the
server's thread, in ``makeChannel``, before any client is attached to it: the loop
prepares what it opens with (``prepare``) while ``makeChannel`` waits (``opening``), and
changes shown before the opening go into it.  ``close`` waits for the server's thread
too, which may be waiting in ``makeChannel`` for the loop: channels are closed on a
thread of their own (``_Aside``).  A client that attaches to a channel after it was
closed waits for good too: closing it again sends the client back to its search.

So does freeing an operation (a put): p4p's ``ServerOperation`` cancels through the
server's thread when it is freed.  Freed on the loop while ``makeChannel`` waited, the
two threads waited for each other until the channel was refused, every put standing
meanwhile.  The loop holds each operation through an ``_Op``, which hands it on when
the loop lets it go (``_freed``), and the server's thread frees them, inline, each time
it calls in; left there a while, the aside thread frees them.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import queue
import sys
import threading

from p4p import Value
from p4p.nt import NTEnum, NTScalar
from p4p.server import DynamicProvider
from p4p.server.raw import ServOpWrap, SharedPV

from carelay.broker.pva.convert import ENUM

log = logging.getLogger(__name__)


@functools.cache
def nt_type(code: str):
    """The type of a channel: a PV's NTScalar (or NTScalarArray) with every metadata
    field the relay fills; a field's NTScalar (``field:`` and its code) or NTEnum (see
    convert.field_code)."""
    if code == ENUM:
        return NTEnum.buildType()
    if code.startswith("field:"):
        return NTScalar.buildType(code.removeprefix("field:"))
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
    #: The name this thread's ``makeChannel`` just refused for now (see Names).
    refusing: str | None = None

    def keep(self) -> None:
        if not self.kept:
            ctypes.pythonapi.PyGILState_Ensure()
            self.kept = True


_states = _ThreadStates()


#: Operations the loop let go, to be freed off the loop (see the module).
_freed: collections.deque = collections.deque()


def free_operations() -> None:
    """Free the operations the loop let go: on the server's thread, or one that no thread
    waits for."""
    freed = _freed
    while freed:
        try:
            freed.popleft()
        except IndexError:  # taken by another thread meanwhile
            return


class _Op:
    """A p4p server operation as the loop holds it: once the loop lets it go, the
    operation goes to ``_freed`` rather than being freed there (see the module).  It
    answers what the operation does (``value``, ``done``, ``peer``, ``account``, ...)."""

    __slots__ = ("_op",)

    def __init__(self, op) -> None:
        self._op = op

    def __getattr__(self, key: str):
        return getattr(self._op, key)

    def __del__(self) -> None:
        _freed.append(self._op)


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
    """The SharedPV of one name: prepared by the loop thread, opened by the p4p thread
    that hands it out, posted and closed at the loop's word (see the module)."""

    def __init__(self, front, name: str) -> None:
        self._front = front
        self.name = name
        self.code = ""
        self.opened = False
        #: What it opens with, once prepared; later changes are merged in.
        self._fields: dict | None = None
        self._prepared = threading.Event()
        self._lock = threading.Lock()
        super().__init__(handler=_Calls(front))

    def _exec(self, op, method, *args) -> None:
        _states.keep()
        if op is not None:
            # A put, from the server's thread: the operations let go since the last call
            # are freed here, where that waits for nobody.  p4p's own wrapper of the
            # operation stays here: the loop gets the operation through an ``_Op``.
            free_operations()
            op = _Op(op)
            args = tuple(op if isinstance(a, ServOpWrap) else a for a in args)
        self._front.inbox.push(_run, op, method, args)

    def prepare(self, code: str, fields: dict) -> None:
        """The loop thread: the channel opens with ``fields`` (see ``opening``)."""
        with self._lock:
            self.code = code
            self._fields = fields
        self._prepared.set()

    def opening(self, timeout: float) -> bool:
        """The p4p thread handing the channel out: wait up to ``timeout`` for the loop
        to prepare it, then open it.  False: the loop did not, or closed it."""
        if not self._prepared.wait(timeout):
            return False
        with self._lock:
            if not self.opened and self._fields is not None:
                SharedPV.open(self, Value(nt_type(self.code), self._fields))
                self.opened, self._fields = True, None
            return self.opened

    @property
    def decided(self) -> bool:
        """Prepared or closed: ``opening`` waits no more."""
        return self._prepared.is_set()

    def show(self, fields: dict) -> None:
        """Post ``fields`` to the channel's monitors (all of them, each time)."""
        with self._lock:
            if self.opened:
                SharedPV.post(self, Value(nt_type(self.code), fields))
            elif self._fields is not None:
                self._fields.update(fields)  # not open yet: it opens with them

    def shut(self) -> None:
        """Close the channel, or close it again: its clients go back to their search."""
        with self._lock:
            self.opened, self._fields = False, None
        self._prepared.set()  # a makeChannel waiting for it hands it out no more
        _aside.close(self)


class _Aside:
    """The p4p calls that wait for the server's thread, made on a thread of their own
    (see the module), in the order given: channels closed, operations freed."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def close(self, channel: SharedPV) -> None:
        self._put(channel)

    def sweep(self) -> None:
        """The loop, once a second: operations it let go that wait still (no put came
        since to free them) are freed here."""
        if _freed:
            self._put(None)

    def _put(self, item) -> None:
        self._queue.put(item)
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="pva-aside", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            channel = self._queue.get()
            if channel is None:
                free_operations()
                continue
            try:
                SharedPV.close(channel)
            except Exception:
                log.exception("closing the PVA channel of %s failed", channel.name)
            del channel  # freed here, not at the next call's turn


_aside = _Aside()
#: For the loop (front.py needs no p4p): see ``_Aside.sweep``.
sweep = _aside.sweep


class Names:
    """The DynamicProvider handler: which names this front-end serves."""

    def __init__(self, front) -> None:
        self.front = front

    def testChannel(self, name: str):  # noqa: N802 - p4p's name
        _states.keep()
        answer = self.front.test_channel(name)
        return DynamicProvider.NotYet if answer is None else answer

    def makeChannel(self, name: str, peer: str):  # noqa: N802 - p4p's name
        channel = self.front.make_channel(name, peer)
        if channel is None:
            # Not now: p4p refuses the channel for anything but a SharedPV (the client
            # searches again), and reports the TypeError it raises for it through
            # sys.excepthook, as it would a fault (see ``quiet_refusals``).
            _states.refusing = name
        return channel


def quiet_refusals() -> None:
    """The process's excepthook (a crash: CRITICAL in the log, and the last error that
    ``carelay status`` shows) no longer hears of a channel refused for now (see
    Names.makeChannel): the front-end logged it already."""
    previous = sys.excepthook

    def hook(kind, exc, tb) -> None:
        name, _states.refusing = _states.refusing, None
        if name is not None and issubclass(kind, TypeError) and name in str(exc):
            return
        previous(kind, exc, tb)

    sys.excepthook = hook


def denied() -> SharedPV:
    """The channel of a client without read access: never opened, so the client's
    gets, monitors and puts wait and time out, and it learns nothing of the PV."""
    return SharedPV()


def provider(front) -> DynamicProvider:
    return DynamicProvider("carelay", Names(front))
