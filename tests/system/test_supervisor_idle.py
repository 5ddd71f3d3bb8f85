"""The relay while nothing changes: the supervisor sleeps until a signal or a due
restart; every process keeps its status file fresh by a touch and rewrites it only when
what it says changes."""

from __future__ import annotations

import json
import os
import re
import signal
from datetime import datetime

from carelay.common.config import RESTART_BACKOFF_INITIAL, STATUS_TOUCH_INTERVAL
from tests.system.conftest import wait_for

#: Slack for a loaded machine, well under STATUS_TOUCH_INTERVAL: a restart that waited
#: for the next touch instead of its own due time would miss it.
RESTART_SLACK = 1.0
_STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})"


def supervisor_file(relay):
    path = relay.data_dir / "run" / "supervisor.json"
    return path, json.loads(path.read_text())


def shard_pid(status: dict, name: str) -> int | None:
    return next(p["pid"] for p in status["processes"] if p["name"] == name)


def stamp(line_re: str, log: str) -> float:
    m = re.search(_STAMP + r" \S+ supervisor: " + line_re, log)
    assert m, f"no line {line_re!r} in the log"
    return datetime.fromisoformat(m.group(1)).timestamp()


def test_status_files_are_touched_not_rewritten_while_nothing_changes(make_relay):
    relay = make_relay(shards=1)
    path, _ = supervisor_file(relay)
    # Past start-up: the broker's first status may still change what the file says.
    wait_for(lambda: relay.status().returncode == 0, timeout=20, what="status exit 0")
    paths = [path, *(relay.data_dir / "run" / f for f in ("broker.json", "shard-0.json"))]
    mtimes = [p.stat().st_mtime for p in paths]
    written = [json.loads(p.read_text())["written"] for p in paths]
    before = supervisor_file(relay)[1]
    wait_for(
        lambda: all(p.stat().st_mtime > m for p, m in zip(paths, mtimes, strict=True)),
        timeout=STATUS_TOUCH_INTERVAL + 5,
        interval=0.1,
        what="every status file touched",
    )
    assert [json.loads(p.read_text())["written"] for p in paths] == written
    assert relay.status().returncode == 0  # fresh by their mtimes: every process answers

    # A change is written at once: a shard that dies, then its restart.
    old = shard_pid(before, "shard 0")
    os.kill(old, signal.SIGKILL)

    def restarted():
        status = supervisor_file(relay)[1]
        shard = next(p for p in status["processes"] if p["name"] == "shard 0")
        return shard["pid"] not in (None, old) and shard["restarts"] == 1

    wait_for(restarted, timeout=5, interval=0.05, what="the restart in the status file")


def test_restarts_come_on_time_after_each_back_off(make_relay):
    relay = make_relay(shards=1)
    for n, backoff in enumerate((RESTART_BACKOFF_INITIAL, 2 * RESTART_BACKOFF_INITIAL), 1):
        mark = len(relay.log())
        pid = shard_pid(supervisor_file(relay)[1], "shard 0")
        os.kill(pid, signal.SIGKILL)
        relay.wait_log(f"restarted shard 0 (restart {n})", start=mark)
        log = relay.log()[mark:]
        assert f"restarting in {backoff:.2f} s" in log, log
        gap = stamp(f"restarted shard 0 \\(restart {n}\\)", log) - stamp("shard 0 died", log)
        assert backoff <= gap + 0.01 < backoff + RESTART_SLACK, (gap, log)
        wait_for(
            lambda pid=pid: shard_pid(supervisor_file(relay)[1], "shard 0") not in (None, pid),
            timeout=5,
            what="the new shard in the status file",
        )
