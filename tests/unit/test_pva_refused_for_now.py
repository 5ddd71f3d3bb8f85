"""A PVA channel refused for now is no crash (see broker/pva/channels.py, Names).

p4p has no answer to ``makeChannel`` for "not now": it refuses the channel for anything
but a SharedPV, and reports the TypeError it raises through sys.excepthook, which the
relay's processes log as a crash ("pva crashed: TypeError", CRITICAL, in ERRORS).  A
real p4p server and client: the client's first channel is refused, its next served.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("p4p")

from carelay.broker.pva.channels import Channel, provider, quiet_refusals  # noqa: E402
from tests.unit.p4p_loopback import served  # noqa: E402


class _Front:
    """A front-end whose channels are refused for now at their first ``make_channel``."""

    def __init__(self) -> None:
        self.inbox = self
        self.made: dict[str, int] = {}

    def push(self, call, *args) -> None:
        call(*args)

    def test_channel(self, name: str) -> bool:
        return name.startswith("RN:")

    def make_channel(self, name: str, peer: str):
        self.made[name] = self.made.get(name, 0) + 1
        if self.made[name] == 1:
            return None
        channel = Channel(self, name)
        channel.prepare("d", {"value": 0.0})
        assert channel.opening(timeout=1.0)
        return channel

    def on_put(self, channel, op) -> None:
        channel.show({"value": op.value()["value"]})
        op.done()

    def on_first_connect(self, channel) -> None:
        pass

    def on_last_disconnect(self, channel) -> None:
        pass


@pytest.fixture
def hooked(monkeypatch):
    """What reaches the process's excepthook."""
    heard: list = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, exc, tb: heard.append((kind, exc)))
    quiet_refusals()
    return heard


def test_a_channel_refused_for_now_is_no_crash(hooked):
    front = _Front()
    names = provider(front)
    with served([names]) as ctx:
        ctx.put("RN:a", 2.5, timeout=10.0)
        assert ctx.get("RN:a", timeout=5.0) == 2.5
    assert front.made["RN:a"] == 2  # refused once, then served
    assert hooked == []


def test_other_errors_still_reach_the_hook(hooked):
    try:
        raise TypeError("something else")
    except TypeError as e:
        sys.excepthook(TypeError, e, e.__traceback__)
    assert [kind for kind, _ in hooked] == [TypeError]
