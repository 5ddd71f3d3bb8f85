"""``carelay status``: the processes of a running relay, from its status files."""

from __future__ import annotations

import json
import os
import sys
import time

from carelay.common.config import STATUS_INTERVAL, Config

#: A status file older than this many intervals belongs to a process that is gone.
_STALE_INTERVALS = 5


def _read(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect(config: Config) -> dict | None:
    """The supervisor's view merged with each child's own; None when no relay runs."""
    sup = _read(config.run_dir / "supervisor.json")
    if sup is None or not _alive(sup.get("pid")):
        return None
    fresh_after = time.time() - STATUS_INTERVAL * _STALE_INTERVALS
    for proc in sup.get("processes", []):
        role = proc["name"].replace(" ", "-")
        own = _read(config.run_dir / f"{role}.json")
        fresh = own and own.get("pid") == proc.get("pid") and own.get("written", 0) > fresh_after
        proc["pvs"] = own.get("pvs") if fresh else None
        # The store outlives the process: show its last flush and size even while it is down.
        proc["last_flush"] = own.get("last_flush") if own else None
        proc["store_bytes"] = own.get("store_bytes") if own else None
    return sup


def print_status(config: Config, out=sys.stdout) -> int:
    """Print the process table; 0 while the relay runs, 1 when it does not."""
    status = collect(config)
    if status is None:
        print(f"carelay is not running (data directory {config.data_dir})", file=out)
        return 1
    print(
        f"carelay running: supervisor pid {status['pid']}, up {status['uptime']:.0f} s, "
        f"prefix {status['config']['prefix']}",
        file=out,
    )
    print(
        f"{'PROCESS':<10} {'PID':>8} {'STATE':<11} {'UPTIME':>9} {'RESTARTS':>8} {'PVS':>7} "
        f"{'LAST FLUSH':>19} {'STORE':>10}",
        file=out,
    )
    ok = True
    for p in status["processes"]:
        pvs = "-" if p.get("pvs") is None else str(p["pvs"])
        pid = "-" if p.get("pid") is None else str(p["pid"])
        shard = p["name"].startswith("shard")
        flush = _when(p.get("last_flush")) if shard else ""
        store = _size(p.get("store_bytes")) if shard else ""
        print(
            f"{p['name']:<10} {pid:>8} {p['state']:<11} {p['uptime']:>8.0f}s "
            f"{p['restarts']:>8} {pvs:>7} {flush:>19} {store:>10}",
            file=out,
        )
        ok = ok and p["state"] == "running"
    return 0 if ok else 3


def _when(stamp: float | None) -> str:
    if not stamp:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return "-"
