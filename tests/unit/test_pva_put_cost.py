"""What keeps a PVA put cheap, without p4p or shards: a put's post carries only what
changed, a burst of queued calls wakes the loop once, a plain number converts the short
way to the same elements, and a finished put is freed at once (no reference cycle left
for the garbage collector)."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest

from carelay.broker.pva import convert
from carelay.broker.pva.front import PeerClient, PvaFrontEnd, PvaPut
from carelay.broker.pva.inbox import Inbox
from carelay.common.config import load_config
from carelay.common.naming import parse_pv_name
from tests.unit.test_pva_front import FakeChannel, FakeOp, FakeValue, real_pv


@pytest.fixture
def front(tmp_path):
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path)))
    f.make_channel_object = lambda _front, name: FakeChannel(name)
    yield f
    f.inbox.close()


def test_a_put_posts_value_and_stamp_and_metadata_only_when_it_changed(front):
    pv, channel = real_pv(front, "P:x_f1")
    pv.apply(np.array([2.0]), 2.0, append=False)
    assert set(channel.shown[-1]) == {"value", "timeStamp"}
    assert channel.shown[-1]["value"] == 2.0
    pv.field_changed("EGU", "mm")  # a field change shows every field
    assert channel.shown[-1]["display"]["units"] == "mm"
    assert "alarm" in channel.shown[-1]
    pv.apply(np.array([3.0]), 3.0, append=False)
    assert set(channel.shown[-1]) == {"value", "timeStamp"}
    pv.field_changed("HIGH", 2.5)  # 3.0 is past it: in alarm once the shard processed it
    assert channel.shown[-1]["alarm"]["message"] == ""
    pv.apply(np.array([3.0]), 3.5, append=False, reset=True)  # the processing
    assert channel.shown[-1]["alarm"]["message"] == "HIGH"
    assert set(channel.shown[-1]) == {"value", "timeStamp", "alarm"}
    pv.apply(np.array([4.0]), 4.0, append=False)  # still in alarm: no alarm sent
    assert "alarm" not in channel.shown[-1]
    pv.apply(np.array([1.0]), 5.0, append=False)  # out of alarm: the alarm goes along
    assert channel.shown[-1]["alarm"]["message"] == ""
    assert set(channel.shown[-1]) == {"value", "timeStamp", "alarm"}


def test_a_burst_of_queued_calls_writes_the_pipe_once():
    inbox = Inbox()
    try:
        ran = []
        for k in range(5):
            inbox.push(ran.append, k)
        assert os.read(inbox.fd, 64) == b"\0"
        os.write(inbox._wake, b"\0")  # as the loop found it
        assert inbox.run() == 5 and ran == [0, 1, 2, 3, 4]
        inbox.push(ran.append, 5)  # after a run: a new wake
        assert os.read(inbox.fd, 64) == b"\0"
    finally:
        inbox.close()


@pytest.mark.parametrize("name", ["P:a_f1", "P:b_f3", "P:c_F10"])
def test_a_plain_number_converts_as_the_general_way_does(name):
    spec = parse_pv_name(name, "P:", 100, 60)
    fast = convert.put_array(spec, 2.5)
    general = convert.put_array(spec, np.float64(2.5))  # not a float: the general way
    assert fast.dtype == general.dtype and fast.tolist() == general.tolist() == [2.5]


def test_a_finished_put_is_freed_without_the_garbage_collector():
    gc.disable()
    try:
        op = FakeOp()
        put = PvaPut(op, PeerClient(op))
        ref = weakref.ref(put)
        put.parts = 1
        put.complete(True)
        assert op.result == ("ok", None)
        del put
        assert ref() is None
    finally:
        gc.enable()


def test_a_put_through_the_front_end_is_freed_once_its_shard_answered(front):
    pv, channel = real_pv(front, "P:x_f1")
    link = front.links[pv.shard]
    link.sock = object()  # queued here, never sent
    gc.disable()
    try:
        op = FakeOp(FakeValue({"value": 7.0}))
        front.on_put(channel, op)
        ((req, request),) = front.requests.unanswered[pv.shard].items()
        ref = weakref.ref(request.notify)
        del request
        front.requests.finish(pv.shard, req, True)
        assert op.result is None  # told once the loop handled what came with the answer
        front.finish_answered()
        assert op.result == ("ok", None)
        assert ref() is None
    finally:
        gc.enable()
        link.sock = None
