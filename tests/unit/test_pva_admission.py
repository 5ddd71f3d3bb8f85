"""A shard admits the PVA front-end beside the CA brokers: its HELLO carries an id of
its own, so neither fences the other, and a restarted PVA front-end fences only its own
earlier connection."""

from __future__ import annotations

from carelay.broker.pva.front import PvaFrontEnd
from carelay.common.config import load_config
from carelay.common.messages import Hello
from carelay.shard.admission import Admission


def test_the_pva_front_end_is_one_more_peer(tmp_path):
    config = load_config(None, data_dir=str(tmp_path))
    old, new = PvaFrontEnd(config, token="t"), PvaFrontEnd(config, token="t")
    try:
        admission = Admission("t", lambda peer, msg: None)
        assert admission.admit(b"broker0", [Hello(1, "t", "ca-broker-id")])
        assert admission.admit(b"pva", [Hello(1, old.token, old.instance)])
        assert admission.peers() == [b"broker0", b"pva"]
        # kill -9 and restart: a new process, a new id; broker 0 stays served.
        assert new.instance != old.instance
        assert admission.admit(b"pva-again", [Hello(1, new.token, new.instance)])
        assert admission.peers() == [b"broker0", b"pva", b"pva-again"]
        # The same process saying HELLO again (a reconnect) fences its earlier connection.
        assert admission.admit(b"pva-third", [Hello(2, new.token, new.instance)])
        assert admission.peers() == [b"broker0", b"pva", b"pva-third"]
    finally:
        old.inbox.close()
        new.inbox.close()
