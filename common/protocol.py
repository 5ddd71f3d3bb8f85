"""The broker-shard wire protocol: one codec for every message.

A message travels as a ZeroMQ multipart message::

    frame 0   PROTOCOL_TAG                     b"CRL1"
    frame 1   header, msgpack list             [op, name, req, seq, epoch, stamp,
                                                length, reason, info, dtype, count]
    frame 2   data (only when dtype != "")     raw little-endian array buffer

(a ROUTER socket adds the peer identity in front; the caller strips it).

Many messages travel together as one batch, so that a burst of puts costs
one ZeroMQ message and one msgpack call per hop rather than one per put::

    frame 0   BATCH_TAG + msgpack list of headers, each the fields above plus ``inline``
    frame 1.. data of the large arrays, in header order

(the tag shares the header's frame: every ZeroMQ frame costs a send call, and a
batch of scalar puts is then a single frame).

``inline`` is the raw array buffer itself when it is at most INLINE_MAX
bytes (a scalar put carries its 8 bytes there), else nil and the array is
the next data frame.  ``decode_batch`` reads both forms and validates the
whole batch before returning any of it: a batch is applied whole or dropped.

A run of one-element WRITEs of one dtype (the commonest traffic by far: a
stream of scalar puts) is one entry of its own, column by column::

    [WRITE, dtype, [name, ...], [req, ...], stamps, values(, expires)]

``stamps`` is the raw buffer of one little-endian float64 per put and
``values`` that of one element of ``dtype`` per put: a thousand puts cost a
few list and buffer operations instead of a thousand headers.  ``expires``
is the earliest expiry of the run's WRITEs that wait for an answer; a run in
which none waits leaves it out.  It decodes to one WriteRun (only where the receiver takes runs: the
shard).

Header fields:

- ``op``: an Op.
- ``name``: full PV name ("" where none).
- ``req``: the broker's request number, echoed in the answer (0: none wanted).
- ``seq``: the shard's change sequence number (UPDATE, DELETED, SNAPSHOT_END, PONG).
- ``epoch``: the shard's start id; a new epoch means the shard restarted.
- ``stamp``: POSIX seconds of the put (PUT, WRITE: when the broker took it; 0 in a
  PUT leaves it to the shard's clock) or of the change (UPDATE, SNAPSHOT).
- ``length``: elements the PV holds after the change.
- ``reason``: text, for REJECT.
- ``info``: a small dict of str to int/float/str (PONG counters, PUT flags).
  A request that waits for an answer (PUT, WRITE with ``req``, SET_FIELD,
  DELETE) carries ``expires``: POSIX seconds after which the broker has
  failed it, so the shard drops it with a REJECT "expired" instead of
  applying it.  A HELLO carries ``token``, the relay's token, where the shard
  asks for one; a shard serves no peer before that HELLO.
- ``dtype``, ``count``: numpy dtype string and element count of frame 2.

Operations, broker to shard: HELLO (send me a snapshot), PUT (apply a value;
creates the PV on its first put; info "callback" when a client waits for it,
which a shard whose store cannot be written refuses), WRITE (apply a put to
an existing PV that the broker has already applied to its mirror: the shard
answers only when ``req`` is set, with ACK, or when it refuses the put, with
REJECT followed by the PV as the shard holds it: an UPDATE with info "reset"
and "restate", or a DELETED with info "restate"; a restatement is no change
and carries the current ``seq``; a WRITE with ``req`` is refused while the
shard's store cannot be written),
DELETE, SET_FIELD (info: field, value; the field RES empties a buffer), PING.
Shard to broker: UPDATE (an applied put: for a buffer the appended elements,
else the whole value; info "reset" when a buffer was emptied first), ACK (a
WRITE applied), FIELD (an applied field change, info: field, value),
DELETED, REJECT (a refused request), SNAPSHOT_BEGIN, SNAPSHOT (one PV; info:
fields), SNAPSHOT_END (with the sequence number the snapshot is consistent
with), PONG.  SNAPSHOT_END and PONG carry info "store_error": why the shard's
store cannot be written, "" while it can; a shard also sends a PONG of its own
(``req`` 0) when that changes.

The broker stamps a PUT or WRITE with the time it took the put (``stamp``);
the shard keeps that stamp, so a value's time is the same in the broker's
mirror, in the shard and in the autosave.

Arrays are never msgpacked: the data frame is the array's own buffer, sent
without a copy and rebuilt with ``numpy.frombuffer``.  ``decode`` validates
everything and raises ProtocolError, never anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np

PROTOCOL_TAG = b"CRL1"
BATCH_TAG = b"CRB1"
#: Arrays up to this many bytes travel inside a batch's header.
INLINE_MAX = 4096
#: Most messages, and most header bytes, a sender puts in one batch.
BATCH_MAX = 1000
BATCH_MAX_BYTES = 1 << 20

#: The dtypes a data frame may carry.
ALLOWED_DTYPES = frozenset({"<f8", "<i4", "|u1", "|S40"})
#: Upper bound on any element count on the wire (a header is checked against it
#: before anything is allocated).
MAX_WIRE_ELEMENTS = 100_000_000
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BATCH_HEADER_BYTES = 16 << 20
_HEADER_FIELDS = 11


class Op(IntEnum):
    HELLO = 1
    PUT = 2
    DELETE = 3
    PING = 4
    SET_FIELD = 5
    WRITE = 6
    UPDATE = 10
    DELETED = 11
    REJECT = 12
    SNAPSHOT_BEGIN = 13
    SNAPSHOT = 14
    SNAPSHOT_END = 15
    PONG = 16
    FIELD = 17
    ACK = 18


class ProtocolError(ValueError):
    """A message that does not fit the protocol."""


@dataclass(slots=True)
class Message:
    """One protocol message; see the module docstring for the fields."""

    op: Op
    name: str = ""
    req: int = 0
    seq: int = 0
    epoch: int = 0
    stamp: float = 0.0
    length: int = 0
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    data: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        if (self.data is None) != (other.data is None):
            return False
        if self.data is not None and (
            self.data.dtype != other.data.dtype or not np.array_equal(self.data, other.data)
        ):
            return False
        return self._header()[:-2] == other._header()[:-2]

    def _header(self) -> list:
        if self.data is None:
            dtype, count = "", 0
        else:
            dtype, count = self.data.dtype.str, int(self.data.size)
        return [
            int(self.op),
            self.name,
            self.req,
            self.seq,
            self.epoch,
            float(self.stamp),
            self.length,
            self.reason,
            self.info,
            dtype,
            count,
        ]


class WriteRun:
    """One-element WRITEs of one dtype, in order, sent as one batch entry (see above).

    ``values`` holds the elements in order: a list of scalars while a sender fills the
    run, one array of ``dtype`` once it is decoded; both are read alike."""

    __slots__ = ("dtype", "names", "reqs", "stamps", "values", "expires")
    op = None  # not a Message: a receiver that takes no runs never sees one

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

    def messages(self) -> list[Message]:
        """The run as single WRITE messages (each that waits carrying the run's expiry)."""
        return [
            Message(
                Op.WRITE,
                name,
                req=req,
                stamp=stamp,
                info={"expires": self.expires} if req and self.expires else {},
                data=np.array([value], self.dtype),
            )
            for name, req, stamp, value in zip(
                self.names, self.reqs, self.stamps, self.values, strict=True
            )
        ]

    def _entry(self) -> list:
        raw = np.asarray(self.values, dtype=self.dtype)
        if raw.shape != (len(self.names),):
            raise ProtocolError("a WRITE run needs one element of its dtype per name")
        entry = [
            int(Op.WRITE),
            self.dtype.str,
            self.names,
            self.reqs,
            np.asarray(self.stamps, dtype="<f8").tobytes(),
            raw.tobytes(),
        ]
        if self.expires:
            entry.append(float(self.expires))
        return entry


#: Fields of a run entry: without, and with, its expiry.
_RUN_FIELDS = (6, 7)

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


def encode(msg: Message) -> list:
    """Frames for ``msg``: tag, header and, for an array, its raw buffer."""
    frames: list = [PROTOCOL_TAG, msgpack.packb(msg._header(), use_bin_type=True)]
    if msg.data is not None:
        _check_wire_dtype(msg.data)
        frames.append(_data_frame(msg.data))
    return frames


def _check_wire_dtype(data) -> None:
    """``data``: an array or a dtype."""
    dtype = data if isinstance(data, np.dtype) else data.dtype
    if dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {dtype.str} is not allowed on the wire")


def _data_frame(data: np.ndarray) -> memoryview:
    """The raw bytes of ``data`` as a frame of its own, without a copy where it can."""
    return memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")


def encode_batch(msgs: list) -> list:
    """Frames for a batch of ``msgs`` (Messages and WriteRuns; see the module docstring);
    small arrays go inline."""
    headers = []
    frames: list = [b""]
    for msg in msgs:
        if type(msg) is WriteRun:
            _check_wire_dtype(msg.dtype)
            headers.append(msg._entry())
            continue
        h = msg._header()
        data = msg.data
        if data is None:
            h.append(None)
        else:
            _check_wire_dtype(data)
            if data.nbytes <= INLINE_MAX:
                h.append(data.tobytes())
            else:
                h.append(None)
                frames.append(_data_frame(data))
        headers.append(h)
    frames[0] = BATCH_TAG + msgpack.packb(headers, use_bin_type=True)
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
            n = 64 + (msg.data.nbytes if msg.data is not None else 0)
        if cur and (count + k > BATCH_MAX or size + n > BATCH_MAX_BYTES):
            out.append(cur)
            cur, size, count = [], 0, 0
        cur.append(msg)
        size += n
        count += k
    if cur:
        out.append(cur)
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode(frames: list) -> Message:
    """Rebuild a Message from its frames (bytes or zmq.Frame); ProtocolError if it does not fit."""
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as e:  # anything odd in untrusted input is a protocol error
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}") from None


def _buffer(frame: Any) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def decode_batch(frames: list, runs: bool = False) -> list:
    """The messages of a batch, or of a single message, in order; ProtocolError if any
    part does not fit (then none of them is returned).  ``runs``: WRITE runs are taken
    (as WriteRun objects), else refused."""
    try:
        if bytes(_buffer(frames[0])[: len(BATCH_TAG)]) != BATCH_TAG:
            return [_decode(frames)]
        return _decode_batch(frames, runs)
    except ProtocolError:
        raise
    except Exception as e:  # anything odd in untrusted input is a protocol error
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}") from None


def _decode_batch(frames: list, runs: bool) -> list:
    raw = _buffer(frames[0])[len(BATCH_TAG) :]
    if not raw.nbytes:
        raise ProtocolError("a batch needs a header")
    if raw.nbytes > _MAX_BATCH_HEADER_BYTES:
        raise ProtocolError("batch header too large")
    headers = msgpack.unpackb(
        raw, raw=False, strict_map_key=True, max_array_len=BATCH_MAX * 2, max_map_len=64
    )
    if not isinstance(headers, list) or not headers:
        raise ProtocolError("a batch header must be a non-empty list")
    out = []
    next_frame = 1
    for h in headers:
        if type(h) is list and len(h) in _RUN_FIELDS and runs:
            out.append(_write_run(h))
            continue
        if not isinstance(h, list) or len(h) != _HEADER_FIELDS + 1:
            raise ProtocolError("batch entry is not a list of the expected fields")
        inline = h[-1]
        if inline is None:
            buf = None
            if h[9]:  # dtype: the array is the next frame
                if next_frame >= len(frames):
                    raise ProtocolError("batch declares more data frames than came")
                buf = _buffer(frames[next_frame])
                next_frame += 1
        elif isinstance(inline, bytes):
            buf = memoryview(inline)
        else:
            raise ProtocolError("inline data must be bytes")
        out.append(_message(h[:_HEADER_FIELDS], buf))
    if next_frame != len(frames):
        raise ProtocolError(f"batch carries {len(frames) - next_frame} data frames too many")
    return out


def _write_run(entry: list) -> WriteRun:
    """A validated WriteRun from its batch entry."""
    op, dtype, names, reqs, stamps, values = entry[:6]
    expires = entry[6] if len(entry) == 7 else 0.0
    if op != Op.WRITE or type(op) is not int:
        raise ProtocolError(f"a run of operation {op!r}")
    dt = _DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"dtype {dtype!r} is not allowed")
    if type(names) is not list or type(reqs) is not list:
        raise ProtocolError("a run's names and request numbers must be lists")
    n = len(names)
    if not n or len(reqs) != n:
        raise ProtocolError("a run needs as many request numbers as names, and some")
    if not all(type(name) is str for name in names):
        raise ProtocolError("name and reason must be text")
    if not all(type(req) is int and req >= 0 for req in reqs):
        raise ProtocolError("req must be a non-negative integer")
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


def _decode(frames: list) -> Message:
    if len(frames) not in (2, 3):
        raise ProtocolError(f"expected 2 or 3 frames, got {len(frames)}")
    tag = bytes(_buffer(frames[0]))
    if tag != PROTOCOL_TAG:
        raise ProtocolError(f"unknown protocol tag {tag[:16]!r}")
    raw = _buffer(frames[1])
    if raw.nbytes > _MAX_HEADER_BYTES:
        raise ProtocolError("header too large")
    header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_array_len=64, max_map_len=64)
    if not isinstance(header, list) or len(header) != _HEADER_FIELDS:
        raise ProtocolError("header is not a list of the expected fields")
    return _message(header, _buffer(frames[2]) if len(frames) == 3 else None)


_OPS = {int(op): op for op in Op}
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def _message(header: list, buf: memoryview | None) -> Message:
    """A validated Message from its header fields and its data buffer (None: no data).

    Runs once per message on both sides of the hot path, so the checks are exact
    type tests (msgpack yields exactly int, float, str and dict; a bool is refused)."""
    op, name, req, seq, epoch, stamp, length, reason, info, dtype, count = header
    op = _OPS.get(op) if type(op) is int else None
    if op is None:
        raise ProtocolError(f"unknown operation {header[0]!r}")
    if type(name) is not str or type(reason) is not str:
        raise ProtocolError("name and reason must be text")
    if not (
        type(req) is int
        and type(seq) is int
        and type(epoch) is int
        and type(length) is int
        and req >= 0
        and seq >= 0
        and epoch >= 0
        and length >= 0
    ):
        for label, v in (("req", req), ("seq", seq), ("epoch", epoch), ("length", length)):
            if not _is_int(v) or v < 0:
                raise ProtocolError(f"{label} must be a non-negative integer")
    if type(stamp) is not float:
        raise ProtocolError("stamp must be a float")
    if type(info) is not dict or (info and not all(type(k) is str for k in info)):
        raise ProtocolError("info must be a map with text keys")
    if type(dtype) is not str or type(count) is not int:
        raise ProtocolError("dtype must be text and count an integer")
    data = None
    if dtype:
        dt = _DTYPES.get(dtype)
        if dt is None:
            raise ProtocolError(f"dtype {dtype!r} is not allowed")
        if not 0 <= count <= MAX_WIRE_ELEMENTS:
            raise ProtocolError(f"count {count} out of range")
        if buf is None:
            raise ProtocolError("header declares data but no data frame came")
        if buf.nbytes != count * dt.itemsize:
            raise ProtocolError(
                f"data frame holds {buf.nbytes} bytes, header declares {count} x {dt.itemsize}"
            )
        data = np.frombuffer(buf, dtype=dt, count=count)
    elif buf is not None:
        raise ProtocolError("data frame without a dtype in the header")
    return Message(op, name, req, seq, epoch, stamp, length, reason, info, data)
