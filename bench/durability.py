"""Durability figures: autosave flush cost, and time from a shard's SIGKILL to serving again.

    python -m bench.durability [--pvs 10000] [--kills 5]

Flush cost is measured on the shard's own store and autosave file (no
network), so it is the cost the shard loop pays every autosave period.
Recovery is measured against a real ``carelay up`` on a free port.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.servers import CarelayServer, client_env
from carelay.common.sharding import shard_for
from carelay.shard.persist import ShardDatabase
from carelay.shard.store import ShardStore

PREFIX = "B:"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flush_costs(n_pvs: int, repeats: int = 5) -> dict:
    """Seconds to flush n_pvs changed f1 PVs, and one changed F1000000 buffer."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = ShardDatabase(Path(tmp) / "scalars.sqlite")
        db.open()
        store = ShardStore(PREFIX, 1_000_000, 128)
        names = [f"{PREFIX}pv{i}_f1" for i in range(n_pvs)]
        for name in names:
            store.put(name, np.array([1.0]))
        out["create_commit_s"] = _timed(lambda: db.save(*store.unsaved_changes()))
        store.committed()
        times = []
        for r in range(repeats):
            for name in names:
                store.put(name, np.array([float(r)]))
            times.append(_timed(lambda: db.save(store.dirty_rows())))
            store.dirty.clear()
        out["scalar_flush_s"] = statistics.median(times)
        db.close()

        db = ShardDatabase(Path(tmp) / "buffer.sqlite")
        db.open()
        store = ShardStore(PREFIX, 1_000_000, 128)
        name = f"{PREFIX}big_F1000000"
        chunk = np.arange(1000, dtype=np.float64)
        for _ in range(1000):
            store.put(name, chunk)
        db.save(*store.unsaved_changes())
        store.committed()
        times = []
        for _ in range(repeats):
            for _ in range(100):  # 100 appends between two flushes
                store.put(name, chunk)
            times.append(_timed(lambda: db.save(store.dirty_rows())))
            store.dirty.clear()
        out["buffer_flush_s"] = statistics.median(times)
        out["buffer_store_bytes"] = db.size()
        db.close()
    return out


def recovery_times(kills: int, n_pvs: int = 1000) -> list[float]:
    """Seconds from SIGKILL of shard 0 until a put with callback to one of its PVs succeeds
    and reads back."""
    with CarelayServer(set(), shards=2) as relay:
        os.environ.update(client_env(relay.port))
        from caproto.threading.client import Context

        ctx = Context()
        try:
            names = [f"{relay.prefix}r{i}_f1" for i in range(n_pvs)]
            pvs = ctx.get_pvs(*names, timeout=10)
            for pv in pvs:
                pv.wait_for_connection(timeout=10)
            for i, pv in enumerate(pvs):
                pv.write([float(i)], wait=True, timeout=10)
            probe = next(pv for pv in pvs if shard_for(pv.name, 2) == 0)
            times = []
            for k in range(kills):
                pid = relay.pids()["shard0"]
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                while True:
                    ok = probe.write([1e6 + k], wait=True, timeout=5).status.success
                    if ok and probe.read().data[0] == 1e6 + k:
                        break
                    time.sleep(0.01)
                times.append(time.monotonic() - t0)
                time.sleep(1.0)  # let the supervisor's back-off settle
            return times
        finally:
            ctx.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pvs", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    costs = flush_costs(args.pvs)
    print(f"creation commit, {args.pvs} f1 PVs: {costs['create_commit_s'] * 1e3:.1f} ms")
    print(f"value flush, {args.pvs} changed f1 PVs: {costs['scalar_flush_s'] * 1e3:.1f} ms")
    print(
        f"value flush, one changed F1000000 buffer: {costs['buffer_flush_s'] * 1e3:.1f} ms "
        f"(store {costs['buffer_store_bytes'] / 2**20:.1f} MiB)"
    )
    times = recovery_times(args.kills)
    print(
        f"shard SIGKILL to serving again (put with callback + read), {args.kills} kills: "
        f"median {statistics.median(times):.2f} s, max {max(times):.2f} s"
    )


if __name__ == "__main__":
    main()
