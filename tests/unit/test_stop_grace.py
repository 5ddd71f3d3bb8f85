"""A stopping shard is given time while it still saves, and no more once it hangs.

The supervisor gave every shard STOP_GRACE (3 s) from the start of the whole stop, then
SIGKILL: a shard whose last flush was large (400 PVs of 200,000 doubles, with a long
autosave period) was killed half way, and every value of its last round was lost,
though its clients had been told their puts completed.  Real child processes here: one
that writes for several grace periods after its SIGTERM, one that hangs, one that
writes for good; the grace is made short.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from carelay.supervisor.watcher import Watcher

GRACE = 0.3


def _child(tmp_path: Path, on_term: str) -> tuple[Watcher, Path]:
    """A Watcher of a child that runs ``on_term`` on SIGTERM (with ``out``, a file, open);
    started, and ready for the signal."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    body = textwrap.indent(textwrap.dedent(on_term).strip(), "    ")
    code = "\n".join(
        [
            "import os, signal, sys, time",
            f"out = open({str(out)!r}, 'w')",
            "def term(*_):",
            body,
            "signal.signal(signal.SIGTERM, term)",
            # Held by the Watcher until the child is ready, as carelay's own children do.
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})",
            f"open({str(ready)!r}, 'w').close()",
            "while True:",
            "    signal.pause()",
        ]
    )
    w = Watcher("child", [sys.executable, "-c", code])
    w.start()
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert w.proc.poll() is None, "the child died at its start"
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.01)
    return w, out


def _stop(w: Watcher, limit: float) -> bool:
    start = time.monotonic()
    w.signal(signal.SIGTERM)
    return w.wait_while_working(w.progress(), start, GRACE, limit)


@pytest.fixture
def children():
    made: list[Watcher] = []
    yield made
    for w in made:
        w.kill()


def test_a_child_still_writing_is_given_time_until_it_is_done(tmp_path, children):
    # About 1.5 s of writing: five grace periods.
    w, out = _child(
        tmp_path,
        """
        for k in range(30):
            out.write("x" * 65536); out.flush(); os.fsync(out.fileno()); time.sleep(0.05)
        out.write("done"); out.close(); sys.exit(0)
        """,
    )
    children.append(w)
    assert _stop(w, limit=30)
    assert w.proc.returncode == 0
    assert out.read_text().endswith("done")


def test_a_hung_child_is_given_the_grace_alone(tmp_path, children):
    w, _ = _child(tmp_path, "time.sleep(3600)")
    children.append(w)
    assert not _stop(w, limit=30)
    assert w.proc.poll() is None  # still there: the caller kills it


def test_a_stopped_child_is_not_taken_for_one_at_work(tmp_path, children):
    w, _ = _child(tmp_path, "time.sleep(3600)")
    children.append(w)
    os.kill(w.proc.pid, signal.SIGSTOP)
    try:
        assert not _stop(w, limit=30)
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)


def test_a_child_that_writes_for_good_is_stopped_at_the_limit(tmp_path, children):
    w, _ = _child(
        tmp_path,
        """
        while True:
            out.write("x" * 4096); out.flush(); time.sleep(0.01)
        """,
    )
    children.append(w)
    start = time.monotonic()
    assert not _stop(w, limit=1.0)
    assert time.monotonic() - start >= 1.0  # it was given time: more than the grace
