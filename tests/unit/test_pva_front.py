"""The PVA front-end's own logic, without p4p or shards: which names it serves, and how
a PVA put ends (done, or failed with the reason the client is told)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from carelay.broker.link import LinkState
from carelay.broker.pva.front import PeerClient, PvaFrontEnd, PvaPut
from carelay.common.config import PVA_OPEN_WAIT, PVA_SHARD_QUIET, load_config
from carelay.common.messages import FieldChanged, Update
from carelay.common.sharding import shard_for


class FakeOp:
    """A p4p ServerOperation as the front-end uses it."""

    def __init__(self, value=None) -> None:
        self._value = value
        self.result = None

    def value(self):
        return self._value

    def peer(self):
        return "127.0.0.1:5"

    def account(self):
        return "tester"

    def done(self, value=None, error=None):
        assert self.result is None, "done twice"
        self.result = ("error", error) if error else ("ok", None)


class FakeValue(dict):
    """A p4p Value: fields by path, and the set of those the client changed."""

    def changedSet(self):  # noqa: N802 - p4p's name
        return set(self)


class FakeChannel:
    """A channels.Channel without p4p: what the loop prepares it with, and its closes.
    It opens at once (``opening``): these tests run the loop's calls by hand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shown = []
        self.shut_count = 0

    def prepare(self, code, fields):
        self.code = code
        self.shown.append(fields)

    def opening(self, timeout):
        return True

    def show(self, fields):
        self.shown.append(fields)

    def shut(self):
        self.shut_count += 1


def _front_end(tmp_path, **config):
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path), **config))
    f.make_channel_object = lambda _front, name: FakeChannel(name)
    return f


@pytest.fixture
def front(tmp_path):
    f = _front_end(tmp_path)
    yield f
    f.inbox.close()


@pytest.fixture
def small_front(tmp_path):
    """A front-end whose max_pvs is 3."""
    f = _front_end(tmp_path, max_pvs=3)
    yield f
    f.inbox.close()


def live(front, name: str) -> None:
    """The shard of ``name`` in sync, and just heard from."""
    link = front.links[shard_for(name, front.config.shards)]
    link.state = LinkState.LIVE
    link.timers.last_heard = time.monotonic()


def real_pv(front, name: str, value: float = 1.0):
    """``name``'s PV, put once (``value``), and the channel a client holds of it."""
    live(front, name)
    channel = front.make_channel(name)
    front.inbox.run()
    pv = front.table.pvs[name]
    front.table.set_real(pv, True)
    pv.apply(np.array([value]), 1.0, append=False)
    return pv, channel


def test_names_served(front):
    assert front.test_channel("OTHER:x_f1") is False
    assert front.test_channel("P:no_type") is False
    front.inbox.run()  # the refusal is logged on the loop thread
    assert "P:no_type" in front.table.refusals
    assert front.test_channel("P:x_f1") is None  # its shard is not in sync: ask again
    live(front, "P:x_f1")
    assert front.test_channel("P:x_f1") is True
    assert front.test_channel(front.config.pvlist_name) is None  # not ready yet
    front.ready = True
    assert front.test_channel(front.config.pvlist_name) is True


def test_name_val_is_the_pvs_own_channel(front):
    """``NAME.VAL`` is served as ``NAME`` is (a provisional PV too), by the same channel."""
    assert front.test_channel("P:x_f1.VAL") is None  # its shard is not in sync: ask again
    live(front, "P:x_f1")
    assert front.test_channel("P:x_f1.VAL") is True
    channel = front.make_channel("P:x_f1.VAL")
    front.inbox.run()
    assert channel.name == "P:x_f1" and front.make_channel("P:x_f1") is channel
    assert front.test_channel("P:x_f1.VAL$") is False and front.test_channel("P:x.VAL") is False


def test_the_names_of_a_silent_shard_are_not_served_for_now(front):
    live(front, "P:x_f1")
    assert front.test_channel("P:x_f1") is True
    link = front.links[shard_for("P:x_f1", front.config.shards)]
    link.timers.last_heard = time.monotonic() - PVA_SHARD_QUIET - 1  # hung, link still up
    assert front.test_channel("P:x_f1") is None  # the client searches again


class UnpreparedChannel(FakeChannel):
    """A channel the loop does not prepare: each wait for its opening (``waited``, the
    seconds asked, not slept) ends with it not open.  ``decided``: closed before it was
    prepared."""

    def __init__(self, name: str, decided: bool = False) -> None:
        super().__init__(name)
        self.decided = decided
        self.waited: list[float] = []

    def opening(self, timeout):
        self.waited.append(timeout)
        return False


def test_a_new_channel_is_waited_for_no_longer_once_its_shard_falls_silent(front):
    """The PVA server's thread waits for a new channel's opening and serves no client
    meanwhile: a hung shard must not hold it for the whole PVA_OPEN_WAIT."""
    front.make_channel_object = lambda _front, name: UnpreparedChannel(name)
    live(front, "P:x_f1")
    link = front.links[shard_for("P:x_f1", front.config.shards)]
    link.timers.last_heard = time.monotonic() - PVA_SHARD_QUIET - 1
    assert front.make_channel("P:x_f1") is None
    # The shard's silence ended the wait after one slice, not the whole wait.
    assert sum(front.channels["P:x_f1"].waited) < PVA_OPEN_WAIT
    front.inbox.run()  # the loop drops it: the next client gets a new one
    assert "P:x_f1" not in front.channels


class LatePreparedChannel(FakeChannel):
    """Prepared by the loop just after a look at its opening found it not ready."""

    decided = False

    def opening(self, timeout):
        if not self.decided:
            self.decided = True  # the loop's turn comes right after this look
            return False
        return True


def test_a_channel_prepared_just_after_a_look_is_handed_out(front):
    front.make_channel_object = lambda _front, name: LatePreparedChannel(name)
    live(front, "P:x_f1")
    channel = front.make_channel("P:x_f1")
    assert channel is not None and channel is front.channels["P:x_f1"]


def test_a_channel_closed_before_it_opened_is_waited_for_no_longer(front):
    front.make_channel_object = lambda _front, name: UnpreparedChannel(name, decided=True)
    live(front, "P:x_f1")
    assert front.make_channel("P:x_f1") is None
    assert sum(front.channels["P:x_f1"].waited) < PVA_OPEN_WAIT


def test_a_channel_is_opened_by_the_loop_with_the_pv_as_it_stands(front):
    live(front, "P:x_f1")
    channel = front.make_channel("P:x_f1")
    assert front.make_channel("P:x_f1") is channel
    assert channel.shown == []  # closed until the loop opens it
    front.inbox.run()
    (first,) = channel.shown
    assert channel.code == "d" and first["alarm"]["message"] == "UDF"


def test_a_client_attached_to_a_channel_after_it_closed_is_sent_back(front):
    live(front, "P:x_f1")
    channel = front.make_channel("P:x_f1")
    front.inbox.run()
    front.drop_channel(channel)  # its last client went
    assert channel.shut_count == 1
    front.on_first_connect(channel)  # a client that had been handed it attaches now
    assert channel.shut_count == 2  # closed again: the client searches anew
    pv = front.table.pvs.get("P:x_f1")
    assert pv is None or not pv.attached


def test_a_refused_put_fails_with_its_reason_and_nothing_goes(front):
    live(front, "P:x_f1")
    channel = front.make_channel("P:x_f1")
    front.inbox.run()
    op = FakeOp(FakeValue({"value": "abc"}))
    front.on_put(channel, op)
    assert op.result == ("error", "refused put: cannot convert text 'abc' to a number")
    op = FakeOp(FakeValue({"display.precision": 99}))
    front.on_put(channel, op)
    assert op.result[0] == "error" and "PREC" in op.result[1]
    assert not any(link.outbox for link in front.links)


class CountingOp(FakeOp):
    """A FakeOp that counts the reads of its client's address and account."""

    reads = 0

    def peer(self):
        self.reads += 1
        return super().peer()

    def account(self):
        self.reads += 1
        return super().account()


def test_a_refused_put_names_its_client_and_an_accepted_one_never_reads_it(front):
    pv, channel = real_pv(front, "P:x_f1")
    front.links[pv.shard].sock = object()  # queued here, never sent
    op = CountingOp(FakeValue({"value": 2.0}))
    front.on_put(channel, op)
    # Its address and account are two calls into p4p: a put that goes on makes neither.
    assert op.reads == 0 and any(link.outbox for link in front.links)
    op = CountingOp(FakeValue({"value": "abc"}))
    front.on_put(channel, op)
    assert op.result[0] == "error"
    lines = [line for _, line, _ in front.health.errors.entries()]
    assert any("client tester@127.0.0.1:5" in line and "P:x_f1" in line for line in lines), lines
    assert op.reads == 2


def test_a_put_to_an_unreachable_shard_says_so(front):
    name = "P:x_f1"
    channel = front.make_channel(name)
    front.inbox.run()  # not claimed: its shard is down, the channel goes
    assert name not in front.channels
    live(front, name)
    channel = front.make_channel(name)
    front.inbox.run()
    front.links[shard_for(name, front.config.shards)].state = LinkState.DOWN
    op = FakeOp(FakeValue({"value": np.float64(1.0)}))
    front.on_put(channel, op)
    assert op.result == ("error", "put failed: shard unreachable")


def test_a_put_of_several_parts_ends_once_all_have():
    op = FakeOp()
    put = PvaPut(op, PeerClient(op))
    put.parts = 2
    put.complete(True)
    assert op.result is None
    put.reason = "shard refused: no"
    put.complete(False)
    assert op.result == ("error", "shard refused: no")


def test_a_large_buffer_posts_as_on_ca(front):
    name = "P:big_F20000"  # 160 kB: its events are spaced (PvMirror.coalesce)
    live(front, name)
    channel = front.make_channel(name)
    front.inbox.run()
    pv = front.table.pvs[name]
    block = np.arange(10_000, dtype=np.float64)
    pv.apply(block, 1.0, append=True)
    pv.apply(block, 2.0, append=True)  # within the interval: held back
    shown = len(channel.shown)
    assert pv in front.loop.due_posts
    front.loop._post_due(1e12)  # long after
    assert len(channel.shown) == shown + 1
    assert len(channel.shown[-1]["value"]) == 20_000


def test_a_put_refused_in_part_sends_no_part(front):
    pv, channel = real_pv(front, "P:x_f1")
    link = front.links[pv.shard]
    link.sock = object()  # requests are only queued here, never sent
    op = FakeOp(FakeValue({"display.units": "mm", "value": "abc"}))
    front.on_put(channel, op)
    assert op.result[0] == "error" and "abc" in op.result[1]
    assert link.outbox == []
    op = FakeOp(FakeValue({"display.units": "mm", "value": np.float64(2.0)}))
    front.on_put(channel, op)
    assert op.result is None and len(link.outbox) == 2  # both go; done when applied
    link.sock = None


def test_a_put_only_the_shard_can_judge_goes_with_its_data(front):
    """Forwarder.put: a put that settled_put leaves to the shard (longer than the PV)
    goes as a request with its elements (it went without them, and the encoder raised)."""
    name = "P:arr_f3"
    live(front, name)
    pv = front.table.new_pv(name)
    front.table.set_real(pv, True)
    pv.apply(np.array([1.0]), 1.0, append=False)
    link = front.links[pv.shard]
    link.sock = object()  # queued here, never sent
    data = np.array([1.0, 2.0, 3.0, 4.0])
    assert front.forwarder.put(pv, data, None)
    (msg,) = link.outbox
    assert msg.data is data
    link.sock = None


def test_a_put_is_told_done_after_what_came_with_its_answer_is_shown(front):
    """A put of control.limitHigh (DRVH) is answered by a FIELD_CHANGED, and its shard
    sends the value it clipped right after, in the same batch: the client is told only
    once the loop has handled that too, so a get right after reads the clipped value."""
    name = "P:drv_f1"
    pv, channel = real_pv(front, name, 6.0)
    link = front.links[pv.shard]
    link.sock = object()  # queued here, never sent
    link.epoch = 7
    try:
        op = FakeOp(FakeValue({"control.limitHigh": 3.0}))
        front.on_put(channel, op)
        ((req, _),) = front.requests.unanswered[pv.shard].items()
        front.sync.handle(link, FieldChanged(name, req, 2, "DRVH", 3.0, 7))
        assert op.result is None
        front.sync.handle(link, Update(name, 0, 3, 2.0, np.array([3.0]), True, False, 7))
        front.finish_answered()
        assert op.result == ("ok", None)
        assert channel.shown[-1]["value"] == 3.0
    finally:
        link.sock = None


def field_channel(front, name: str):
    """The channel a client holds of field channel ``name``, opened by the loop."""
    assert front.test_channel(name) is True
    channel = front.make_channel(name)
    front.inbox.run()
    front.on_first_connect(channel)
    return channel


def test_field_names_served(front, caplog):
    """A field of a PV that exists and has it; not a field of a PV with no put yet (it
    could take no put), VAL (the PV's own channel), the ``$`` forms or an unknown one."""
    assert front.test_channel("P:x_f1.EGU") is None  # its shard is not in sync: ask again
    live(front, "P:x_f1")
    assert front.test_channel("P:x_f1.EGU") is False  # no PV yet
    real_pv(front, "P:x_f1")
    real_pv(front, "P:t_s1")
    for name in ("P:x_f1.EGU", "P:x_f1.SEVR", "P:x_f1.PROC", "P:t_s1.DESC", "P:t_s1.RTYP"):
        live(front, name.partition(".")[0])
        assert front.test_channel(name) is True, name
    for name in ("P:x_f1.DESC$", "P:x_f1.XYZ", "P:x_f1.RES", "P:t_s1.EGU"):
        assert front.test_channel(name) is False, name
    assert front.test_channel("P:no_type.EGU") is False
    front.inbox.run()
    # Why, in the log and ERRORS as other refused names.
    for name, why in (
        ("P:x_f1.DESC$", "no DESC$ over PVA: a PVA string carries the whole text"),
        ("P:x_f1.XYZ", "unknown field XYZ"),
        ("P:x_f1.RES", "no such field for its type RES"),
        ("P:t_s1.EGU", "no such field for its type EGU"),
    ):
        assert f"refused PV name {name}: {why}" in caplog.text


def test_a_field_channel_shows_its_field_as_it_changes(front):
    front.sync.follows = True  # other front-ends put too: PVs held are followed
    pv, _ = real_pv(front, "P:x_f1", 1.0)
    sevr = field_channel(front, "P:x_f1.SEVR")
    hihi = field_channel(front, "P:x_f1.HIHI")
    assert sevr.code == "enum" and hihi.code == "field:d"
    assert sevr.shown[-1]["value"] == {
        "index": 0,
        "choices": ["NO_ALARM", "MINOR", "MAJOR", "INVALID"],
    }
    assert hihi.shown[-1]["value"] == 0.0
    assert "P:x_f1" in front.sync.followed  # another front-end's puts move SEVR
    pv.field_changed("HIHI", 5.0)
    assert hihi.shown[-1]["value"] == 5.0
    shown = len(sevr.shown)
    pv.apply(np.array([2.0]), 2.0, append=False)  # no alarm: nothing new for SEVR
    assert len(sevr.shown) == shown and len(hihi.shown) == 2
    pv.apply(np.array([6.0]), 3.0, append=False)
    assert sevr.shown[-1]["value"]["index"] == 2  # MAJOR, HHSV's default once HIHI is set
    assert sevr.shown[-1]["alarm"]["severity"] == 2
    assert sevr.shown[-1]["timeStamp"]["secondsPastEpoch"] == 3
    # The alarm every field carries changed too: a get of HIHI gives it (pvxs answers a
    # get from the last post).
    assert hihi.shown[-1]["value"] == 5.0 and hihi.shown[-1]["alarm"]["severity"] == 2


def test_a_put_to_a_field_channel_is_a_field_put(front):
    pv, _ = real_pv(front, "P:x_f1", 1.0)
    link = front.links[pv.shard]
    link.sock = object()  # requests are only queued here, never sent
    try:
        nord = field_channel(front, "P:x_f1.NORD")
        op = FakeOp(FakeValue({"value": 3}))
        front.on_put(nord, op)
        assert op.result == ("error", "refused put to .NORD: NORD is not a writable field")
        sevr = field_channel(front, "P:x_f1.HHSV")
        op = FakeOp(FakeValue({"value.index": 9}))
        front.on_put(sevr, op)
        assert op.result == ("error", "refused put to .HHSV: HHSV takes a severity from 0 to 3")
        op = FakeOp(FakeValue({"alarm.severity": 1}))
        front.on_put(sevr, op)
        assert op.result == ("error", "refused put: the put changes no value")
        assert link.outbox == []
        op = FakeOp(FakeValue({"value.index": 1}))
        front.on_put(sevr, op)
        (msg,) = link.outbox
        assert (msg.name, msg.field, msg.value) == ("P:x_f1", "HHSV", 1)
        assert op.result is None  # done once the shard applied it
    finally:
        link.sock = None


def test_a_field_channel_goes_with_its_client_or_its_pv(front):
    front.sync.follows = True  # other front-ends put too: PVs held are followed
    name = "P:x_f1"
    pv, channel = real_pv(front, name)
    egu = field_channel(front, name + ".EGU")
    assert pv.channel is channel
    front.on_last_disconnect(channel)  # the PV's own channel goes: its field holds it
    assert name in front.sync.followed
    front.on_last_disconnect(egu)
    assert egu.shut_count == 1 and not pv.field_channels and name + ".EGU" not in front.channels
    assert name not in front.sync.followed
    egu = field_channel(front, name + ".EGU")
    front.table.forget(name)  # deleted
    assert egu.shut_count == 1 and not pv.field_channels
    assert front.test_channel(name + ".EGU") is False


def test_field_channels_are_bounded(small_front, caplog):
    """At most max_pvs field channels at once: a client that opens every field of every
    PV does not take the front-end's memory; once one goes, another is served."""
    front = small_front
    real_pv(front, "P:x_f1")
    held = [field_channel(front, f"P:x_f1.{f}") for f in ("EGU", "DESC", "PREC")]
    assert front.test_channel("P:x_f1.HOPR") is None  # not now: the client asks again
    assert front.test_channel("P:x_f1.EGU") is True  # held already: served
    front.inbox.run()
    assert "P:x_f1.HOPR: max_pvs (3) field channels held" in caplog.text
    front.on_last_disconnect(held[0])
    assert front.test_channel("P:x_f1.HOPR") is True


def test_field_channels_searched_for_at_once_are_bounded_too(small_front):
    """A client searches for many fields at once: each search finds room, and the bound
    holds when their channels are made (one at a time, under the channel lock)."""
    front = small_front
    real_pv(front, "P:x_f1")
    names = [f"P:x_f1.{f}" for f in ("EGU", "DESC", "PREC", "HOPR")]
    assert all(front.test_channel(n) is True for n in names)
    made = [front.make_channel(n) for n in names]
    front.inbox.run()
    assert [c is not None for c in made] == [True, True, True, False]
    assert front.field_channels == 3
    front.drop_channel(made[0])
    assert front.field_channels == 2 and front.make_channel(names[3]) is not None
