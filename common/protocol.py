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

A run of one-element Writes of one dtype (the commonest traffic by far: a stream of
scalar puts) is one entry of its own, column by column::

    [WRITE_RUN, dtype, [name, ...], [req, ...], stamps, values, expires]

``stamps`` is the raw buffer of one little-endian float64 per put and ``values`` that
of one element of ``dtype`` per put: a thousand puts cost a few list and buffer
operations instead of a thousand entries.  ``expires`` is the earliest expiry of the
run's Writes that wait for an answer (0.0: none waits).  It decodes to one WriteRun
(only where the receiver takes runs: the shard).

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

from carelay.common.messages import KINDS, Write

BATCH_TAG = b"CRB2"
#: Arrays up to this many bytes travel inside a batch's entry.
INLINE_MAX = 4096
#: Most messages, and most entry bytes, a sender puts in one batch.
BATCH_MAX = 1000
BATCH_MAX_BYTES = 1 << 20
#: The kind number of a WriteRun entry.
WRITE_RUN = 7

#: The dtypes a data frame may carry.
ALLOWED_DTYPES = frozenset({"<f8", "<i4", "|u1", "|S40"})
#: Upper bound on any element count on the wire (an entry is checked against it
#: before anything is allocated).
MAX_WIRE_ELEMENTS = 100_000_000
_MAX_BATCH_HEADER_BYTES = 16 << 20
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


class ProtocolError(ValueError):
    """A message that does not fit the protocol."""


class WriteRun:
    """One-element Writes of one dtype, in order, sent as one batch entry (see above).

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

    def _entry(self) -> list:
        raw = np.asarray(self.values, dtype=self.dtype)
        if raw.shape != (len(self.names),):
            raise ProtocolError("a WRITE run needs one element of its dtype per name")
        return [
            WRITE_RUN,
            self.dtype.str,
            self.names,
            self.reqs,
            np.asarray(self.stamps, dtype="<f8").tobytes(),
            raw.tobytes(),
            float(self.expires),
        ]


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


# -- sending --------------------------------------------------------------------------

#: Data frames at least this large are sent without a copy; smaller ones are cheaper copied.
ZERO_COPY_MIN = 65536
_SNDMORE = 2  # zmq.SNDMORE; this module does not need zmq itself


def send_frames(sock, frames: list, flags: int = 0) -> None:
    """Send ``frames`` as one multipart message on the ZeroMQ socket ``sock``: large
    buffers without a copy, the rest copied.  ``flags`` (e.g. NOBLOCK) apply to each
    frame; a ROUTER's peer identity is simply the first frame."""
    last = len(frames) - 1
    for k, frame in enumerate(frames):
        sock.send(
            frame,
            flags | _SNDMORE if k < last else flags,
            copy=len(frame) < ZERO_COPY_MIN,
        )


def _check_wire_dtype(data) -> None:
    """``data``: an array or a dtype."""
    dtype = data if isinstance(data, np.dtype) else data.dtype
    if dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {dtype.str} is not allowed on the wire")


def _data_frame(data: np.ndarray) -> memoryview:
    """The raw bytes of ``data`` as a frame of its own, without a copy where it can."""
    return memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")


def encode_batch(msgs: list) -> list:
    """Frames for a batch of ``msgs`` (messages and WriteRuns); small arrays go inline."""
    entries = []
    frames: list = [b""]
    for msg in msgs:
        if type(msg) is WriteRun:
            _check_wire_dtype(msg.dtype)
            entries.append(msg._entry())
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
    """``msgs`` cut into batches of at most about BATCH_MAX messages (a WriteRun counts
    its puts; keep runs to BATCH_MAX) and about BATCH_MAX_BYTES."""
    out: list[list] = []
    cur: list = []
    size = count = 0
    for msg in msgs:
        if type(msg) is WriteRun:
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


def decode_batch(frames: list, runs: bool = False) -> list:
    """The messages of a batch, in order; ProtocolError if any part does not fit (then
    none of them is returned).  ``runs``: WRITE_RUN entries are taken (as WriteRuns),
    else refused."""
    try:
        return _decode_batch(frames, runs)
    except ProtocolError:
        raise
    except Exception as e:  # anything odd in untrusted input is a protocol error
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}") from None


def _decode_batch(frames: list, runs: bool) -> list:
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
        if kind == WRITE_RUN and type(kind) is int and runs:
            out.append(_write_run(entry))
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
    dt = _DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"dtype {dtype!r} is not allowed")
    if type(count) is not int or not 0 <= count <= MAX_WIRE_ELEMENTS:
        raise ProtocolError(f"count {count!r} out of range")
    if type(buf) is bytes:
        buf = memoryview(buf)
    elif type(buf) is not memoryview:
        raise ProtocolError("inline data must be bytes")
    if buf.nbytes != count * dt.itemsize:
        raise ProtocolError(f"data holds {buf.nbytes} bytes, not {count} x {dt.itemsize}")
    return np.frombuffer(buf, dtype=dt, count=count)


def _write_run(entry: list) -> WriteRun:
    """A validated WriteRun from its batch entry."""
    if len(entry) != 7:
        raise ProtocolError("a run entry needs 7 fields")
    _, dtype, names, reqs, stamps, values, expires = entry
    dt = _DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"dtype {dtype!r} is not allowed")
    if type(names) is not list or type(reqs) is not list:
        raise ProtocolError("a run's names and request numbers must be lists")
    n = len(names)
    if not n or len(reqs) != n:
        raise ProtocolError("a run needs as many request numbers as names, and some")
    if not all(type(name) is str for name in names):
        raise ProtocolError("a run's names must be text")
    if not all(type(req) is int and req >= 0 for req in reqs):
        raise ProtocolError("a run's req must be non-negative integers")
    if type(stamps) is not bytes or len(stamps) != 8 * n:
        raise ProtocolError("a run needs one float64 stamp per name")
    if type(values) is not bytes or len(values) != n * dt.itemsize:
        raise ProtocolError(f"a run needs one {dtype} value per name")
    if type(expires) is not float or not expires >= 0.0:
        raise ProtocolError("a run's expiry must be a non-negative float")
    return WriteRun(
        dt,
        names,
        reqs,
        np.frombuffer(stamps, dtype="<f8").tolist(),
        np.frombuffer(values, dtype=dt),
        expires,
    )
