"""``max_bytes`` bounds the memory the relay's processes really take for PV values.

A relay filled to ``max_bytes`` with a mix of scalars, large buffers and large char
arrays (puts until a creation is refused) must grow, all its processes together, by no
more than MEMORY_SLACK times ``max_bytes``, and stay so after puts to monitored PVs and
a shard's restart: each copy of a value that stays (shard, broker mirror) is counted in
what a PV is charged, and the transient ones (CA events, autosave, ZeroMQ, snapshots)
must not stay.

``python -m tests.system.test_memory_bound [MAX_BYTES]`` prints the measurement per
process and stage (RSS before and after, and its peak) without asserting anything.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.system.conftest import wait_for

MAX_BYTES = 200_000_000
#: What the issue allows: summed RSS growth at most this times max_bytes.
MEMORY_SLACK = 1.25
#: The mix the relay is filled with, in turn: (type and count, elements per put).
MIX = (("c1000000", 1_000_000), ("F100000", 100_000), ("f1", 1))
#: RSS counts as settled when it moved less than this over SETTLE_SAMPLES samples.
SETTLE_BYTES = 2_000_000
SETTLE_SAMPLES = 8
SETTLE_INTERVAL = 0.5


def role(pid: int) -> str:
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return "?"
    for i, arg in enumerate(cmd):
        if arg in ("broker", "shard", "up"):
            return " ".join(cmd[i : i + 3]) if arg == "shard" else arg
    return " ".join(cmd[2:4])


def rss(relay) -> dict[str, int]:
    """RSS of each of the relay's processes, by role."""
    out = {}
    for pid in relay.children():
        with contextlib.suppress(psutil.Error):
            out[f"{role(pid)} [{pid}]"] = psutil.Process(pid).memory_info().rss
    return out


def peak(key: str) -> int:
    """Highest RSS so far (VmHWM) of the process a ``rss`` key names; 0 if gone."""
    pid = key.rsplit("[", 1)[-1].rstrip("]")
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    kb = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(kb[0]) * 1024 if kb else 0


def settled_rss(relay) -> dict[str, int]:
    """RSS per process once the sum has stopped moving (autosave writes done, say)."""
    samples: list[dict[str, int]] = []

    def still():
        samples.append(rss(relay))
        last = [sum(s.values()) for s in samples[-SETTLE_SAMPLES:]]
        return len(last) == SETTLE_SAMPLES and max(last) - min(last) < SETTLE_BYTES

    wait_for(still, timeout=60, interval=SETTLE_INTERVAL, what="the relay's RSS to settle")
    return samples[-1]


def value(type_count: str, n: int, k: int):
    if type_count.startswith("c"):
        return np.full(n, 65 + k % 26, dtype=np.uint8)
    return np.arange(n, dtype=np.float64) + k


def fill(relay, ctx, limit_refused) -> list[tuple[str, object]]:
    """Create PVs of MIX in turn until one is refused; returns (name, value) of each.
    Each buffer gets a second, partial append, so that it wraps and is saved again."""
    made = []
    for k in itertools.count():
        type_count, n = MIX[k % len(MIX)]
        name = relay.name(f"m{k}", type_count)
        (pv,) = ctx.get_pvs(name, timeout=2)
        try:
            pv.wait_for_connection(timeout=2)
        except TimeoutError:
            # Refused, or slow to answer on a busy machine: the log says which.
            try:
                wait_for(lambda n=name: limit_refused(n), timeout=5, what=f"{name} refused")
                return made
            except AssertionError:
                pv.wait_for_connection(timeout=30)
        v = value(type_count, n, k)
        pv.write(v, wait=True, timeout=30)
        if type_count.startswith("F"):
            tail = value(type_count, n // 3, k + 1)
            pv.write(tail, wait=True, timeout=30)
            v = np.concatenate((v[n // 3 :], tail))
        made.append((pv, v))


def measure(relay, ctx) -> tuple[dict[str, int], dict[str, int], list]:
    """(RSS per process before, after filling to max_bytes, (PV, value) of each PV made)."""
    before = settled_rss(relay)
    log_start = len(relay.log())

    def limit_refused(name):
        text = relay.log()[log_start:]
        return f"refused PV name {name}: max_bytes" in text

    made = fill(relay, ctx, limit_refused)
    return before, settled_rss(relay), made


def stages(relay, ctx):
    """Fill the relay to max_bytes, then put to every PV while monitored (an event each),
    then kill shard 0 (its restart reloads the autosave and sends a snapshot to the
    broker); yields (stage, RSS per process before filling, RSS after the stage, PVs made)
    after each."""
    before, after, made = measure(relay, ctx)  # until a creation is refused
    yield "filled", before, after, made
    for pv, _ in made:
        pv.subscribe(data_type="time").add_callback(lambda *args, **kwargs: None)
    for pv, v in made:
        pv.write(v[-len(v) // 2 :] if pv.name.endswith("F100000") else v, wait=True, timeout=30)
        if pv.name.endswith("F100000"):
            v[:] = np.concatenate((v[len(v) - len(v) // 2 :], v[-len(v) // 2 :]))
    # Settling takes at least 3.5 s (SETTLE_SAMPLES, SETTLE_INTERVAL), over three autosave
    # periods: the values are saved before the kill.
    yield "monitored puts", before, settled_rss(relay), made
    (shard,) = [pid for pid in relay.children() if role(pid).startswith("shard 0")]
    start = len(relay.log())
    os.kill(shard, signal.SIGKILL)
    wait_for(
        lambda: "shard 0 in sync" in relay.log()[start:], timeout=60, what="shard 0 in sync again"
    )
    yield "shard 0 restarted", before, settled_rss(relay), made


def report(before, after, max_bytes) -> str:
    lines = []
    for key in sorted(after):
        grown = after[key] - before.get(key, 0)
        was = before.get(key, 0)
        lines.append(
            f"  {key}: {was / 1e6:.0f} -> {after[key] / 1e6:.0f} MB (+{grown / 1e6:.0f}),"
            f" peak {peak(key) / 1e6:.0f} MB"
        )
    growth = sum(after.values()) - sum(before.values())
    lines.append(f"  all: +{growth / 1e6:.0f} MB = {growth / max_bytes:.2f} x max_bytes")
    return "\n".join(lines)


@pytest.fixture
def ca():
    from tests.system.clients import Context

    ctx = Context()
    yield ctx
    ctx.disconnect()


def within_slack(before, after) -> str:
    growth = sum(after.values()) - sum(before.values())
    text = report(before, after, MAX_BYTES)
    assert growth <= MEMORY_SLACK * MAX_BYTES, text
    return text


@pytest.mark.slow
def test_a_relay_filled_to_max_bytes_grows_by_at_most_its_slack(make_relay, ca):
    relay = make_relay(extra=["--max-bytes", str(MAX_BYTES)])
    for stage, before, after, made in stages(relay, ca):
        assert len(made) >= len(MIX)
        print(f"\n{stage}, {len(made)} PVs:\n{within_slack(before, after)}")
    # What exists keeps its values.
    for pv, v in made[:: max(1, len(made) // 12)] + made[-3:]:
        got = np.asarray(pv.read(timeout=30).data)
        np.testing.assert_array_equal(got[: len(v)], v)


if __name__ == "__main__":
    import tempfile

    from tests.system.clients import Context
    from tests.system.conftest import Relay

    limit = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        r = Relay(Path(tmp), extra=["--max-bytes", str(limit)]).start()
        ctx = Context()
        try:
            for stage, b, a, m in stages(r, ctx):
                print(f"{stage}: {len(m)} PVs, max_bytes {limit / 1e6:.0f} MB")
                print(report(b, a, limit), flush=True)
        finally:
            ctx.disconnect()
            r.stop()
