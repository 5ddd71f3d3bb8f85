"""A long stretch of published scalars reaches a front-end whole (common/runs.py).

A shard sends what its read gate held back from several batches at once, so a front-end
can be sent far more one-element Updates in a row than one batch holds.  Each frame it is
sent must still decode: a run the decoder refuses would lose every update in it, with no
resync.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from carelay.common import runs as runs_module
from carelay.common.messages import Ack, Confirm, Update
from carelay.common.protocol import (
    BATCH_MAX,
    BATCH_TAG,
    UpdateRun,
    batches,
    decode_batch,
    encode_batch,
)
from carelay.common.runs import update_runs
from carelay.shard.follow import Follows
from carelay.shard.gate import ReadGate
from carelay.shard.outbox import Outbox
from tests.unit.recording_router import RecordingRouter

_DTYPES = ("<f8", "<i4", "|u1", "|S40")


def _upd(k: int, dtype: str = "<f8", epoch: int = 3) -> Update:
    value = {"<f8": k + 0.5, "<i4": k - 7, "|u1": k % 256, "|S40": b"v%d" % k}[dtype]
    return Update(f"R:p{k}", 0, 10_000 + k, 1_000.0 + k / 8, np.array([value], dtype), epoch=epoch)


def _expanded(msgs: list) -> list:
    return [m for msg in msgs for m in (msg.messages() if type(msg) is UpdateRun else [msg])]


def _received(msgs: list) -> list:
    """``msgs`` as a shard sends them (Outbox._send) and a front-end decodes them: the
    messages each frame carries, in order."""
    out = []
    for batch in batches(update_runs(msgs)):
        frames = [bytes(f) for f in encode_batch(batch)]
        out += _expanded(decode_batch(frames))  # a front-end's (to_shard=False)
    return out


def _assert_same(got: list, sent: list) -> None:
    assert len(got) == len(sent)
    assert [type(m) for m in got] == [type(m) for m in sent]
    assert got == sent
    got, sent = [m for m in got if type(m) is Update], [m for m in sent if type(m) is Update]
    assert [m.name for m in got] == [m.name for m in sent]
    assert [m.seq for m in got] == [m.seq for m in sent]
    assert [m.stamp for m in got] == [m.stamp for m in sent]
    assert [m.data.dtype for m in got] == [m.data.dtype for m in sent]
    assert [m.data.tolist() for m in got] == [m.data.tolist() for m in sent]
    assert [m.epoch for m in got] == [m.epoch for m in sent]


def test_a_run_is_kept_to_what_a_batch_holds():
    assert runs_module.RUN_MAX <= BATCH_MAX  # the decoder takes BATCH_MAX * 2 names a list


@pytest.mark.parametrize("n", [BATCH_MAX * 2 + 1, 2_400, 10_000])
def test_a_long_stretch_of_scalar_updates_decodes_whole_and_in_order(n):
    msgs = [_upd(k) for k in range(n)]
    runs = update_runs(msgs)
    assert all(len(run) <= BATCH_MAX for run in runs if type(run) is UpdateRun)
    assert _expanded(runs) == msgs
    _assert_same(_received(msgs), msgs)


def test_each_frame_of_a_long_stretch_stays_within_the_decoders_limits():
    msgs = [_upd(k) for k in range(10_000)]
    for batch in batches(update_runs(msgs)):
        assert sum(len(m) if type(m) is UpdateRun else 1 for m in batch) <= BATCH_MAX
        (head,) = encode_batch(batch)  # scalars: no data frames
        entries = msgpack.unpackb(head[len(BATCH_TAG) :])
        assert len(entries) <= BATCH_MAX
        assert all(len(entry[2]) <= BATCH_MAX for entry in entries)


@pytest.mark.parametrize("dtype", _DTYPES)
def test_a_long_stretch_of_each_dtype_decodes_whole(dtype):
    msgs = [_upd(k, dtype) for k in range(2_400)]
    _assert_same(_received(msgs), msgs)


def test_long_stretches_of_mixed_dtypes_and_epochs_decode_whole():
    msgs = [_upd(k, "<f8") for k in range(2_500)]
    msgs += [_upd(k, "<i4") for k in range(2_500, 4_700)]
    msgs += [_upd(k, "<i4", epoch=4) for k in range(4_700, 6_800)]
    msgs.append(Ack("R:p0", 5, 11))  # breaks a run: what follows starts anew
    msgs += [_upd(k, "|S40", epoch=4) for k in range(6_800, 9_001)]
    msgs += [_upd(k % 50, _DTYPES[k % 4], epoch=4) for k in range(4_000)]  # no runs
    _assert_same(_received(msgs), msgs)


def test_a_full_run_then_one_more_leaves_that_one_alone():
    msgs = [_upd(k) for k in range(BATCH_MAX + 1)]
    runs = update_runs(msgs)
    assert [type(m) for m in runs] == [UpdateRun, Update]
    assert len(runs[0]) == BATCH_MAX and runs[1] is msgs[-1]
    _assert_same(_received(msgs), msgs)


# -- through the shard's outbox and read gate -------------------------------------------

A, B, W = b"\0front-a", b"\0front-b", b"\0front-w"


def test_published_updates_held_behind_an_answer_reach_their_front_end_whole():
    """A's put to a PV that W watches is answered only once W has shown it; B's puts
    published to A in the meantime wait behind that answer, over several batches, and
    then go to A all at once."""
    lost = []
    gate = ReadGate(epoch=3, wait=60.0)
    outbox = Outbox(lambda: [A, B, W], lambda *a: lost.append(a), 3, gate, Follows(3))
    sock = RecordingRouter()
    gate.watch(W, "R:w", True)

    answer = Update("R:w", 41, 9, 5.0, np.array([1.0]), epoch=3)
    outbox.reply(A, answer)
    outbox.publish(A, Update("R:w", 0, 9, 5.0, np.array([1.0]), epoch=3))
    outbox.send(sock)
    assert gate.held and not sock.to(A)  # the answer waits for W
    (confirm,) = [m for m in sock.to(W) if type(m) is Confirm]

    published = []
    for first in range(0, 2_400, 800):  # three batches of B's puts
        for k in range(first, first + 800):
            msg = _upd(k)
            published.append(msg)
            outbox.publish(B, msg)
        outbox.send(sock)
    assert not sock.to(A)  # all of it behind the held answer
    assert len(_expanded(sock.to(W))) == 2 + 2_400

    gate.shown(W, confirm.token)
    outbox.send(sock)
    assert not lost and not gate.held
    got = _expanded(sock.to(A))
    assert got[0] == answer
    _assert_same(got[1:], published)
    assert all(len(_expanded(msgs)) <= BATCH_MAX for peer, msgs in sock.sent if peer == A)
