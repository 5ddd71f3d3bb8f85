"""A PVA channel is open before a client can attach to it (see broker/pva/channels.py).

pvxs opens a PV that clients wait for while it holds the PV's lock, and waits there for
the server's thread, which takes that lock for each client attaching: so the front-end
hands a channel out (``make_channel``, on the server's thread) only once it is open,
with what the loop prepared for it.  Real p4p channels, no server: these tests play the
server's thread and the loop's.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("p4p")

from carelay.broker.linkstate import LinkState  # noqa: E402
from carelay.broker.pva import front as front_module  # noqa: E402
from carelay.broker.pva.channels import Channel  # noqa: E402
from carelay.broker.pva.front import PvaFrontEnd  # noqa: E402
from carelay.common.config import load_config  # noqa: E402


@pytest.fixture
def front(tmp_path):
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path)))
    f.make_channel_object = Channel
    f.ready = True
    yield f
    f.inbox.close()


def _handed_out(front, name: str) -> tuple[threading.Thread, dict]:
    """``make_channel(name)`` on a thread of its own, as the PVA server's thread calls it."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("channel", front.make_channel(name)))
    thread.start()
    return thread, out


def test_a_new_channel_is_handed_out_open_once_the_loop_prepared_it(front):
    name = front.config.pvlist_name
    thread, out = _handed_out(front, name)
    thread.join(0.2)
    assert thread.is_alive() and "channel" not in out  # it waits for the loop
    front.inbox.run()  # the loop's turn: it prepares the channel
    thread.join(5)
    channel = out["channel"]
    assert channel is front.channels[name] and channel.opened
    assert channel.isOpen() and channel.current()["value"] == ""
    assert front.make_channel(name) is channel  # handed out again, open


def test_a_change_shown_before_the_opening_is_in_it():
    channel = Channel(None, "P:x_f1")
    channel.prepare("d", {"value": 1.0})
    channel.show({"value": 2.0})  # the loop posts before the server's thread opens it
    assert channel.opening(1.0)
    assert channel.current()["value"] == 2.0


def test_a_channel_the_loop_does_not_prepare_in_time_is_refused_for_now(front, monkeypatch):
    monkeypatch.setattr(front_module, "PVA_OPEN_WAIT", 0.1)
    name = front.config.pvlist_name
    assert front.make_channel(name) is None  # the client searches again
    front.inbox.run()  # the loop: its preparation, then the drop of the refused channel
    assert name not in front.channels
    thread, out = _handed_out(front, name)
    while thread.is_alive():
        front.inbox.run()
        thread.join(0.01)
    assert out["channel"].opened


def test_a_channel_closed_before_its_opening_is_not_handed_out(front):
    name = front.config.pvlist_name
    thread, out = _handed_out(front, name)
    while name not in front.channels:
        thread.join(0.01)
    front.drop_channel(front.channels[name])  # e.g. new access rules, before the loop's turn
    thread.join(5)
    assert out["channel"] is None


def test_a_new_name_whose_channel_was_refused_for_now_holds_no_place(tmp_path, monkeypatch):
    """A client's first channel to a name no PV has yet, given up (its shard hung past
    PVA_OPEN_WAIT): the provisional PV made for it goes with the channel.  Kept, each
    such name took one of ``max_pvs`` provisional places until the PVA front-end
    restarted, and once they were all taken every new name was refused."""
    monkeypatch.setattr(front_module, "PVA_OPEN_WAIT", 0.05)
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path), max_pvs=3))
    f.make_channel_object = Channel
    f.ready = True
    for link in f.links:  # in sync, as far as the front-end knows, and then silent
        link.state = LinkState.LIVE
    try:
        for k in range(5):
            name = f"P:new{k}_f1"
            assert f.make_channel(name) is None  # no shard answers: refused for now
            f.inbox.run()  # the loop: the channel's PV made, then dropped with it
            assert name not in f.channels
            assert name not in f.table.pvs
        assert f.table.n_provisional == 0
        assert f.table.provisional_full() is None
    finally:
        f.inbox.close()
