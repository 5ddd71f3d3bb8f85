"""The messages between a broker and its shards: one frozen dataclass per kind.

Each kind travels as one entry of a batch (see carelay.common.protocol): a msgpack
list ``[KIND, field, ...]`` with the fields in the order of the class.  A field's
annotation says what the codec accepts for it:

- ``str``: text; ``int``: a non-negative integer; ``float``: any float;
  ``bool``: true or false; ``int | None``: a non-negative integer or nil;
- ``FieldValue``: text, an integer or a float (the value of a PV field);
- ``dict``: a map with text keys;
- ``np.ndarray``: an array of one of the wire dtypes, written ``data`` in the layouts
  below and sent as ``[dtype, count, inline]``: ``inline`` is the raw buffer when it is
  at most INLINE_MAX bytes, else nil and the buffer is the batch's next frame.

``req`` is the broker's request number, echoed in the answer (0: none wanted).
``seq`` is the shard's change sequence number; ``epoch`` the shard's start id (a new
epoch means the shard restarted).  ``expires``: POSIX seconds, by the shard's clock (see
broker/clock.py), after which the broker has failed the request, so a shard drops it
with a Reject "expired" (0.0: never).  A ``stamp`` is the POSIX time of a put (the
broker's, kept by the shard) or of a change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

#: What a PV field holds.
FieldValue = str | int | float


class Message:
    """What every message kind shares: its KIND on the wire, and equality that compares
    arrays by dtype and contents."""

    __slots__ = ()
    KIND: ClassVar[int] = 0

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


def _kind(number: int):
    def mark(cls):
        cls.KIND = number
        return dataclass(frozen=True, slots=True, eq=False)(cls)

    return mark


# -- broker to shard ------------------------------------------------------------------


@_kind(1)
class Hello(Message):
    """``[1, req, token, broker, follow]``: send me a snapshot.  ``token``: the relay's
    token ("" none), which a shard that asks for one checks before it serves the peer;
    ``broker``: the broker's id, whose earlier connections the shard then fences;
    ``follow``: of other front-ends' puts, send me only those to the PVs I follow (see
    Follow), not every one."""

    req: int
    token: str = ""
    broker: str = ""
    follow: bool = False


@_kind(19)
class Follow(Message):
    """``[19, req, name, on]``: a front-end that said HELLO with ``follow`` hears of other
    front-ends' puts to ``name`` from now on (``on``), or no longer.  With a ``req``, the
    shard answers with ``name`` as it stands: an UPDATE (``reset``: the whole value), or
    a DELETED (``restate``) if it has no such PV."""

    req: int
    name: str
    on: bool


@_kind(4)
class Ping(Message):
    """``[4, req]``: a heartbeat, answered by a Pong."""

    req: int


@_kind(22)
class Watch(Message):
    """``[22, req, name, on]``: this front-end serves reads of ``name`` from what it last
    showed, with no way to catch up first (PVA): hold the answer to another front-end's
    put to it until this one has shown the change (``on``), or no longer."""

    req: int
    name: str
    on: bool


@_kind(23)
class Shown(Message):
    """``[23, req, token]``: every change before the Confirm ``token`` is shown."""

    req: int
    token: int


@_kind(2)
class Put(Message):
    """``[2, name, req, stamp, data, callback, expires]``: apply a value; the first put
    creates the PV.  ``callback``: a client waits for it, which a shard whose store
    cannot be written refuses.  ``stamp`` 0 leaves the time to the shard's clock."""

    name: str
    req: int
    stamp: float
    data: np.ndarray
    callback: bool = False
    expires: float = 0.0


@_kind(6)
class Write(Message):
    """``[6, name, req, stamp, data, expires]``: a put to an existing PV that the broker
    has applied to its mirror already.  Answered only when ``req`` is set (an Ack), or
    when refused: a Reject, then the PV as the shard holds it (an Update with ``reset``,
    or a Deleted with ``restate``).  A Write with ``req`` is refused while the shard's
    store cannot be written."""

    name: str
    req: int
    stamp: float
    data: np.ndarray
    expires: float = 0.0


@_kind(3)
class Delete(Message):
    """``[3, name, req, expires]``: delete a PV."""

    name: str
    req: int
    expires: float = 0.0


@_kind(5)
class SetField(Message):
    """``[5, name, req, field, value, expires]``: change a field; RES empties a buffer."""

    name: str
    req: int
    field: str
    value: FieldValue
    expires: float = 0.0


# -- shard to broker ------------------------------------------------------------------


@_kind(10)
class Update(Message):
    """``[10, name, req, seq, stamp, data, reset, created, epoch]``: a put applied: for a
    buffer the elements appended, else the whole value.  ``reset``: the buffer was
    emptied first.  A restatement after a refused Write is no change: ``req`` 0 and the
    current ``seq``."""

    name: str
    req: int
    seq: int
    stamp: float
    data: np.ndarray
    reset: bool = False
    created: bool = False
    epoch: int = 0


@_kind(18)
class Ack(Message):
    """``[18, name, req, seq, epoch]``: a Write with ``req`` applied."""

    name: str
    req: int
    seq: int
    epoch: int = 0


@_kind(17)
class FieldChanged(Message):
    """``[17, name, req, seq, field, value, epoch]``: a field change applied."""

    name: str
    req: int
    seq: int
    field: str
    value: FieldValue
    epoch: int = 0


@_kind(11)
class Deleted(Message):
    """``[11, name, req, seq, restate, epoch]``: a PV deleted.  ``restate``: no change,
    the PV was not there (after a refused Write), with the current ``seq``."""

    name: str
    req: int
    seq: int
    restate: bool = False
    epoch: int = 0


@_kind(12)
class Reject(Message):
    """``[12, req, name, reason, epoch]``: a request refused, and why."""

    req: int
    name: str
    reason: str
    epoch: int = 0


#: Why a shard refuses what comes through a connection it no longer serves (see
#: shard/admission.py): an earlier connection of a front-end that said HELLO again, one
#: that missed a change, one silent too long.  A front-end refused so on its live
#: connection reconnects and resyncs at once.
FENCED = "sent before the broker reconnected"
DROPPED = "the shard missed sending this broker a change; it resyncs on reconnecting"
SILENT = "the broker was silent too long; it resyncs on reconnecting"
NOT_SERVED = frozenset({FENCED, DROPPED, SILENT})


@_kind(13)
class SnapshotBegin(Message):
    """``[13, req, seq, epoch]``: the answer to a Hello; Snapshots follow."""

    req: int
    seq: int
    epoch: int = 0


@_kind(14)
class Snapshot(Message):
    """``[14, name, stamp, data, fields, epoch]``: one PV of a snapshot, with its stored
    fields."""

    name: str
    stamp: float
    data: np.ndarray
    fields: dict
    epoch: int = 0


@_kind(15)
class SnapshotEnd(Message):
    """``[15, req, seq, store_error, epoch]``: the snapshot is complete and consistent with
    ``seq``.  ``store_error``: why the shard's store cannot be written ("" while it can)."""

    req: int
    seq: int
    store_error: str
    epoch: int = 0


@_kind(16)
class Pong(Message):
    """``[16, req, seq, pvs, store_error, pid, puts, saved_at, flush, store_bytes,
    epoch, now]``: the shard's figures, in answer to a Ping, or of its own (``req`` 0)
    when ``store_error`` changes.  ``flush``: the histogram of autosave flush times
    (Histogram.as_dict); ``store_bytes``: nil without an autosave; ``now``: the shard's
    POSIX time as it answered, which its front-ends learn its clock from (0.0: unsaid)."""

    req: int
    seq: int
    pvs: int
    store_error: str
    pid: int
    puts: int
    saved_at: float
    flush: dict
    store_bytes: int | None = None
    epoch: int = 0
    now: float = 0.0


@_kind(20)
class Applied(Message):
    """``[20, writes, seq, epoch]``: the shard has applied (or refused) the first
    ``writes`` WRITEs this connection of the broker sent; ``seq`` is its sequence number
    after them.  While the shard serves other brokers too, whose changes it publishes:
    a broker that has written a PV after the change of another broker arrives knows by it
    whether its own write came later (see ShardSync).  So it goes before the next message
    the broker is sent, not alone (see Outbox._tell_applied)."""

    writes: int
    seq: int
    epoch: int = 0


@_kind(21)
class Confirm(Message):
    """``[21, token, epoch]``: answer with a Shown ``token`` once every change before this
    is shown; an answer to another front-end waits for it (see Watch)."""

    token: int
    epoch: int = 0


@_kind(24)
class Wanted(Message):
    """``[24, name, on, epoch]``: another front-end now follows ``name`` (``on``), or none
    does any longer; ``name`` "": every PV (a front-end is served that hears of every
    change).  A front-end sends its plain puts to a wanted PV at once, as the others show
    them only once the shard has applied them; the rest go in batches (see Follows)."""

    name: str
    on: bool
    epoch: int = 0


#: Every message kind, by its number on the wire (WriteRun is the codec's own).
KINDS: dict[int, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Ping,
        Follow,
        Watch,
        Shown,
        Put,
        Write,
        Delete,
        SetField,
        Update,
        Ack,
        FieldChanged,
        Deleted,
        Reject,
        SnapshotBegin,
        Snapshot,
        SnapshotEnd,
        Pong,
        Applied,
        Confirm,
        Wanted,
    )
}

#: Why a shard drops a request that reached it past its expiry: the broker fails it at
#: its deadline, EXPIRY_MARGIN later, if the REJECT does not come first (a shard that
#: was stopped).  A front-end files it as the timeout it is.
EXPIRED = "expired: it came after its deadline, and the broker fails it"
