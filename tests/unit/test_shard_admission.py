"""The shard's admission on its own, without a socket or a store: whom it serves, and
what it answers the others."""

from __future__ import annotations

import numpy as np

from carelay.common.messages import Delete, Hello, Message, Ping, Reject
from carelay.common.protocol import WriteRun
from carelay.shard.admission import Admission

NAME = "U:a_f1"


def _admission(token: str | None = "s3cret", required: bool = True) -> tuple[Admission, list]:
    replies: list[tuple[bytes, Message]] = []
    admission = Admission(token, lambda peer, msg: replies.append((peer, msg)), required=required)
    return admission, replies


def _hello(req: int, token: str = "s3cret", broker: str = "b1") -> Hello:
    return Hello(req, token, broker)


def test_a_peer_is_served_once_its_hello_presents_the_token():
    admission, replies = _admission()
    assert not admission.admit(b"p", [Ping(1)])
    assert replies == []  # not a HELLO: dropped unanswered
    assert not admission.admit(b"p", [_hello(2, token="wrong")])
    ((peer, reject),) = replies
    assert peer == b"p" and type(reject) is Reject and reject.req == 2
    assert "not a front-end of this relay" in reject.reason
    assert b"p" not in admission
    assert admission.admit(b"p", [_hello(3)])
    assert b"p" in admission


def test_without_a_token_every_peer_is_served():
    admission, replies = _admission(token=None)
    assert admission.admit(b"p", [Ping(1)])
    assert b"p" in admission and replies == []


def test_with_keys_a_front_end_of_another_run_is_refused_and_one_alone_served():
    """Keys admit peers (a broker started alone on another host presents no token); a
    front-end that presents a token is of a run, and served by a shard of that run only:
    a second relay on the same endpoints and keys wrote into this one's stores."""
    for shard_token in ("s3cret", None):  # a shard under `carelay up`, or started alone
        admission, replies = _admission(shard_token, required=False)
        assert admission.admit(b"alone", [_hello(1, token="")])
        assert not admission.admit(b"other", [_hello(2, token="another run")])
        ((peer, reject),) = replies
        assert peer == b"other" and reject.req == 2
        assert "another run's (another relay on the same endpoints and keys?)" in reject.reason
        assert b"other" not in admission
    admission, replies = _admission("s3cret", required=False)
    assert admission.admit(b"ours", [_hello(3)]) and replies == []


def test_a_second_hello_of_a_broker_fences_its_earlier_connection():
    admission, replies = _admission()
    assert admission.admit(b"old", [_hello(1)])
    assert admission.admit(b"new", [_hello(2)])
    assert b"old" not in admission
    run = WriteRun(np.dtype("<f8"))
    run.add(NAME, 0, 1.0, np.array([1.0]))
    run.add(NAME, 4, 1.0, np.array([2.0]))
    late = [run, Delete(NAME, 5), Ping(6)]
    assert not admission.admit(b"old", late)
    # Requests that wait for an answer are refused, and a PING, which tells a front-end
    # that puts nothing that it is no longer served; a plain WRITE is not answered.
    assert [(p, type(m), m.req) for p, m in replies] == [
        (b"old", Reject, 4),
        (b"old", Reject, 5),
        (b"old", Reject, 6),
    ]
    assert all(m.reason == "sent before the broker reconnected" for _, m in replies)
    # Another broker's connection is not fenced by it.
    assert admission.admit(b"other", [_hello(7, broker="b2")])
    assert b"new" in admission and b"other" in admission
