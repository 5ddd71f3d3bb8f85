"""``carelay status``: the processes of a running relay, from its status files."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

from carelay.common.config import STATUS_INTERVAL, Config
from carelay.common.fields import split_field
from carelay.common.naming import InvalidPvName
from carelay.common.sharding import shard_for

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
        proc["store_error"] = own.get("store_error") if fresh else None
        proc["store_failed_since"] = own.get("store_failed_since") if fresh else None
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
    for p in status["processes"]:
        if p.get("store_error"):
            since = _when(p.get("store_failed_since"))
            error = p["store_error"]
            print(f"{p['name']}: store cannot be written since {since}: {error}", file=out)
            ok = False
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


def print_owner(config: Config, name: str, out=sys.stdout) -> int:
    """Which shard owns ``name``, and whether its store holds it (0), or not (1)."""
    base, _ = split_field(name)
    try:
        config.pv_spec(base)
    except InvalidPvName as e:
        print(f"{name}: not a relay PV name: {e}", file=out)
        return 2
    shard = shard_for(base, config.shards)
    held = _store_holds(config.store_path(shard), base)
    where = {True: "stored", False: "not stored", None: "store not readable"}[held]
    print(f"{base}: shard {shard} of {config.shards} ({where})", file=out)
    return 0 if held else 1


def _store_holds(path, name: str) -> bool | None:
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT 1 FROM pvs WHERE name = ?", (name,)).fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return None
