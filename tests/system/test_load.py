"""Load: 50 CA clients connecting, putting with callback and disconnecting, for 20 seconds.

Ten client processes (spawned: libca and forks do not mix) run five clients
each, one thread per client.  A client is a caproto context of its own, so
each is a CA client of its own with its own TCP circuit; it connects its own
PVs, makes a round of puts with callback, disconnects, and starts again,
until the deadline.  Everything is bounded: the run by a deadline, each
round by a number of puts, each put and connection by a timeout.

At the end: every relay process is the one that started (nothing died), the
relay failed no put, every PV holds the last value whose put was
acknowledged, and the relay's memory (VmRSS of its processes, after warm-up
against the end) grew by less than RSS_GROWTH_LIMIT.  ``pytest -s`` shows
the figures.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np

from tests.system.conftest import CA_ENV, wait_for
from tests.system.test_processes import status_rows

PROCESSES = 10
CLIENTS_PER_PROCESS = 5
#: Seconds the clients run, counted from when they are spawned.
RUN_SECONDS = 20.0
PUTS_PER_ROUND = 20
MAX_ROUNDS = 10_000
PUT_TIMEOUT = 5.0
#: Rounds every client completes before the first memory sample.
WARMUP_ROUNDS = 2
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


def _client(index: int, names: list[str], deadline: float, puts, rounds, out: dict) -> None:
    """One CA client: rounds of connect, PUTS_PER_ROUND puts with callback, disconnect."""
    from tests.system.clients import Context, close

    acked: dict[str, object] = {}
    unsure: dict[str, list] = {name: [] for name in names}
    problems: list[str] = []
    counts = {"acked": 0, "failed": 0, "timeouts": 0, "rounds": 0, "connect_failures": 0}
    value = index * 1_000_000.0
    try:
        while time.time() < deadline and counts["rounds"] < MAX_ROUNDS:
            ctx = Context()
            try:
                # Its own PVs, and a name never put to: provisional, read once, and
                # forgotten when this client lets go.
                probe = names[0].replace("_f1", f"x{counts['rounds']}_i1")
                pvs = ctx.get_pvs(*names, probe, timeout=PUT_TIMEOUT)
                try:
                    for pv in pvs:
                        pv.wait_for_connection(timeout=PUT_TIMEOUT)
                    pvs.pop().read(timeout=PUT_TIMEOUT)
                except TimeoutError:
                    counts["connect_failures"] += 1
                    problems.append(f"{time.time():.3f} " + ", ".join(repr(pv) for pv in pvs))
                    continue
                for k in range(PUTS_PER_ROUND):
                    if time.time() >= deadline:
                        break
                    pv = pvs[k % len(pvs)]
                    value += 1.0
                    data = [value] if pv.name.endswith("_f1") else [value, -value, value / 2]
                    try:
                        ok = pv.write(data, wait=True, timeout=PUT_TIMEOUT).status.success
                    except TimeoutError:
                        counts["timeouts"] += 1
                        unsure[pv.name].append(data)  # it may still be applied
                        continue
                    if ok:
                        acked[pv.name] = data
                        unsure[pv.name] = []
                        counts["acked"] += 1
                        with puts.get_lock():
                            puts.value += 1
                    else:
                        counts["failed"] += 1
            finally:
                close(ctx)
            counts["rounds"] += 1
            with rounds.get_lock():
                rounds.value += 1
    finally:
        out[index] = {"acked": acked, "unsure": unsure, "counts": counts, "problems": problems}


def _worker(env: dict, first: int, names: list, deadline: float, puts, rounds, results):
    """A client process: CLIENTS_PER_PROCESS clients, one thread each."""
    os.environ.update(env)
    out: dict = {}
    threads = [
        threading.Thread(target=_client, args=(first + k, ns, deadline, puts, rounds, out))
        for k, ns in enumerate(names)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.time()) + 60)
    results.put(out)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def relay_rss(relay) -> dict[str, int]:
    pids = {role: row["pid"] for role, row in status_rows(relay).items()}
    pids["supervisor"] = relay.proc.pid
    return {role: rss(pid) for role, pid in pids.items()}


def test_50_clients_for_twenty_seconds(make_relay):
    relay = make_relay(shards=2)
    pids = {role: row["pid"] for role, row in status_rows(relay).items()}
    clients = PROCESSES * CLIENTS_PER_PROCESS
    names = [[relay.name(f"load{c}", "f1"), relay.name(f"load{c}", "f3")] for c in range(clients)]
    env = {k: os.environ[k] for k in CA_ENV}
    mp = multiprocessing.get_context("spawn")
    puts, rounds = mp.Value("q", 0), mp.Value("q", 0)
    results = mp.Queue()
    started = time.monotonic()
    deadline = time.time() + RUN_SECONDS
    procs = [
        mp.Process(
            target=_worker,
            args=(
                env,
                p * CLIENTS_PER_PROCESS,
                names[p * CLIENTS_PER_PROCESS : (p + 1) * CLIENTS_PER_PROCESS],
                deadline,
                puts,
                rounds,
                results,
            ),
            daemon=True,
        )
        for p in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        # Warm-up: every client has connected, put and disconnected WARMUP_ROUNDS times.
        wait_for(
            lambda: rounds.value >= WARMUP_ROUNDS * clients,
            timeout=RUN_SECONDS,
            interval=0.2,
            what=f"{WARMUP_ROUNDS} rounds of every client",
        )
        warm_at = time.monotonic()
        warm_puts = puts.value
        before = relay_rss(relay)
        out: dict = {}
        for _ in procs:
            out.update(results.get(timeout=RUN_SECONDS + 90))
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    ended = time.monotonic()
    after = relay_rss(relay)

    keys = next(iter(out.values()))["counts"]
    totals = {key: sum(r["counts"][key] for r in out.values()) for key in keys}
    load_puts = puts.value - warm_puts
    growth = sum(after.values()) - sum(before.values())
    print(
        f"\nload: {clients} CA clients in {PROCESSES} processes, {ended - started:.1f} s: "
        f"{totals['acked']} puts acknowledged "
        f"({totals['acked'] / (ended - started):.0f}/s overall, "
        f"{load_puts / (ended - warm_at):.0f}/s after warm-up), {totals['rounds']} connect/"
        f"disconnect rounds, {totals['failed']} failed puts, {totals['timeouts']} timed out, "
        f"{totals['connect_failures']} failed connections"
    )
    for role in sorted(before):
        print(
            f"  {role:10s} RSS {before[role] / 2**20:7.1f} MiB after warm-up, "
            f"{after[role] / 2**20:7.1f} MiB at the end "
            f"({(after[role] - before[role]) / 2**20:+.1f})"
        )
    print(
        f"  total      RSS {sum(before.values()) / 2**20:7.1f} MiB -> "
        f"{sum(after.values()) / 2**20:7.1f} MiB ({growth / 2**20:+.1f} MiB)"
    )

    for result in out.values():
        for problem in result["problems"]:
            print("  connection failed:", problem)
    assert len(out) == clients, f"{clients - len(out)} clients did not report"
    assert {role: row["pid"] for role, row in status_rows(relay).items()} == pids
    assert relay.alive
    assert totals["acked"] > 0 and totals["rounds"] >= WARMUP_ROUNDS * clients
    # A put whose answer timed out on a slow machine is not counted against the
    # relay; its value is allowed for below.  A put the relay failed is.
    assert totals["failed"] == 0, totals
    # A caproto context now and then finds no answer to its search within PUT_TIMEOUT
    # under this load: about one in 3000, as often against a plain pcaspy server
    # with the same PVs, so a client-side effect.  The client starts a new round.
    assert totals["connect_failures"] <= totals["rounds"] // 100, totals
    log = relay.log()
    assert "Traceback" not in log and " died " not in log

    # Every PV holds the value of its last acknowledged put (or of a later put whose
    # acknowledgement timed out: it may have been applied after all).
    from tests.system.clients import Context, close

    ctx = Context()
    try:
        every = [name for ns in names for name in ns]
        # Only the PVs that were put to exist: none of the provisional names stayed.
        (pvlist,) = ctx.get_pvs(relay.prefix + "pvlist", timeout=10)
        listed = bytes(pvlist.read(data_count=0, timeout=10).data).rstrip(b"\0").decode()
        assert sorted(listed.split(",")) == sorted(every)
        pvs = dict(zip(every, ctx.get_pvs(*every, timeout=10), strict=True))
        for pv in pvs.values():
            pv.wait_for_connection(timeout=10)
        for result in out.values():
            for name, data in result["acked"].items():
                got = pvs[name].read(data_count=0, timeout=10).data.tolist()
                allowed = [data, *result["unsure"][name]]
                assert any(np.array_equal(got, a) for a in allowed), (name, got, allowed)
    finally:
        close(ctx)
    assert growth < RSS_GROWTH_LIMIT, f"relay RSS grew by {growth / 2**20:.1f} MiB"
