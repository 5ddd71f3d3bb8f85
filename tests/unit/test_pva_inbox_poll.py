"""The PVA loop runs its inbox when the poll found the inbox's pipe readable, and only
then: also while no shard has a socket, and never a look at an empty pipe per turn."""

from __future__ import annotations

import threading

import pytest

from carelay.broker.pva.front import PvaFrontEnd
from carelay.common.config import load_config


@pytest.fixture
def front(tmp_path):
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path)))
    yield f
    f.inbox.close()


def test_a_queued_call_is_seen_with_no_shard_socket(front):
    assert all(link.sock is None for link in front.links)
    ran = []
    front.inbox.push(ran.append, 1)
    front.sync.poll(0)
    assert front.sync.woken
    assert front.inbox.run() == 1 and ran == [1]


def test_an_empty_pipe_is_not_due(front):
    front.sync.poll(0)
    assert not front.sync.woken


class _Stop:
    stopping = False


def test_the_loop_runs_a_call_queued_by_another_thread(front):
    stop = _Stop()
    done = threading.Event()

    def call() -> None:
        stop.stopping = True
        done.set()

    loop = threading.Thread(target=front.loop.run, args=(stop,), daemon=True)
    loop.start()
    try:
        threading.Timer(0.05, front.inbox.push, (call,)).start()
        assert done.wait(10)
    finally:
        stop.stopping = True
        loop.join(10)
    assert not loop.is_alive()
