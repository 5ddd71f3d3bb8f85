"""The broker-shard wire protocol: the codec of every message (see carelay.common.messages).

Messages travel in batches, so that a burst of puts costs one ZeroMQ message and one
msgpack call per hop rather than one per put::

    frame 0   BATCH_TAG + msgpack list of entries, one per message: [KIND, field, ...]
    frame 1.. the arrays too large to travel inline, in entry order

(a ROUTER socket adds the peer identity in front; the caller strips it; the tag shares
the entries' frame: every ZeroMQ frame costs a send call, and a batch of scalar puts is
then a single frame).  Each message kind's class lists its fields in its docstring;
an array field is ``[dtype, count, inline]``, where ``inline`` is the raw buffer when it
is at most INLINE_MAX bytes, else nil and the array is the next data frame.

A run of one-element messages of one dtype (a stream of scalar puts, and the same puts
published to the other front-ends) is one entry of its own, column by column: see
carelay.common.runs.

Arrays are never msgpacked: a data frame is the array's own buffer, sent without a copy
and rebuilt with ``numpy.frombuffer``.  ``decode_batch`` validates the whole batch
before it returns any of it (a batch is applied whole or dropped) and raises
ProtocolError, never anything else.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import msgpack
import numpy as np

from carelay.common.messages import KINDS
from carelay.common.runs import (
    ALLOWED_DTYPES,
    UPDATE_RUN,
    WRITE_RUN,
    ProtocolError,
    UpdateRun,
    WriteRun,
    update_run,
    wire_dtype,
    write_run,
)

__all__ = [
    "ALLOWED_DTYPES",
    "BATCH_MAX",
    "BATCH_MAX_BYTES",
    "BATCH_TAG",
    "INLINE_MAX",
    "UPDATE_RUN",
    "WRITE_RUN",
    "ProtocolError",
    "UpdateRun",
    "WriteRun",
    "batches",
    "decode_batch",
    "encode_batch",
    "send_frames",
]

BATCH_TAG = b"CRB2"
#: Arrays up to this many bytes travel inside a batch's entry.
INLINE_MAX = 4096
#: Most messages, and most entry bytes, a sender puts in one batch.
BATCH_MAX = 1000
BATCH_MAX_BYTES = 1 << 20
#: Upper bound on any element count on the wire (an entry is checked against it
#: before anything is allocated).
MAX_WIRE_ELEMENTS = 100_000_000
_MAX_BATCH_HEADER_BYTES = 16 << 20


# -- what each field may hold (see carelay.common.messages) ---------------------------


def _uint(v: Any) -> bool:
    return type(v) is int and v >= 0


#: The exact type of a field whose check is its type alone, by its annotation (the array
#: field travels as a list, checked apart).
_EXACT = {"str": str, "int": int, "float": float, "bool": bool, "np.ndarray": list}

#: The check of a field, by its annotation; None marks the array field.
_CHECKS = {
    "str": lambda v: type(v) is str,
    "int": _uint,
    "float": lambda v: type(v) is float,
    "bool": lambda v: type(v) is bool,
    "int | None": lambda v: v is None or _uint(v),
    "FieldValue": lambda v: type(v) in (str, int, float),
    "dict": lambda v: type(v) is dict and all(type(k) is str for k in v),
    "np.ndarray": None,
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """How one message kind is laid out in its entry."""

    cls: type
    names: tuple[str, ...]
    checks: tuple
    #: Where the array field is among the fields, or -1.
    data: int
    get: Any
    #: The exact type of each field, or None where a field admits more than one: the
    #: fields of a message that match it only need their integers checked (``ints``).
    signature: tuple | None
    ints: Any

    @classmethod
    def of(cls, kind: type) -> _Layout:
        types = [f.type for f in dataclasses.fields(kind)]
        names = tuple(f.name for f in dataclasses.fields(kind))
        checks = tuple(_CHECKS[t] for t in types)
        data = checks.index(None) if None in checks else -1
        getter = operator.attrgetter(*names)
        get = getter if len(names) > 1 else (lambda msg: (getter(msg),))
        exact = tuple(_EXACT.get(t) for t in types)
        signature = exact if None not in exact else None
        ints = [k for k, t in enumerate(types) if t == "int"]
        pick = operator.itemgetter(*ints)
        return cls(
            kind,
            names,
            checks,
            data,
            get,
            signature,
            pick if len(ints) > 1 else (lambda values: (pick(values),)),
        )


_LAYOUTS = {kind: _Layout.of(cls) for kind, cls in KINDS.items()}
_BY_CLASS = {layout.cls: layout for layout in _LAYOUTS.values()}
_RUNS = (WriteRun, UpdateRun)


# -- sending --------------------------------------------------------------------------

#: Data frames at least this large are sent without a copy; smaller ones are cheaper copied.
ZERO_COPY_MIN = 65536
_SNDMORE = 2  # zmq.SNDMORE; this module does not need zmq itself


def send_frames(sock, frames: list, flags: int = 0) -> None:
    """Send ``frames`` as one multipart message on the ZeroMQ socket ``sock``: large
    buffers without a copy, the rest copied.  ``flags`` (e.g. NOBLOCK) apply to each
    frame; a ROUTER's peer identity is simply the first frame."""
    # pyzmq's flags are enum members, whose ``|`` runs in Python: about 0.5 us each time,
    # twenty times an int's, and a put's path sends several.
    flags = int(flags)
    more = flags | _SNDMORE
    last = len(frames) - 1
    for k, frame in enumerate(frames):
        sock.send(frame, more if k < last else flags, copy=len(frame) < ZERO_COPY_MIN)


def _check_wire_dtype(data) -> None:
    """``data``: an array or a dtype."""
    dtype = data if isinstance(data, np.dtype) else data.dtype
    if dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {dtype.str} is not allowed on the wire")


def _data_frame(data: np.ndarray) -> memoryview:
    """The raw bytes of ``data`` as a frame of its own, without a copy where it can."""
    return memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")


def encode_batch(msgs: list) -> list:
    """Frames for a batch of ``msgs`` (messages and runs); small arrays go inline."""
    entries = []
    frames: list = [b""]
    for msg in msgs:
        if type(msg) in _RUNS:
            _check_wire_dtype(msg.dtype)
            entries.append(msg.entry())
            continue
        layout = _BY_CLASS[type(msg)]
        entry = [layout.cls.KIND, *layout.get(msg)]
        if layout.data >= 0:
            data = entry[1 + layout.data]
            _check_wire_dtype(data)
            if data.nbytes <= INLINE_MAX:
                inline = data.tobytes()
            else:
                inline = None
                frames.append(_data_frame(data))
            entry[1 + layout.data] = [data.dtype.str, int(data.size), inline]
        entries.append(entry)
    frames[0] = BATCH_TAG + msgpack.packb(entries, use_bin_type=True)
    return frames


def batches(msgs: list) -> list[list]:
    """``msgs`` cut into batches of at most about BATCH_MAX messages (a run counts its
    messages; keep runs to BATCH_MAX) and about BATCH_MAX_BYTES."""
    out: list[list] = []
    cur: list = []
    size = count = 0
    for msg in msgs:
        if type(msg) in _RUNS:
            k = len(msg)
            n = k * (32 + msg.dtype.itemsize)
        else:
            k = 1
            data = getattr(msg, "data", None)
            n = 64 + (data.nbytes if data is not None else 0)
        if cur and (count + k > BATCH_MAX or size + n > BATCH_MAX_BYTES):
            out.append(cur)
            cur, size, count = [], 0, 0
        cur.append(msg)
        size += n
        count += k
    if cur:
        out.append(cur)
    return out


# -- receiving ------------------------------------------------------------------------


def _buffer(frame: Any) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def decode_batch(frames: list, to_shard: bool = False) -> list:
    """The messages of a batch, in order; ProtocolError if any part does not fit (then
    none of them is returned).  ``to_shard``: a batch a shard takes, whose runs are
    WRITE_RUNs; else one a front-end takes, whose runs are UPDATE_RUNs."""
    try:
        return _decode_batch(frames, WRITE_RUN if to_shard else UPDATE_RUN)
    except ProtocolError:
        raise
    except Exception as e:  # anything odd in untrusted input is a protocol error
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}") from None


def _decode_batch(frames: list, run_kind: int) -> list:
    head = _buffer(frames[0])
    if bytes(head[: len(BATCH_TAG)]) != BATCH_TAG:
        raise ProtocolError(f"unknown protocol tag {bytes(head[:16])!r}")
    raw = head[len(BATCH_TAG) :]
    if not raw.nbytes:
        raise ProtocolError("a batch needs its entries")
    if raw.nbytes > _MAX_BATCH_HEADER_BYTES:
        raise ProtocolError("batch entries too large")
    entries = msgpack.unpackb(
        raw, raw=False, strict_map_key=True, max_array_len=BATCH_MAX * 2, max_map_len=64
    )
    if type(entries) is not list or not entries:
        raise ProtocolError("a batch must be a non-empty list of entries")
    out = []
    next_frame = 1
    for entry in entries:
        if type(entry) is not list or not entry:
            raise ProtocolError("a batch entry must be a non-empty list")
        kind = entry[0]
        if kind == run_kind and type(kind) is int:
            out.append(write_run(entry) if kind == WRITE_RUN else update_run(entry))
            continue
        layout = _LAYOUTS.get(kind) if type(kind) is int else None
        if layout is None:
            raise ProtocolError(f"unknown message kind {kind!r}")
        values = entry[1:]
        if len(values) != len(layout.names):
            raise ProtocolError(f"{layout.cls.__name__} needs {len(layout.names)} fields")
        # Once per message on both sides: one comparison of types where it can.
        if tuple(map(type, values)) != layout.signature or min(layout.ints(values)) < 0:
            _check_fields(layout, values)
        if layout.data >= 0:
            spec = values[layout.data]
            if type(spec) is list and len(spec) == 3 and spec[2] is None:
                if next_frame >= len(frames):
                    raise ProtocolError("batch declares more data frames than came")
                spec = [*spec[:2], _buffer(frames[next_frame])]
                next_frame += 1
            values[layout.data] = _array(spec)
        out.append(layout.cls(*values))
    if next_frame != len(frames):
        raise ProtocolError(f"batch carries {len(frames) - next_frame} data frames too many")
    return out


def _check_fields(layout: _Layout, values: list) -> None:
    """Each field of an entry against its check: ProtocolError names the first that fails."""
    for name, check, value in zip(layout.names, layout.checks, values, strict=True):
        if check is not None and not check(value):
            raise ProtocolError(f"{layout.cls.__name__}.{name} cannot be {value!r:.40}")


def _array(spec: Any) -> np.ndarray:
    """The array that ``[dtype, count, buffer]`` describes, validated."""
    if type(spec) is not list or len(spec) != 3:
        raise ProtocolError("data must be [dtype, count, inline]")
    dtype, count, buf = spec
    dt = wire_dtype(dtype)
    if type(count) is not int or not 0 <= count <= MAX_WIRE_ELEMENTS:
        raise ProtocolError(f"count {count!r} out of range")
    if type(buf) is bytes:
        buf = memoryview(buf)
    elif type(buf) is not memoryview:
        raise ProtocolError("inline data must be bytes")
    if buf.nbytes != count * dt.itemsize:
        raise ProtocolError(f"data holds {buf.nbytes} bytes, not {count} x {dt.itemsize}")
    return np.frombuffer(buf, dtype=dt, count=count)
