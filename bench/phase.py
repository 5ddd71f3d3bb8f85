"""One measured phase: client processes against one server, started together.

The clients are spawned (never forked: pyepics), connect, and report ready;
then the suite reads the server's CPU time and releases them all at once.
The *drivers* (writers, creators) end the phase: when each has reported its
result (or ``done``), the server's CPU time is read again.  The passive
clients (monitors, readers) are then told to stop and report theirs.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass, field

from bench.clients import client_main
from bench.servers import Server, client_env

READY_TIMEOUT = 180.0
PHASE_TIMEOUT = 900.0


class ClientError(RuntimeError):
    """A client process failed; the message holds its traceback."""


@dataclass
class PhaseResult:
    t0: float
    cpu_s: float
    #: CPU seconds of the phase per server process role (broker, shard0, ...).
    cpu_roles: dict[str, float] = field(default_factory=dict)
    results: dict[int, dict] = field(default_factory=dict)
    done: dict[int, dict] = field(default_factory=dict)

    def driver_span(self, drivers) -> float:
        """Seconds from the first driver's start to the last driver's end."""
        outs = [self.done[i] for i in drivers]
        return max(o["end"] for o in outs) - min(o["start"] for o in outs)


def run_phase(
    mp,
    server: Server,
    clients: list[tuple[str, dict]],
    drivers: list[int],
    *,
    on_done=None,
    profiler=None,
    tag: str = "",
) -> PhaseResult:
    """Run ``clients`` (function name in bench.clients, kwargs) against ``server``."""
    ready_q = mp.Queue()
    result_q = mp.Queue()
    go = mp.Event()
    stop = mp.Event()
    procs = [
        mp.Process(
            target=client_main,
            # Each client on the CA port the server gives it (one broker of several).
            args=(fn, client_env(server.client_port(i)), kwargs, i, ready_q, go, stop, result_q),
            daemon=True,
            name=f"bench-client-{fn}-{i}",
        )
        for i, (fn, kwargs) in enumerate(clients)
    ]
    results: dict[int, dict] = {}
    done: dict[int, dict] = {}

    def take(q, block_s: float):
        try:
            idx, status, payload = q.get(timeout=block_s)
        except queue.Empty:
            return False
        if status == "error":
            raise ClientError(f"client {clients[idx][0]}[{idx}] failed:\n{payload}")
        if status == "ok":
            results[idx] = payload
            done.setdefault(idx, payload)
        elif status == "done":
            done[idx] = payload
        elif status == "ready":
            ready.add(idx)
        return True

    ready: set[int] = set()
    finished = False
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(ready) < len(procs):
            if not take(ready_q, 0.2):
                _check(server, procs, deadline, "clients to be ready", range(len(procs)), ready)
        cpu0 = server.cpu_by_role()
        if profiler is not None:
            profiler.start(server, tag)
        t0 = time.monotonic()
        go.set()
        deadline = time.monotonic() + PHASE_TIMEOUT
        while not all(i in done for i in drivers):
            got = take(ready_q, 0.0) or take(result_q, 0.05)
            if not got:
                _check(server, procs, deadline, "the drivers to finish", drivers, done)
        cpu1 = server.cpu_by_role()
        if profiler is not None:
            profiler.stop()
        if on_done is not None:
            on_done()
        stop.set()
        deadline = time.monotonic() + 120
        while len(results) < len(procs):
            if not (take(result_q, 0.2) or take(ready_q, 0.0)):
                _check(server, procs, deadline, "the clients' results", range(len(procs)), results)
        roles = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
        finished = True
        return PhaseResult(t0, sum(roles.values()), roles, results, done)
    finally:
        if profiler is not None:
            profiler.stop()
        stop.set()
        if finished:
            for p in procs:
                p.join(timeout=10)
        # A failed phase: its clients are ended, not released into the workload.
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in (ready_q, result_q):
            with contextlib.suppress(Exception):
                q.close()
                q.join_thread()


#: pid -> when a client was first seen exited without its report.
_EXITED: dict[int, float] = {}


def _check(server, procs, deadline, what, expected=None, have=None) -> None:
    """Fail if the server died, a client exited without reporting, or time ran out."""
    server.check_alive()
    now = time.monotonic()
    for i, p in enumerate(procs):
        if p.exitcode is None or (expected is not None and (i not in expected or i in have)):
            continue
        # Exited: its last message may still be in a queue; give it a moment.
        first = _EXITED.setdefault(p.pid, now)
        if now - first > 5.0:
            raise ClientError(f"client {p.name} exited with {p.exitcode} before {what}")
    if now > deadline:
        raise ClientError(f"timed out waiting for {what}")
