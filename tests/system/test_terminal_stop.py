"""Ctrl-C at the terminal stops the relay in order, as SIGTERM to the supervisor does.

A terminal sends SIGINT to its whole foreground process group.  If the broker and the
shards shared the supervisor's group, every process would stop at once: shards could
close while the broker still sends them its last puts.  The supervisor alone must get
the terminal's signal, and stop the broker first, then the shards.  A broker that is
busy (here: hung, so that it is busy for as long as the test needs) shows the order."""

from __future__ import annotations

import os
import signal
import subprocess

from .conftest import READY_TIMEOUT, Relay, wait_for


def test_ctrl_c_at_a_terminal_stops_the_broker_before_the_shards(tmp_path):
    relay = Relay(tmp_path, shards=2)
    Relay.give_way()
    with open(relay.log_path, "ab") as log:
        # A job of its own, as a shell runs a command in the foreground.
        proc = subprocess.Popen(
            relay.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: proc.poll() is not None or "ready:" in relay.log(),
                READY_TIMEOUT,
                what="the relay's ready line",
            )
            assert proc.poll() is None, relay.log()
            relay.proc = proc
            (broker,) = [pid for pid in relay.children() if _role(pid) == "broker"]
            os.kill(broker, signal.SIGSTOP)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
            assert proc.wait(30) == 0, relay.log()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    lines = relay.log().splitlines()

    def first(pred) -> int:
        return next((i for i, line in enumerate(lines) if pred(line)), len(lines))

    broker_gone = first(lambda line: "broker did not stop" in line)
    shard_stopped = first(lambda line: " shard " in line and "stopped" in line)
    assert broker_gone < len(lines), relay.log()
    assert shard_stopped < len(lines), relay.log()
    # The shards served until the broker was gone: none stopped on the terminal's SIGINT.
    assert broker_gone < shard_stopped, relay.log()


def _role(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return "broker" if b"broker" in argv else "shard" if b"shard" in argv else "?"


def _spawned(tmp_path, shards: int = 1):
    """``carelay up`` started, and returned as soon as its children exist: none of them has
    run a line of its own yet (Python is still starting in each)."""
    relay = Relay(tmp_path, shards=shards)
    Relay.give_way()
    log = open(relay.log_path, "ab")  # noqa: SIM115 - closed by the caller's relay.stop()
    relay._log = log
    relay.proc = subprocess.Popen(
        relay.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    # The supervisor, the broker and the shards.
    wait_for(lambda: len(relay.children()) >= 2 + shards, 30, what="the children spawned")
    return relay


def test_a_stop_while_the_children_start_is_a_clean_stop(tmp_path):
    """SIGTERM (systemctl stop) before the children have their handlers: it waits for
    them, so each stops cleanly, and the relay exits 0 ("every value saved")."""
    relay = _spawned(tmp_path)
    try:
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(30) == 0, relay.log()
    finally:
        relay.stop()
    assert "killed by SIGTERM" not in relay.log()
    assert " died " not in relay.log()


def test_a_reload_while_the_children_start_kills_none(tmp_path):
    """SIGHUP (systemctl reload) forwarded to a broker still starting: the broker loads the
    access security anyway, and must not die of the signal."""
    relay = _spawned(tmp_path)
    try:
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_ready()
        assert "SIGHUP" not in relay.log() and " died " not in relay.log()
    finally:
        relay.stop()
