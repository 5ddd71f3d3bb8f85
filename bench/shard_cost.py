"""``python -m bench.shard_cost``: what one put costs a shard, with the machine to itself.

W8's put as a shard takes it: a WRITE with completion (a one-element write run) from a
front-end that watches the PV (WATCH, as the PVA front-end does while a channel holds
it), a second front-end connected (as the CA broker is), one put at a time, each sent
once the last was answered.  Against:

- ``shard``: carelay's ShardServer and its serve loop (store, autosave, read gate,
  outbox), over ipc, in a process of its own;
- ``echo``: the floor, a process that answers each message at once through the same
  ZeroMQ sockets (ROUTER, ipc) and the same poll (the socket and a signal pipe), and
  does nothing else.

Each server's threads are read from /proc before and after the puts (see
bench/callback_cost.py): CPU time, its part in the kernel and context switches per put,
by thread (``main``, ZeroMQ's ``ZMQbg/IO/0``), and the time of one round trip.  Under
W8 a shard shares two cores with the PVA front-end, the CA broker and the clients, and
its figures there swell with that; here each figure is the code's own, and shard
against echo, in one run, is what the shard's work per put adds to the wake it cannot
avoid.

``--profile``: the shard's serve loop runs under cProfile, whose top functions it
prints at the end (its CPU figures are then the profiler's, not the shard's).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import zmq

from bench import callback_cost

PREFIX = "S:"
NAME = f"{PREFIX}cost_f1"
#: How long a server may take to start (s).
_START = 30.0


def _shard(data_dir: str, profile: bool, ready) -> None:
    from carelay.common.config import load_config
    from carelay.common.lifecycle import StopFlag
    from carelay.shard.persist import ShardDatabase
    from carelay.shard.server import ShardServer

    config = load_config(None, prefix=PREFIX, shards=1, data_dir=data_dir)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    server = ShardServer(config, 0, db=ShardDatabase(config.store_path(0)))
    server.load()
    server.bind()
    stop = StopFlag()
    server.wake_on_signals()
    ready.send(server.endpoint)
    if not profile:
        server.serve(stop)
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(server.serve, stop)
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    sys.stdout.flush()


def _echo(endpoint: str, ready) -> None:
    """Answer each message with itself, at once; until SIGTERM."""
    import signal

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)
    ready.send(endpoint)
    while not stopping:
        poller.poll(500)
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            sock.send_multipart(frames, copy=False)


def _start(target, args) -> tuple[multiprocessing.Process, str]:
    ctx = multiprocessing.get_context("spawn")
    theirs, ours = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    deadline = time.monotonic() + _START
    while not ours.poll(0.1):
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{target.__name__} did not start (exit code {proc.exitcode})")
    return proc, ours.recv()


class _Client:
    """A front-end as the shard sees one: HELLO (following), then requests that wait for
    their answer."""

    def __init__(self, endpoint: str, name: str) -> None:
        from carelay.common.messages import Hello

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ask([Hello(1, "", name, True)])

    def send(self, msgs: list) -> None:
        from carelay.common.protocol import encode_batch, send_frames

        send_frames(self.sock, encode_batch(msgs))

    def ask(self, msgs: list, answered: bool = False) -> None:
        """Send ``msgs`` and wait for a reply: with ``answered``, for one that holds a
        message with a request number (the shard's answer); else any (the echo's)."""
        from carelay.common.protocol import decode_batch

        self.send(msgs)
        while True:
            if not self.sock.poll(10_000):
                raise RuntimeError("no answer within 10 s")
            frames = self.sock.recv_multipart(copy=False)
            if not answered:
                return
            if any(getattr(m, "req", 0) for m in decode_batch(frames)):
                return


def _write(k: int):
    from carelay.common.runs import WriteRun

    run = WriteRun(np.dtype("<f8"))
    run.add(NAME, 10 + k, time.time(), np.array([float(k)]))
    run.expires = time.time() + 10.0
    return run


def measure(kind: str, n: int, profile: bool = False) -> dict:
    """Puts one at a time to ``kind`` (``shard`` or ``echo``): CPU us and context switches
    per put by thread, and the round trip (us)."""
    from carelay.common.messages import Put, Watch

    with tempfile.TemporaryDirectory(prefix="shard-cost-") as run:
        if kind == "shard":
            proc, endpoint = _start(_shard, (str(Path(run) / "data"), profile))
            other = _Client(endpoint, "other")  # the second front-end, as the CA broker
            client = _Client(endpoint, "cost")
            client.ask([Put(NAME, 2, 0.0, np.array([0.0]))], answered=True)
            client.send([Watch(0, NAME, True)])
            answered = True
        else:
            other = None
            proc, endpoint = _start(_echo, (f"ipc://{run}/echo",))
            client = _Client(endpoint, "cost")
            answered = False
        try:
            for k in range(min(200, n)):  # warm up
                client.ask([_write(k)], answered)
            sampler = callback_cost.ThreadSampler(kind=callback_cost.thread_name)
            sampler.start(SimpleNamespace(pids=lambda: {kind: proc.pid}), kind)
            t0 = time.perf_counter()
            for k in range(n):
                client.ask([_write(k)], answered)
            wall = time.perf_counter() - t0
            sampler.stop()
        finally:
            proc.terminate()
            proc.join(10)
            for c in (client, other):
                if c is not None:
                    c.sock.close()
    return {"per_op": sampler.per_op(n), "round_trip_us": wall / n * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shard_cost", description=__doc__)
    ap.add_argument("--n", type=int, default=10000, help="puts (default 10000)")
    ap.add_argument("--profile", action="store_true", help="the shard under cProfile")
    args = ap.parse_args(argv)
    results = {}
    for kind in ("shard", "echo"):
        r = results[kind] = measure(kind, args.n, args.profile and kind == "shard")
        print(f"{kind}: {r['round_trip_us']:.0f} us per round trip, {args.n} puts")
        callback_cost.print_threads(r["per_op"])
    shard, echo = (sum(results[k]["per_op"].cpu_us.values()) for k in ("shard", "echo"))
    # /proc counts CPU in ticks (10 ms): a short run may read none.
    ratio = f"{shard / echo:.2f}x" if echo else "n/a (no CPU tick read: more puts)"
    print(f"shard / echo CPU per put: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
