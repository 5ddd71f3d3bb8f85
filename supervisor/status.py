"""``carelay status``: the processes of a running relay, from its status files.

Every process rewrites its status file in ``data_dir/run`` when what it says
changes, and touches it meanwhile (each STATUS_INTERVAL; the supervisor, which
wakes only for events, each STATUS_TOUCH_INTERVAL): its age is its mtime.  The
supervisor's lists its children and the configuration the relay runs with.
A child is "running" only while it answers: its own file is fresh and, for a
shard, the broker's link to it is live.  A child that is alive but silent is
"not answering".  Prefix, shard count and endpoints come from the running
relay, not from the flags given to ``carelay status``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from carelay.common import exits
from carelay.common.config import STARTUP_GRACE, STATUS_STALE_AFTER, Config
from carelay.common.fields import split_field
from carelay.common.lifecycle import broker_role, pid_alive, read_status, status_path
from carelay.common.naming import InvalidPvName
from carelay.common.procstat import read_stat
from carelay.common.sharding import shard_for
from carelay.shard.persist import store_holds
from carelay.supervisor.watcher import FLAPPING_DEATHS, FLAPPING_WINDOW, describe_exit

#: Exit statuses of ``carelay status``.
EXIT_RUNNING = exits.STATUS_RUNNING
EXIT_NOT_RUNNING = exits.STATUS_NOT_RUNNING
EXIT_PROBLEM = exits.STATUS_PROBLEM
#: Exit statuses of ``carelay status --pv NAME``.
EXIT_PV_STORED = exits.PV_STORED
EXIT_PV_NOT_STORED = exits.PV_NOT_STORED
EXIT_PV_NOT_A_NAME = exits.PV_NOT_A_NAME

#: A status file older than this belongs to a process that does not answer.
STALE_AFTER = STATUS_STALE_AFTER
#: The one state that is all well.
RUNNING = "running"


def _alive(pid: Any) -> bool:
    """Whether ``pid`` is a live carelay process (a pid reused by another program is not)."""
    if not pid_alive(pid):
        return False
    try:
        return b"carelay" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _last_sign_of_life(path: Path, own: dict) -> float:
    """When the process last wrote or touched its status file ``path`` (time.time)."""
    try:
        touched = path.stat().st_mtime
    except OSError:
        touched = 0.0
    written = own.get("written", 0.0)
    return max(touched, written if isinstance(written, (int, float)) else 0.0)


def _held(pid: Any) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): alive, doing nothing."""
    stat = read_stat(pid) if isinstance(pid, int) else None
    return stat is not None and stat.state in ("T", "t")


#: What a stopped process is said to be (see _held).
HELD = "stopped (SIGSTOP, or a debugger holds it): SIGCONT resumes it"


def _read_own(path: Path) -> dict | None:
    """A process's own status file, with ``seen``: when it last wrote or touched it."""
    own = read_status(path)
    if own is not None:
        own["seen"] = _last_sign_of_life(path, own)
    return own


def _fresh(own: dict | None, pid: Any, now: float) -> bool:
    """``own`` (see _read_own) was written or touched by process ``pid`` within STALE_AFTER."""
    return bool(own) and own.get("pid") == pid and now - own.get("seen", 0) <= STALE_AFTER


def collect(config: Config) -> dict | None:
    """The supervisor's view merged with each child's own; None when no relay runs.

    Each process gets ``state`` (its truth, see the module docstring), ``detail``
    (why it is not running, or None) and ``last_error`` (its last error line).
    """
    run_dir = config.run_dir
    sup = read_status(run_dir / "supervisor.json")
    if sup is None or not _alive(sup.get("pid")):
        return None
    now = time.time()
    since = max(0.0, now - sup.get("written", now))
    # Every process rewrites its file when what it says changes, and touches it meanwhile.
    sup["answering"] = now - _last_sign_of_life(run_dir / "supervisor.json", sup) <= STALE_AFTER
    sup["uptime"] = sup.get("uptime", 0.0) + since
    procs = sup.get("processes", [])
    for p in procs:
        if p.get("state") == RUNNING:
            p["uptime"] = p.get("uptime", 0.0) + since
    owns = {p["name"]: _read_own(status_path(run_dir, p["name"])) for p in procs}
    broker = next((p for p in procs if p["name"] == "broker"), None)
    broker_own = owns.get("broker")
    broker_fresh = broker is not None and _fresh(broker_own, broker.get("pid"), now)
    if broker_fresh and broker_own.get("ca_port") is not None:
        sup["ca_port"] = broker_own["ca_port"]
    # Each broker that answers: its door, and its links to the shards; a shard answers
    # while some broker's link to it is live.
    brokers = [p for p in procs if _broker_index(p["name"]) is not None]
    links: dict = {}
    for p in brokers:
        own = owns[p["name"]]
        fresh = p.get("state") == RUNNING and _fresh(own, p.get("pid"), now)
        p["ready"] = own.get("ready") if fresh else None
        p["ca_port"] = own.get("ca_port") if fresh else None
        door = (own.get("door") or {}) if fresh else {}
        p["interfaces"], p["clients"] = door.get("interfaces"), door.get("clients")
        for link in own.get("shards", []) if fresh else ():
            k, state = link.get("index"), link.get("state")
            if _LINK_RANK.get(state, 0) > _LINK_RANK.get(links.get(k), -1):
                links[k] = state
    clocks = _clock_offsets(procs, owns, now)
    said = [p["ready"] for p in brokers]
    sup["ready"] = None if None in said or not said else all(said)
    sup["brokers"] = brokers
    broker_fresh = any(p["ready"] is not None for p in brokers)
    for p in procs:
        own = owns[p["name"]]
        running = p.get("state") == RUNNING
        fresh = running and _fresh(own, p.get("pid"), now)
        p["pvs"] = own.get("pvs") if fresh else None
        # The store outlives the process: show its last flush and size even while it is down.
        p["last_flush"] = own.get("last_flush") if own else None
        p["store_bytes"] = own.get("store_bytes") if own else None
        # The last words of a process that died, or the last error of one that runs.
        p["last_error"] = own.get("last_error") if own else None
        p["detail"] = None
        p["clock_offset"] = clocks.get(_shard_index(p["name"]))
        if sup.get("resharding"):
            p["state"], p["detail"] = "waiting", "it starts once the stores are resharded"
            continue
        if not running:
            if p.get("last_exit") is not None:
                p["detail"] = f"last exit: {describe_exit(p['last_exit'])}"
            if not sup["answering"] and p.get("state") in ("restarting", "failing"):
                p["state"] = "down"
                p["detail"] = _unattended(p["detail"])
            continue
        if not _alive(p.get("pid")) or (own and own.get("pid") == p.get("pid") and "exit" in own):
            # Gone since the supervisor last looked: it restarts it, unless it stops them all
            # or does not answer itself.
            p["state"] = "stopped" if sup.get("stopping") else "restarting"
            p["pid"] = p["pvs"] = None
            if own and "exit" in own:
                p["detail"] = f"last exit: {describe_exit(own['exit'])}"
            if not sup["answering"] and not sup.get("stopping"):
                p["state"] = "down"
                p["detail"] = _unattended(p["detail"])
            continue
        if sup.get("stopping"):
            p["state"] = "stopping"
            p["detail"] = "the relay is stopping"
            continue
        young = p["uptime"] < STARTUP_GRACE
        if not fresh:
            age = now - own["seen"] if own and own.get("pid") == p.get("pid") else None
            # One that has written its status and then went silent is not starting, however
            # young: it was stopped or hung after it answered.  Nor is one that is stopped,
            # nor one started again after it kept dying.
            p["state"] = "starting" if young and age is None else "not answering"
            p["detail"] = f"pid {p['pid']} is alive but has not written its status " + (
                "yet" if age is None else f"for {_duration(age)}"
            )
            if _held(p["pid"]):
                p["state"], p["detail"] = "not answering", f"pid {p['pid']} is {HELD}"
            elif p["state"] == "starting" and p.get("failing"):
                last = p.get("last_exit")
                exited = f" (last exit: {describe_exit(last)})" if last is not None else ""
                p["state"] = "failing"
                p["detail"] = (
                    f"it died {FLAPPING_DEATHS} times within {FLAPPING_WINDOW:.0f} s{exited}; "
                    f"started again, pid {p['pid']} has not written its status yet"
                )
            continue
        if own.get("store_error"):
            p["state"] = "store failing"
            p["detail"] = f"store error: {own['store_error']}"
            since_failed = own.get("store_failed_since")
            if since_failed:
                p["detail"] += f" (since {_when(since_failed)})"
            continue
        if p in brokers and p["ready"] is False:
            p["state"] = "syncing"
            p["detail"] = "not ready: its shards' snapshots are not all taken yet"
            continue
        index = _shard_index(p["name"])
        if index is None or not broker_fresh:
            continue
        link = links.get(index)
        if link == "live":
            continue
        if link == "syncing":
            p["state"] = "syncing"
            p["detail"] = "the broker is taking its snapshot; its PVs are not served yet"
        else:
            # Both must have had time to find each other (the broker's link retries
            # after at most RECONNECT_MAX).
            young = young or broker["uptime"] < STARTUP_GRACE
            p["state"] = "starting" if young else "not answering"
            p["detail"] = f"the broker's link to it is {link or 'missing'}"
            if _held(p["pid"]):  # stopped after it wrote its status: however young
                p["state"], p["detail"] = "not answering", f"pid {p['pid']} is {HELD}"
    return sup


def _unattended(detail: str | None) -> str:
    """Why a process that is down stays down: its supervisor does not answer."""
    why = "the supervisor, which restarts it, does not answer"
    return f"{detail}; {why}" if detail else why


def _clock_offsets(procs: list[dict], owns: dict, now: float) -> dict[int, int]:
    """By shard: how many seconds its clock is ahead of the front-ends' (behind: below
    zero), where a front-end that answers found it off by more than CLOCK_OFFSET_HIGH
    (the one furthest off where several did)."""
    offsets: dict[int, int] = {}
    for p in procs:
        own = owns.get(p["name"])
        if p.get("state") != RUNNING or not _fresh(own, p.get("pid"), now):
            continue
        for link in own.get("shards") or ():
            k, offset = link.get("index"), link.get("clock_offset")
            if isinstance(offset, (int, float)) and abs(offset) > abs(offsets.get(k, 0)):
                offsets[k] = offset
    return offsets


def _shard_index(name: str) -> int | None:
    role, _, index = name.partition(" ")
    return int(index) if role == "shard" and index.isdigit() else None


def _broker_index(name: str) -> int | None:
    """0 for "broker", K for "broker K", None for any other process."""
    role, _, index = name.partition(" ")
    if role != "broker":
        return None
    return int(index) if index.isdigit() else 0 if not index else None


#: Link states, worst first: a shard is judged by the best link any broker has to it.
_LINK_RANK = {"down": 0, "connecting": 1, "syncing": 2, "live": 3}


def _door(p: dict) -> str:
    """Where broker ``p`` serves CA: ``address:port`` (``*`` for every interface)."""
    if p.get("ca_port") is None:
        return "-"
    return ",".join(f"{a}:{p['ca_port']}" for a in p.get("interfaces") or ["*"])


def _relay_state(status: dict, ok: bool) -> str:
    if status.get("stopping"):
        return "stopping"
    if status.get("resharding"):
        shards = (status.get("config") or {}).get("shards", "?")
        return f"starting, moving PVs between the stores for {shards} shards (see its log)"
    return "running" if ok else "degraded"


def print_status(config: Config, out=sys.stdout) -> int:
    """Print the process table; EXIT_RUNNING while all answer, EXIT_NOT_RUNNING when no
    relay runs, EXIT_PROBLEM when a process is down, failing or not answering."""
    data_dir = config.data_dir.resolve()
    status = collect(config)
    if status is None:
        print(f"carelay is not running: no relay runs on data directory {data_dir}", file=out)
        return EXIT_NOT_RUNNING
    procs = status.get("processes", [])
    ok = status["answering"] and all(p["state"] == RUNNING for p in procs)
    ready = {True: "broker ready", False: "broker starting"}.get(status.get("ready"))
    ports = f"CA port {status.get('ca_port', '?')}"
    brokers = status["brokers"]
    if len(brokers) > 1:
        ports = "CA ports " + ", ".join(str(p.get("ca_port") or "?") for p in brokers)
        ready = f"{sum(1 for p in brokers if p['ready'])} of {len(brokers)} brokers ready"
    print(
        ", ".join(
            part
            for part in (
                f"carelay {_relay_state(status, ok)}: supervisor pid {status['pid']}",
                f"up {_duration(status['uptime'])}",
                f"prefix {status['config']['prefix']}",
                ports,
                ready,
                f"data directory {data_dir}",
            )
            if part
        ),
        file=out,
    )
    # Several brokers: where each serves CA, and its clients (one: the header says where).
    doors = f" {'CA':<21} {'CLIENTS':>7}" if len(brokers) > 1 else ""
    print(
        f"{'PROCESS':<10} {'PID':>8} {'STATE':<13} {'UPTIME':>12} {'RESTARTS':>8} {'PVS':>7} "
        f"{'LAST FLUSH':>19} {'STORE':>10}{doors}",
        file=out,
    )
    for p in procs:
        pvs = "-" if p.get("pvs") is None else str(p["pvs"])
        pid = "-" if p.get("pid") is None else str(p["pid"])
        up = _duration(p["uptime"]) if p.get("pid") is not None else "-"
        shard = p["name"].startswith("shard")
        flush = _when(p.get("last_flush")) if shard else ""
        store = _size(p.get("store_bytes")) if shard else ""
        door = clients = ""
        if doors and p in brokers:
            door, clients = _door(p), "-" if p["clients"] is None else str(p["clients"])
        line = f"{p['restarts']:>8} {pvs:>7} {flush:>19} {store:>10}"
        if doors:
            line = f"{line} {door:<21} {clients:>7}".rstrip()
        print(f"{p['name']:<10} {pid:>8} {p['state']:<13} {up:>12} {line}", file=out)
    notes = []
    if not status["answering"]:
        held = _held(status["pid"])
        why = f"pid {status['pid']} is {HELD}" if held else "its status file is stale"
        notes.append(f"supervisor: not answering: {why}; nothing is restarted meanwhile")
    for p in procs:
        offset = p.get("clock_offset")
        if offset:
            way = "ahead of" if offset > 0 else "behind"
            notes.append(
                f"{p['name']}: its clock is {abs(offset)} s {way} the front-ends': the relay "
                "allows for it, but its log and last flush are in its own time (NTP on its host?)"
            )
        if p["state"] == RUNNING:
            continue
        if p.get("detail"):
            notes.append(f"{p['name']}: {p['state']}: {p['detail']}")
        error = p.get("last_error")
        if error:
            when = _when(error.get("time"))
            notes.append(f"{p['name']}: last error at {when}: {error.get('message')}")
    if notes:
        print(file=out)
        for line in notes:
            print(line, file=out)
    return EXIT_RUNNING if ok else EXIT_PROBLEM


def _duration(seconds: float) -> str:
    """``42 s``, ``5 min 3 s``, ``2 h 5 min``, ``3 d 4 h``."""
    s = int(max(0.0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {s} s"
    return f"{s} s"


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


def running_config(config: Config, status: dict) -> Config | None:
    """``config`` with the prefix, limits, shard count and endpoints of the running relay;
    None if its status file does not hold them."""
    raw = status.get("config") or {}
    try:
        return replace(
            config,
            prefix=str(raw["prefix"]),
            shards=int(raw["shards"]),
            max_elements=int(raw["max_elements"]),
            max_name_length=int(raw["max_name_length"]),
            endpoints=tuple(raw.get("endpoints") or ()),
        )
    except (KeyError, TypeError, ValueError):
        return None


def print_owner(config: Config, name: str, out=sys.stdout) -> int:
    """Which shard owns ``name`` in the running relay (or, when none runs, under ``config``),
    and whether its store holds it."""
    status = collect(config)
    running = running_config(config, status) if status is not None else None
    note = ""
    if running is not None:
        config = running
    elif status is None:
        note = (
            f" [no relay runs on data directory {config.data_dir.resolve()}: "
            "prefix and shard count from the configuration given]"
        )
    else:
        note = " [the running relay's status file lacks its configuration: from the one given]"
    base, _ = split_field(name)
    try:
        config.pv_spec(base)
    except InvalidPvName as e:
        print(f"{name}: not a relay PV name (prefix {config.prefix}): {e}{note}", file=out)
        return EXIT_PV_NOT_A_NAME
    shard = shard_for(base, config.shards)
    held = store_holds(config.store_path(shard), base)
    where = {True: "stored", False: "not stored", None: "store not readable"}[held]
    endpoint = _endpoint(config, status, shard)
    print(
        f"{base}: shard {shard} of {config.shards} ({where}), endpoint {endpoint}{note}", file=out
    )
    return EXIT_PV_STORED if held else EXIT_PV_NOT_STORED


def _endpoint(config: Config, status: dict | None, shard: int) -> str:
    """Where shard ``shard`` listens: as it says itself, else as configured."""
    own = read_status(status_path(config.run_dir, f"shard {shard}")) if status else None
    if own and isinstance(own.get("endpoint"), str):
        return own["endpoint"]
    return config.shard_endpoint(shard)


def _front_ends(config: Config) -> tuple[bool, dict[str, dict]]:
    """The front-ends (CA brokers, then PVA) of the relay on ``config``'s data directory,
    whatever ``config`` says of them: (True, the supervisor's entry of each, by role) for
    the running relay; where no supervisor runs (front-ends started alone), (False, an
    empty entry for each role whose status file is in the run directory)."""
    run_dir = config.run_dir
    sup = read_status(run_dir / "supervisor.json")
    procs = sup.get("processes") if sup is not None and _alive(sup.get("pid")) else None
    if isinstance(procs, list):
        listed = {
            p["name"]: p for p in procs if isinstance(p, dict) and _is_front_end(p.get("name"))
        }
        return True, {role: listed[role] for role in _in_front_end_order(listed)}
    try:
        names = {path.stem.replace("-", " ") for path in run_dir.glob("*.json")}
    except OSError:
        names = set()
    names |= {broker_role(k) for k in range(config.brokers)}
    return False, {role: {} for role in _in_front_end_order(filter(_is_front_end, names))}


def _is_front_end(name: Any) -> bool:
    return isinstance(name, str) and (name == "pva" or _broker_index(name) is not None)


def _in_front_end_order(roles) -> list[str]:
    """The brokers by index, then PVA."""
    return sorted(roles, key=lambda role: (role == "pva", _broker_index(role) or 0))


def _why_not_asked(own: dict | None, listed: dict | None, now: float) -> str | None:
    """Why the front-end of status ``own`` (and, under a supervisor, of its entry
    ``listed``) may not be signalled; None when it may."""
    own = own or {}
    pid = own.get("pid")
    if listed is not None:
        state = listed.get("state")
        if state != RUNNING:
            return f"it is {state} (its access security is read when it starts)"
        if pid != listed.get("pid") or "exit" in own:
            # Its status file is a former process's: this one may not handle SIGHUP yet.
            return f"pid {listed.get('pid')} is starting: it has not written its status yet"
    if not _alive(pid) or "exit" in own:
        return "it is not running"
    if not _fresh(own, pid, now):
        # Not known to answer: the pid may no longer be that front-end's.
        return f"pid {pid} has not written its status for {_duration(now - own['seen'])}"
    return None


def reload_access(config: Config, out=sys.stdout) -> int:
    """``carelay reload-acf``: ask every front-end of the relay that runs on ``config``'s
    data directory (each CA broker, the PVA front-end), as its status files name them,
    to read the access security file again (SIGHUP).  0 when each was asked; 1 when one
    of them could not be (each such is named on stderr; the others are asked all the
    same), or when no front-end runs there."""
    import signal

    supervised, front_ends = _front_ends(config)
    asked = failed = 0
    now = time.time()
    for role, listed in front_ends.items():
        what = "PVA front-end" if role == "pva" else role
        own = _read_own(status_path(config.run_dir, role))
        if not supervised and not (own and _alive(own.get("pid")) and "exit" not in own):
            continue  # started alone once, and not running now: nothing to ask
        why = _why_not_asked(own, listed if supervised else None, now)
        if why is None:
            pid = own["pid"]
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError as e:
                why = f"cannot signal pid {pid}: {e}"
        if why is not None:
            print(
                f"carelay: the {what} was not asked to reload its access security file: {why}",
                file=sys.stderr,
            )
            failed += 1
            continue
        print(f"asked the {what} (pid {pid}) to reload its access security file", file=out)
        asked += 1
    if failed:
        return exits.FAILED
    if not asked:
        print(f"carelay: no broker runs on {config.data_dir}", file=sys.stderr)
        return exits.FAILED
    return exits.OK
