"""A CA circuit's two byte streams, followed message by message as PCAS reads and writes
them: no sockets, no ctypes (broker/sockethooks.py feeds them).

What is read may be changed in place (the HOST_NAME rewrite of access by address); what
is written is only looked at.  Both keep what tells the relay of a put that PCAS refuses
by itself for want of write access: the channel names a client asks for (CREATE_CHAN),
the server ids PCAS gives them (its CREATE_CHAN reply), the rights it tells the client
(ACCESS_RIGHTS).  A WRITE or WRITE_NOTIFY to a channel without write access is then one
dictionary look-up away; on a circuit whose channels all have it, one empty-dict test.

Both also count the circuit's channels, each from the CREATE_CHAN that asks for it until
PCAS refuses it (CREATE_CH_FAIL), confirms its clearing (CLEAR_CHANNEL) or drops it
(SERVER_DISCONN, its PV deleted): a CREATE_CHAN past the circuit's limit is never read.
Counted by requests, not by the client's channel ids, which PCAS does not check.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from carelay.broker import writecheck

#: CA commands (caproto's _headers.py and the CA protocol specification).
CA_PROTO_WRITE = 4
CA_PROTO_CLEAR_CHANNEL = 12
#: A command that PCAS reads and ignores: what a HOST_NAME without a payload becomes.
CA_PROTO_IGNORED = 16
CA_PROTO_CREATE_CHAN = 18
CA_PROTO_WRITE_NOTIFY = 19
CA_PROTO_CLIENT_NAME = 20
#: CA command of the message that claims the client's host name.
CA_PROTO_HOST_NAME = 21
CA_PROTO_ACCESS_RIGHTS = 22
CA_PROTO_CREATE_CH_FAIL = 26
CA_PROTO_SERVER_DISCONN = 27
#: The puts.
_WRITES = frozenset({CA_PROTO_WRITE, CA_PROTO_WRITE_NOTIFY})
#: ACCESS_RIGHTS bit of write access.
WRITE_RIGHT = 2
#: Bytes of a name (channel or user) kept at most; a channel name this long is never
#: served, so nothing is lost.
NAME_BYTES_MAX = 1024

_HEADER = struct.Struct(">HHHHII")  # command, payload size, type, count, p1, p2
_EXTENDED = struct.Struct(">II")  # payload size, count
_SMALL, _LARGE = 16, 24

#: Called with (PV name, user, peer address, put with callback?) for each refused put.
DeniedPut = Callable[[str, str, str, bool], None]
#: Called with (PV name, user, peer address, put with callback?, reason) for each put
#: refused for what PCAS would make of it (broker/writecheck.py).
RefusedWrite = Callable[[str, str, str, bool, str], None]


def _extended(header) -> bool:
    size, count = struct.unpack_from(">HxxH", header, 2)
    return size == 0xFFFF or count == 0xFFFF


class UnfollowableStream(Exception):
    """A HOST_NAME message that can be neither rewritten nor turned into an ignored one."""


class TooManyChannels(Exception):
    """A CREATE_CHAN past the circuit's limit of channels."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} channels on one circuit (max_channels)")
        self.limit = limit


class StreamWalker:
    """Walks one direction of a CA stream over reads cut anywhere; ``_message`` sees each
    header, ``_payload`` the payload bytes of a message it asked to see."""

    def __init__(self) -> None:
        self._cut = bytearray()  # the start of a header that the end of a read cut
        self._left = 0  # payload bytes of the current message still to come
        self._watching = False  # whether _payload sees them
        self.reads = 0  # reads fed so far

    @property
    def mid_message(self) -> bool:
        """Whether the stream stopped inside a message: a header cut, or payload to come."""
        return bool(self._left or self._cut)

    def feed(self, buf) -> None:
        """Take the next ``buf`` (a writable buffer for a stream that may be rewritten)."""
        self.reads += 1
        n = len(buf)
        pos = 0
        while pos < n:
            if self._left:
                k = min(self._left, n - pos)
                self._left -= k
                if self._watching:
                    self._payload(buf, pos, k, self._left == 0)
                pos += k
            elif self._cut:
                pos = self._resume(buf, pos, n)
            elif n - pos >= _SMALL:
                command, size, dtype, count, p1, p2 = _HEADER.unpack_from(buf, pos)
                if size == 0xFFFF or count == 0xFFFF:
                    if n - pos < _LARGE:
                        self._cut += buf[pos:n]
                        return
                    size, count = _EXTENDED.unpack_from(buf, pos + _SMALL)
                    self._start(command, size, dtype, count, p1, p2, buf, pos + 1)
                    pos += _LARGE
                else:
                    self._start(command, size, dtype, count, p1, p2, buf, pos + 1)
                    pos += _SMALL
            else:
                self._cut += buf[pos:n]
                return

    def _resume(self, buf, pos: int, n: int) -> int:
        """Complete the header that a read cut; where this read goes on."""
        cut = self._cut
        before = len(cut)
        while True:
            need = _LARGE if len(cut) >= 8 and _extended(cut) else _SMALL
            if len(cut) == need:
                break
            k = min(need - len(cut), n - pos)
            if k == 0:
                return pos
            cut += buf[pos : pos + k]
            pos += k
        command, size, dtype, count, p1, p2 = _HEADER.unpack_from(cut)
        if need == _LARGE:
            size, count = _EXTENDED.unpack_from(cut, _SMALL)
        # The header from its command's low byte on is in this read only if the cut came
        # before that byte.
        at = pos - need + 1 if before <= 1 else None
        cut.clear()
        self._start(command, size, dtype, count, p1, p2, buf, at)
        return pos

    def _start(self, command, size, dtype, count, p1, p2, buf, at) -> None:
        self._left = size
        self._watching = self._message(command, size, dtype, count, p1, p2, buf, at)

    def _message(self, command, size, dtype, count, p1, p2, buf, at) -> bool:
        """A header: whether to see its payload.  ``at``: where the command's low byte
        is in ``buf`` (the rest of the header follows it there), None if it came in an
        earlier read."""
        return False

    def _payload(self, buf, pos: int, k: int, last: bool) -> None:
        """``k`` payload bytes at ``buf[pos]``; ``last``: the message's last ones."""


class Channels:
    """What both streams of one circuit learn of its channels and its client.  Without
    ``denied`` no rights are followed: nothing else needs them.  ``limit``: most channels
    the circuit may hold; None: not bounded.  ``refused``: told of each put refused for
    what PCAS would make of it."""

    def __init__(
        self,
        address: str,
        denied: DeniedPut | None = None,
        limit: int | None = None,
        refused: RefusedWrite | None = None,
    ) -> None:
        #: The circuit's peer address; the user its client claims.
        self.address = address
        self.user = ""
        self.on_denied = denied
        self.on_refused = refused
        self.tracked = denied is not None
        self.limit = limit
        #: sid -> (native DBR type, the put types judged, its count) of the channels whose
        #: puts are judged (writecheck).
        self.natives: dict[int, tuple[int, frozenset[int], int]] = {}
        #: CREATE_CHANs read that PCAS has not answered yet.
        self.pending = 0
        self.names: dict[int, str] = {}  # cid -> channel name, while the channel lasts
        self.sids: dict[int, int] = {}  # cid -> sid
        #: sid -> cid of each channel PCAS holds.  By sid, as PCAS finds a channel to
        #: clear: it confirms the clearing of an id it does not know too.
        self.cids: dict[int, int] = {}
        self.read_only: set[int] = set()  # cids without write access
        #: sid -> cid of the channels without write access (empty on most circuits).
        self.denied: dict[int, int] = {}

    @property
    def open(self) -> int:
        """Channels PCAS holds for the circuit or is asked for."""
        return self.pending + len(self.cids)

    def asked(self) -> None:
        """A CREATE_CHAN is read; TooManyChannels if it is one past the limit."""
        self.pending += 1
        if self.limit is not None and self.pending + len(self.cids) > self.limit:
            raise TooManyChannels(self.limit)

    def rights(self, cid: int, rights: int) -> None:
        sid = self.sids.get(cid)
        if rights & WRITE_RIGHT:
            self.read_only.discard(cid)
            if sid is not None:
                self.denied.pop(sid, None)
        else:
            self.read_only.add(cid)
            if sid is not None:
                self.denied[sid] = cid

    def created(self, cid: int, sid: int, native: int = -1, count: int = 0) -> None:
        """PCAS made channel ``sid`` of DBR type ``native`` and ``count`` elements for the
        client's ``cid``."""
        self.pending = max(0, self.pending - 1)
        self.cids[sid] = cid
        self.sids[cid] = sid
        judged = writecheck.CHECKED.get(native)
        if judged is not None:
            self.natives[sid] = (native, judged, count)
        if cid in self.read_only:
            self.denied[sid] = cid

    def failed(self, cid: int) -> None:
        """PCAS refused the channel asked for as ``cid``."""
        self.pending = max(0, self.pending - 1)
        self._forget(cid)

    def dropped(self, cid: int) -> None:
        """PCAS dropped the channel the client knows as ``cid`` (its PV is gone)."""
        sid = self.sids.get(cid)
        if sid is not None:
            self.cids.pop(sid, None)
            self.natives.pop(sid, None)
        self._forget(cid)

    def cleared(self, sid: int) -> None:
        """The client clears channel ``sid`` (or PCAS confirms it): gone if PCAS holds it
        for this circuit; PCAS confirms the clearing of an id it does not hold too."""
        cid = self.cids.pop(sid, None)
        self.natives.pop(sid, None)
        if cid is not None and self.sids.get(cid) == sid:
            self._forget(cid)

    def _forget(self, cid: int) -> None:
        self.names.pop(cid, None)
        self.read_only.discard(cid)
        sid = self.sids.pop(cid, None)
        if sid is not None:
            self.denied.pop(sid, None)

    def put_seen(self, sid: int, notify: bool) -> None:
        """A put to channel ``sid`` is read: PCAS refuses it if the channel has no write
        access (and the rights it told the client are the rights it checks)."""
        cid = self.denied.get(sid)
        if cid is not None and self.on_denied is not None:
            self.on_denied(self.names.get(cid, ""), self.user, self.address, notify)

    def write_refused(self, sid: int, notify: bool, reason: str) -> None:
        if self.on_refused is not None:
            name = self.names.get(self.cids.get(sid, -1), "")
            self.on_refused(name, self.user, self.address, notify, reason)


class ClientStream(StreamWalker):
    """What PCAS reads from one circuit.  ``host``: what each HOST_NAME payload becomes
    (the peer address's token, b"" if it has none); None: left as the client sent it."""

    def __init__(self, channels: Channels, host: bytes | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.host = host
        self._rewrite = b""  # what the next payload bytes become
        self._kept = bytearray()  # the payload of a CREATE_CHAN, CLIENT_NAME or judged put
        self._kind = 0
        self._cid = 0
        #: A judged put: (native type, put type, count, sid, with callback?), where its
        #: header is in the read it came in (None: cut) and which read that was.
        self._put: tuple[int, int, int, int, bool] | None = None
        self._put_at: int | None = None
        self._put_read = 0
        #: For text put to a char channel (see _text_to_chars): the channel's count.
        self._chars: int | None = None

    def _message(self, command, size, dtype, count, p1, p2, buf, at) -> bool:
        if command in _WRITES:
            channels = self.channels
            notify = command == CA_PROTO_WRITE_NOTIFY
            if channels.denied and p1 in channels.denied:
                channels.put_seen(p1, notify)
                return False  # PCAS refuses it for want of write access, whatever it holds
            # On every put: one look-up where nothing is judged.
            native = channels.natives.get(p1)
            if native is None:
                return False
            if dtype == writecheck.DBR_STRING and native[0] == writecheck.DBR_CHAR:
                return self._text_to_chars(command, size, count, p1, notify, at, native[2])
            if dtype not in native[1]:
                return False
            if not 0 < size <= writecheck.MAX_CHECKED_BYTES + 8:
                return False  # PCAS refuses a payload larger than a small put needs
            if not writecheck.judged(native[0], dtype, count):
                return False
            self._kind = command
            self._kept.clear()
            self._put = (native[0], dtype, count, p1, notify)
            self._put_at = None if at is None else at - 1
            self._put_read = self.reads
            return True
        if command == CA_PROTO_CREATE_CHAN:
            self.channels.asked()
        elif command == CA_PROTO_CLEAR_CHANNEL:
            # PCAS handles the circuit's messages in order: a channel it holds is gone
            # before it reads a CREATE_CHAN that follows (its echo then finds nothing).
            self.channels.cleared(p1)
            return False
        if command in (CA_PROTO_CREATE_CHAN, CA_PROTO_CLIENT_NAME):
            self._kind, self._cid = command, p1
            self._kept.clear()
            if size == 0:
                self._kept_whole()
            return size > 0
        if command != CA_PROTO_HOST_NAME or self.host is None:
            return False
        if size == 0:
            # PCAS would read the name from whatever follows: the message must go.
            if at is None:
                raise UnfollowableStream("a HOST_NAME message without payload, cut")
            buf[at] = CA_PROTO_IGNORED
            return False
        host = self.host + b"\0"
        self._rewrite = host if len(host) <= size else b"\0"
        self._kind = CA_PROTO_HOST_NAME
        return True

    def _payload(self, buf, pos, k, last) -> None:
        if self._kind == CA_PROTO_HOST_NAME:
            if self._rewrite:
                w = min(k, len(self._rewrite))
                buf[pos : pos + w] = self._rewrite[:w]
                self._rewrite = self._rewrite[w:]
            return
        if self._kind in _WRITES:
            self._kept += buf[pos : pos + k]  # at most MAX_CHECKED_BYTES + 8 (above)
            if last:
                self._decide(buf)
            return
        room = NAME_BYTES_MAX - len(self._kept)
        if room > 0:
            self._kept += buf[pos : pos + min(k, room)]
        if last:
            self._kept_whole()

    def pending_put(self) -> int:
        """Payload bytes still to come of a judged put whose header is in the read just
        fed (0: none): looked at ahead of PCAS (``judge_ahead``), they decide the put while
        its header can still be made one PCAS refuses."""
        judged = self._watching and self._kind in _WRITES and self._put is not None
        here = self._put_at is not None and self._put_read == self.reads
        return self._left if judged and here else 0

    def judge_ahead(self, rest: bytes, buf) -> None:
        """The rest of that put's payload, read ahead of PCAS (a peek: PCAS reads it next):
        the put is judged now, its header in ``buf`` (the read just fed) rewritten if it
        is refused; the bytes pass unjudged when they come."""
        self._kept += rest
        self._decide(buf)
        self._watching = False

    def _text_to_chars(self, command, size, count, sid, notify, at, chars) -> bool:
        """A DBR_STRING put to a char channel (a ``c`` or ``C`` PV, ``delpv``): what EPICS
        ``caput`` sends without ``-S``.  PCAS would read the text as one number; it goes
        as the char put of its bytes it is meant as (``_retype``), where its header is in
        this read (else it is left to PCAS, as before)."""
        if (
            count != 1
            or at is None
            or not writecheck.STRING_SIZE <= size <= writecheck.STRING_SIZE + 8
        ):
            return False
        self._kind = command
        self._kept.clear()
        self._put = (writecheck.DBR_CHAR, writecheck.DBR_STRING, count, sid, notify)
        self._put_at = at - 1
        self._put_read = self.reads
        self._chars = chars
        return True

    def _decide(self, buf) -> None:
        if self._chars is not None:
            self._retype(buf)
        else:
            self._judge(buf)

    def _retype(self, buf) -> None:
        """The header of a text put to a char channel, rewritten in place: DBR_CHAR, as
        many elements as the text has bytes, and its terminator where the channel has
        room for it (more than the channel holds: ECA_BADCOUNT, as for a char put).  The
        payload stays as it is: the text's bytes, and padding past the count."""
        chars, self._chars = self._chars, None
        text = bytes(self._kept[: writecheck.STRING_SIZE]).split(b"\0", 1)[0]
        self._kept.clear()
        if self._put_read != self.reads:
            return  # its header went to PCAS in an earlier read: PCAS converts it
        n = len(text)
        count = n + 1 if n < chars or n == 0 else n
        at = self._put_at
        buf[at + 4 : at + 8] = struct.pack(">HH", writecheck.DBR_CHAR, count)

    def _judge(self, buf) -> None:
        """A judged put is read whole: one PCAS would convert to something else than it
        says is made one that PCAS refuses (a compound type, S_cas_badType), or, if its
        header went to PCAS in an earlier read, its circuit is closed."""
        native, dtype, count, sid, notify = self._put
        reason = writecheck.refusal(native, dtype, count, bytes(self._kept))
        self._kept.clear()
        if reason is None:
            return
        self.channels.write_refused(sid, notify, reason)
        if self._put_at is None or self._put_read != self.reads:
            raise UnfollowableStream(f"a refused put ({reason}) whose header went before")
        at = self._put_at + 4  # the header's data type
        buf[at : at + 2] = writecheck.DBR_STS_STRING.to_bytes(2, "big")

    def _kept_whole(self) -> None:
        text = bytes(self._kept).split(b"\0", 1)[0].decode("utf-8", "replace")
        self._kept.clear()
        if self._kind == CA_PROTO_CLIENT_NAME:
            self.channels.user = text
        else:
            self.channels.names[self._cid] = text


class ServerStream(StreamWalker):
    """What PCAS writes to one circuit: the channels it creates, and their rights."""

    def __init__(self, channels: Channels) -> None:
        super().__init__()
        self.channels = channels

    def _message(self, command, size, dtype, count, p1, p2, buf, at) -> bool:
        channels = self.channels
        if command == CA_PROTO_ACCESS_RIGHTS:
            if channels.tracked:
                channels.rights(p1, p2)
        elif command == CA_PROTO_CREATE_CHAN:
            channels.created(p1, p2, dtype, count)
        elif command == CA_PROTO_CLEAR_CHANNEL:
            channels.cleared(p1)
        elif command == CA_PROTO_CREATE_CH_FAIL:
            channels.failed(p1)
        elif command == CA_PROTO_SERVER_DISCONN:
            channels.dropped(p1)
        return False


class CircuitStream(ClientStream):
    """The stream PCAS reads, for a circuit followed only to rewrite its HOST_NAMEs."""

    def __init__(self, host: bytes) -> None:
        super().__init__(Channels(""), host)
