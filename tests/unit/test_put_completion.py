"""A CA put with callback always completes (carelay.broker.basepv): once the server is told
the put completes asynchronously, whatever fails after it ends the write with a failure,
logged, and never leaves the channel's write in progress.  Without a CA server: the
casPV's asynchronous-write calls are recorded."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from pcaspy import cas

from carelay.broker.basepv import PUT_FAILED, BasePV


class Broker:
    """What BasePV's put path asks of the broker; ``put_waits``: its shard is restarting."""

    def __init__(self, put_waits: bool = False, park=None) -> None:
        self.table = SimpleNamespace(channels=SimpleNamespace(count=0))
        self.access_group = ""
        self.put_context = None
        self._put_waits = put_waits
        self._park = park
        self.parked = []

    def put_waits(self, shard: int) -> bool:
        return self._put_waits

    def park(self, pv, payload, notify, shard) -> None:
        if self._park is not None:
            self._park()
        self.parked.append(payload)


class PV(BasePV):
    """A casPV whose ``_forward`` is ``forward``, with its async writes recorded."""

    def __init__(self, broker: Broker, forward) -> None:
        super().__init__(broker, "U:x_f1", "f", 1, False)
        self.forward = forward
        self.in_progress = False
        self.ended: list[int] = []
        self.went_on: list = []

    def startAsyncWrite(self, ctx):
        assert not self.in_progress
        self.in_progress = True

    def endAsyncWrite(self, status):
        assert self.in_progress, "ended a write not in progress"
        self.in_progress = False
        self.ended.append(status)

    def hasAsyncWrite(self):
        return self.in_progress

    def _accept(self, value):
        return value, cas.S_casApp_success

    def _forward(self, payload, notify) -> bool:
        return self.forward(payload, notify)

    def _forwarded(self, payload) -> None:
        self.went_on.append(payload)

    def _shard_of(self, payload) -> int:
        return 0


CONTEXT = SimpleNamespace(ctx=None)


def raises(payload, notify):
    raise UnicodeEncodeError("utf-8", "\udcb0C", 0, 1, "surrogates not allowed")


def test_an_exception_after_the_write_started_ends_it_with_a_failure(caplog):
    pv = PV(Broker(), raises)
    with caplog.at_level(logging.ERROR, logger="carelay.broker.basepv"):
        status = pv.writeNotify(CONTEXT, "\udcb0C")
    assert status == cas.S_casApp_asyncCompletion
    assert not pv.in_progress and pv.ended == [PUT_FAILED]
    assert pv.went_on == []
    assert "U:x_f1" in caplog.text and "UnicodeEncodeError" in caplog.text
    # The channel takes the next put with callback.
    pv.forward = lambda payload, notify: True
    assert pv.writeNotify(CONTEXT, 1.0) == cas.S_casApp_asyncCompletion
    assert pv.in_progress and pv.went_on == [1.0]
    pv.complete(True)
    assert pv.ended == [PUT_FAILED, cas.S_casApp_success]


def test_an_exception_once_the_put_went_on_leaves_it_to_its_answer(caplog):
    """The put is on its way: its shard's answer completes it (ok or not), once."""
    pv = PV(Broker(), lambda payload, notify: True)

    def broken(payload):
        raise RuntimeError("after the put went on")

    pv._forwarded = broken
    with caplog.at_level(logging.ERROR, logger="carelay.broker.basepv"):
        assert pv.writeNotify(CONTEXT, 1.0) == cas.S_casApp_asyncCompletion
    assert "after the put went on" in caplog.text
    assert pv.in_progress and pv.ended == []
    pv.complete(True)
    assert pv.ended == [cas.S_casApp_success]


@pytest.mark.parametrize("forward", [lambda payload, notify: False, raises])
def test_a_put_that_cannot_go_on_fails_now(forward):
    pv = PV(Broker(), forward)
    assert pv.writeNotify(CONTEXT, 1.0) == cas.S_casApp_asyncCompletion
    assert not pv.in_progress and pv.ended == [PUT_FAILED]
    # Without callback: the put's own status.
    assert pv.write(CONTEXT, 1.0) == PUT_FAILED
    assert not pv.in_progress and pv.ended == [PUT_FAILED]


@pytest.mark.parametrize("notify", [True, False], ids=["with-callback", "without"])
def test_a_put_that_cannot_wait_for_its_shard_fails_now(notify, caplog):
    def park():
        raise RuntimeError("cannot park")

    pv = PV(Broker(put_waits=True, park=park), lambda payload, notify: True)
    put = pv.writeNotify if notify else pv.write
    with caplog.at_level(logging.ERROR, logger="carelay.broker.basepv"):
        assert put(CONTEXT, 1.0) == cas.S_casApp_asyncCompletion
    assert "cannot park" in caplog.text
    assert not pv.in_progress and pv.ended == [PUT_FAILED]
    assert not pv.waiting_put
