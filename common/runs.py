"""Runs: one-element messages of one dtype, sent column by column (see protocol.py).

The commonest traffic by far is a stream of scalar changes: puts from a broker to its
shard, and the same puts published by the shard to every other front-end.  Each travels
as one batch entry per run rather than one per message, so that a thousand puts cost a
few list and buffer operations to encode and to decode instead of a thousand entries::

    [WRITE_RUN, dtype, [name, ...], [req, ...], stamps, values, expires]
    [UPDATE_RUN, dtype, [name, ...], seqs, stamps, values, epoch]

``stamps`` is the raw buffer of one little-endian float64 per message, ``seqs`` of one
little-endian uint64, ``values`` of one element of ``dtype``.  A WRITE_RUN's ``expires``
is the earliest expiry of its Writes that wait for an answer (0.0: none waits).  An
UPDATE_RUN holds only published changes: no request number, no reset, no creation, the
value one element (a scalar's whole value, or the element appended to a buffer).

A shard takes WRITE_RUNs, a front-end UPDATE_RUNs; each entry is validated whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from carelay.common.messages import Update, Write

#: The kind number of a WriteRun entry, and of an UpdateRun entry.
WRITE_RUN = 7
UPDATE_RUN = 8

#: The most messages in one run: protocol.BATCH_MAX, the most a batch holds (a run
#: counts its messages there), well within the names a decoder takes in one list
#: (BATCH_MAX * 2).  A longer stretch, such as the answers and updates a shard's read
#: gate held back from several batches, goes as several runs.
RUN_MAX = 1000

#: The dtypes a data frame or a run may carry.
ALLOWED_DTYPES = frozenset({"<f8", "<i4", "|u1", "|S40"})
DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


class ProtocolError(ValueError):
    """A message that does not fit the protocol."""


class WriteRun:
    """One-element Writes of one dtype, in order, sent as one batch entry.

    ``values`` holds the elements in order: a list of scalars while a sender fills the
    run, one array of ``dtype`` once it is decoded; both are read alike."""

    __slots__ = ("dtype", "names", "reqs", "stamps", "values", "expires")

    def __init__(
        self, dtype: np.dtype, names=None, reqs=None, stamps=None, values=None, expires=0.0
    ) -> None:
        self.dtype = dtype
        self.names: list[str] = [] if names is None else names
        self.reqs: list[int] = [] if reqs is None else reqs
        self.stamps: list[float] = [] if stamps is None else stamps
        self.values = [] if values is None else values
        #: The earliest expiry of the WRITEs with ``req`` (0.0: none of them waits).
        self.expires: float = expires

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, req: int, stamp: float, value: np.ndarray) -> None:
        """Append a WRITE of the one-element array ``value``, of the run's dtype."""
        self.names.append(name)
        self.reqs.append(req)
        self.stamps.append(stamp)
        self.values.append(value[0])

    def messages(self) -> list[Write]:
        """The run as single Writes (each that waits carrying the run's expiry)."""
        return [
            Write(name, req, stamp, np.array([value], self.dtype), self.expires if req else 0.0)
            for name, req, stamp, value in zip(
                self.names, self.reqs, self.stamps, self.values, strict=True
            )
        ]

    def entry(self) -> list:
        return [
            WRITE_RUN,
            self.dtype.str,
            self.names,
            self.reqs,
            np.asarray(self.stamps, dtype="<f8").tobytes(),
            _column(self.values, self.dtype, len(self.names)),
            float(self.expires),
        ]


class UpdateRun:
    """Published one-element Updates of one dtype and epoch, in order, as one entry.

    ``values`` is a list of one-element arrays while the shard fills the run, one array
    of ``dtype`` once it is decoded; ``value(k)`` reads either as a one-element array."""

    __slots__ = ("dtype", "names", "seqs", "stamps", "values", "epoch")

    def __init__(
        self, dtype: np.dtype, epoch: int, names=None, seqs=None, stamps=None, values=None
    ) -> None:
        self.dtype = dtype
        self.epoch = epoch
        self.names: list[str] = [] if names is None else names
        self.seqs: list[int] = [] if seqs is None else seqs
        self.stamps: list[float] = [] if stamps is None else stamps
        self.values = [] if values is None else values

    def __len__(self) -> int:
        return len(self.names)

    def add(self, msg: Update) -> None:
        self.names.append(msg.name)
        self.seqs.append(msg.seq)
        self.stamps.append(msg.stamp)
        self.values.append(msg.data[0])

    def value(self, k: int) -> np.ndarray:
        """The ``k``-th value, a one-element array (a view of a decoded run)."""
        values = self.values
        if type(values) is np.ndarray:
            return values[k : k + 1]
        return np.array([values[k]], self.dtype)

    def messages(self) -> list[Update]:
        """The run as single Updates."""
        return [
            Update(name, 0, seq, stamp, self.value(k), epoch=self.epoch)
            for k, (name, seq, stamp) in enumerate(
                zip(self.names, self.seqs, self.stamps, strict=True)
            )
        ]

    def entry(self) -> list:
        return [
            UPDATE_RUN,
            self.dtype.str,
            self.names,
            np.asarray(self.seqs, dtype="<u8").tobytes(),
            np.asarray(self.stamps, dtype="<f8").tobytes(),
            _column(self.values, self.dtype, len(self.names)),
            int(self.epoch),
        ]


def _column(values, dtype: np.dtype, n: int) -> bytes:
    raw = np.asarray(values, dtype=dtype)
    if raw.shape != (n,):
        raise ProtocolError("a run needs one element of its dtype per name")
    return raw.tobytes()


def _one(msg) -> bool:
    """Whether ``msg`` is a published one-element Update, which a run can carry."""
    return (
        type(msg) is Update
        and not msg.req
        and not msg.reset
        and not msg.created
        and msg.data.shape == (1,)
    )


def update_runs(msgs: list) -> list:
    """``msgs`` with each stretch of two or more published one-element Updates of one
    dtype and epoch as UpdateRuns of at most RUN_MAX each; the order stays."""
    out: list = []
    run = None
    for k, msg in enumerate(msgs):
        if not _one(msg):
            out.append(msg)
            run = None
        elif (
            run is not None
            and len(run.names) < RUN_MAX
            and msg.data.dtype == run.dtype
            and msg.epoch == run.epoch
        ):
            run.add(msg)
        elif k + 1 < len(msgs) and _one(nxt := msgs[k + 1]) and nxt.data.dtype == msg.data.dtype:
            run = UpdateRun(msg.data.dtype, msg.epoch)
            run.add(msg)
            out.append(run)
        else:
            out.append(msg)
            run = None
    return out


# -- decoding -------------------------------------------------------------------------


def wire_dtype(dtype: Any) -> np.dtype:
    """The dtype a decoded entry names, if the wire allows it; ProtocolError if not."""
    dt = DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"dtype {dtype!r} is not allowed")
    return dt


def _names(names: Any) -> int:
    if type(names) is not list or not names:
        raise ProtocolError("a run needs a list of names, and some")
    if not all(type(name) is str for name in names):
        raise ProtocolError("a run's names must be text")
    return len(names)


def _columns(stamps: Any, values: Any, n: int, dt: np.dtype) -> tuple[list, np.ndarray]:
    if type(stamps) is not bytes or len(stamps) != 8 * n:
        raise ProtocolError("a run needs one float64 stamp per name")
    if type(values) is not bytes or len(values) != n * dt.itemsize:
        raise ProtocolError(f"a run needs one {dt.str} value per name")
    return np.frombuffer(stamps, dtype="<f8").tolist(), np.frombuffer(values, dtype=dt)


def _fields(entry: list) -> tuple[np.dtype, int]:
    """The dtype and the length of a run entry, checked with its shape and its names."""
    if len(entry) != 7:
        raise ProtocolError("a run entry needs 7 fields")
    return wire_dtype(entry[1]), _names(entry[2])


def write_run(entry: list) -> WriteRun:
    """A validated WriteRun from its batch entry."""
    dt, n = _fields(entry)
    _, _, names, reqs, stamps, values, expires = entry
    if type(reqs) is not list or len(reqs) != n:
        raise ProtocolError("a run needs as many request numbers as names")
    if not all(type(req) is int and req >= 0 for req in reqs):
        raise ProtocolError("a run's req must be non-negative integers")
    stamps, values = _columns(stamps, values, n, dt)
    if type(expires) is not float or not expires >= 0.0:
        raise ProtocolError("a run's expiry must be a non-negative float")
    return WriteRun(dt, names, reqs, stamps, values, expires)


def update_run(entry: list) -> UpdateRun:
    """A validated UpdateRun from its batch entry."""
    dt, n = _fields(entry)
    _, _, names, seqs, stamps, values, epoch = entry
    if type(seqs) is not bytes or len(seqs) != 8 * n:
        raise ProtocolError("an update run needs one uint64 seq per name")
    stamps, values = _columns(stamps, values, n, dt)
    if type(epoch) is not int or epoch < 0:
        raise ProtocolError("an update run's epoch must be a non-negative integer")
    return UpdateRun(dt, epoch, names, np.frombuffer(seqs, dtype="<u8").tolist(), stamps, values)
