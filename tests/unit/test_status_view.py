"""``carelay status`` from made-up status files: which state each process gets, and why.

The processes are stand-ins (a sleeping Python whose command line names carelay), so
the rules run without a relay.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carelay.common.config import STARTUP_GRACE, load_config
from carelay.supervisor.status import (
    EXIT_NOT_RUNNING,
    EXIT_PROBLEM,
    EXIT_RUNNING,
    STALE_AFTER,
    _duration,
    collect,
    print_status,
)
from carelay.supervisor.watcher import FLAPPING_DEATHS, Watcher

OLD = STARTUP_GRACE + 60.0


@contextlib.contextmanager
def stand_ins(*roles: str) -> Iterator[list[int]]:
    """Live processes whose command line names carelay, one per role (``up``, ``shard``,
    ``broker``): their pids, until the block ends."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "carelay", role])
        for role in roles
    ]
    try:
        for p in procs:  # until each has exec'd: before, /proc shows our own command line
            deadline = time.monotonic() + 10
            while b"carelay" not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the stand-in process did not start"
                time.sleep(0.01)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def pids():
    """Three live processes whose command line names carelay: supervisor, shard 0, broker."""
    with stand_ins("up", "shard", "broker") as pids:
        yield pids


def write(path: Path, **status) -> None:
    path.write_text(json.dumps(status))
    if "written" in status:  # a status file's age is its mtime
        os.utime(path, (status["written"], status["written"]))


def relay_files(
    run: Path, pids, *, link="live", shard_age=0.0, uptime=OLD, shard=None, clock=None, **sup
):
    sup_pid, shard_pid, broker_pid = pids
    now = time.time()
    procs = [
        {"name": "shard 0", "pid": shard_pid, "state": "running", "uptime": uptime, "restarts": 0},
        {"name": "broker", "pid": broker_pid, "state": "running", "uptime": uptime, "restarts": 0},
    ]
    write(
        run / "supervisor.json",
        pid=sup_pid,
        written=now,
        uptime=OLD,
        config={"prefix": "X:", "shards": 1, "max_elements": 10, "max_name_length": 64},
        processes=procs,
        **sup,
    )
    write(
        run / "broker.json",
        pid=broker_pid,
        written=now,
        ready=True,
        ca_port=5999,
        shards=[{"index": 0, "state": link, **({"clock_offset": clock} if clock else {})}],
    )
    write(run / "shard-0.json", pid=shard_pid, written=now - shard_age, pvs=3, **(shard or {}))


@pytest.fixture
def config(tmp_path):
    config = load_config(data_dir=str(tmp_path / "data"), shards=1)
    config.run_dir.mkdir(parents=True)
    return config


def states(config) -> dict[str, str]:
    return {p["name"]: p["state"] for p in collect(config)["processes"]}


def shown(config) -> tuple[int, str]:
    out = io.StringIO()
    return print_status(config, out), out.getvalue()


def test_all_answering_is_running(config, pids):
    relay_files(config.run_dir, pids)
    assert states(config) == {"shard 0": "running", "broker": "running"}
    code, text = shown(config)
    assert code == EXIT_RUNNING
    assert text.startswith("carelay running:") and "CA port 5999" in text, text
    assert f"data directory {config.data_dir.resolve()}" in text


def test_a_stale_status_file_is_not_answering(config, pids):
    relay_files(config.run_dir, pids, shard_age=STALE_AFTER + 2)
    assert states(config)["shard 0"] == "not answering"
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert "shard 0: not answering: pid" in text, text


def test_a_young_process_silent_after_it_answered_is_not_answering(config, pids):
    """Stopped (SIGSTOP) a few seconds after its start: it wrote its status, then nothing
    for longer than STALE_AFTER, so it is not answering, not starting."""
    relay_files(config.run_dir, pids, shard_age=STALE_AFTER + 2, uptime=STALE_AFTER + 4)
    assert STALE_AFTER + 4 < STARTUP_GRACE
    assert states(config)["shard 0"] == "not answering"
    code, text = shown(config)
    assert code == EXIT_PROBLEM and "has not written its status for" in text, text


@pytest.mark.parametrize("link", ["down", "connecting"])
def test_a_shard_the_broker_cannot_reach_is_not_answering(config, pids, link):
    relay_files(config.run_dir, pids, link=link)
    assert states(config)["shard 0"] == "not answering"
    assert shown(config)[0] == EXIT_PROBLEM


def test_a_young_process_is_starting_not_failing(config, pids):
    relay_files(config.run_dir, pids, link="connecting", uptime=1.0)
    assert states(config)["shard 0"] == "starting"
    assert shown(config)[0] == EXIT_PROBLEM


def test_a_syncing_shard_is_not_yet_up(config, pids):
    relay_files(config.run_dir, pids, link="syncing")
    assert states(config)["shard 0"] == "syncing"
    assert shown(config)[0] == EXIT_PROBLEM


def test_a_store_error_is_shown(config, pids):
    relay_files(config.run_dir, pids, shard={"store_error": "disk I/O error"})
    assert states(config)["shard 0"] == "store failing"
    code, text = shown(config)
    assert code == EXIT_PROBLEM and "store error: disk I/O error" in text, text


@pytest.mark.parametrize(("offset", "said"), [(30, "30 s ahead of"), (-3, "3 s behind")])
def test_a_shard_clock_off_is_said_and_the_relay_still_runs(config, pids, offset, said):
    relay_files(config.run_dir, pids, clock=offset)
    assert states(config)["shard 0"] == "running"
    code, text = shown(config)
    assert code == EXIT_RUNNING
    assert f"shard 0: its clock is {said} the front-ends'" in text, text


def test_a_clock_offset_from_a_broker_that_does_not_answer_is_not_said(config, pids):
    relay_files(config.run_dir, pids, clock=30)
    broker = json.loads((config.run_dir / "broker.json").read_text())
    write(config.run_dir / "broker.json", **{**broker, "written": time.time() - STALE_AFTER - 5})
    assert "its clock" not in shown(config)[1]


def test_a_failing_process_shows_its_exit_and_last_error(config, pids):
    relay_files(config.run_dir, pids)
    sup = json.loads((config.run_dir / "supervisor.json").read_text())
    sup["processes"][0].update(state="failing", pid=None, last_exit=3)
    (config.run_dir / "supervisor.json").write_text(json.dumps(sup))
    error = {"time": time.time(), "level": "ERROR", "message": "shard 0: cannot start: damaged"}
    write(config.run_dir / "shard-0.json", pid=12345678, written=0, exit=3, last_error=error)
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert "shard 0: failing: last exit: exit status 3" in text, text
    assert "shard 0: last error at " in text and text.rstrip().endswith("cannot start: damaged")


def test_no_supervisor_is_not_running(config, pids):
    code, text = shown(config)
    assert code == EXIT_NOT_RUNNING
    assert f"no relay runs on data directory {config.data_dir.resolve()}" in text
    # A status file left by a supervisor that is gone, or whose pid another program has.
    relay_files(config.run_dir, pids)
    sup = json.loads((config.run_dir / "supervisor.json").read_text())
    for pid in (2**22 + 1, 1):
        sup["pid"] = pid
        (config.run_dir / "supervisor.json").write_text(json.dumps(sup))
        assert shown(config)[0] == EXIT_NOT_RUNNING


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.9, "59 s"), (61, "1 min 1 s"), (7500, "2 h 5 min"), (273605, "3 d 4 h")],
)
def test_uptime_reads_as_people_write_it(seconds, text):
    assert _duration(seconds) == text


def test_a_stopping_relay_says_so_and_restarts_nothing(config, pids):
    """The supervisor has begun to stop its children: one gone already is stopped, not
    'restarting' (nothing will restart it), and one still there is stopping."""
    relay_files(config.run_dir, pids, stopping=True)
    sup = json.loads((config.run_dir / "supervisor.json").read_text())
    sup["processes"][1]["pid"] = 2**22 + 1  # the broker: gone
    (config.run_dir / "supervisor.json").write_text(json.dumps(sup))
    assert states(config) == {"shard 0": "stopping", "broker": "stopped"}
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert text.startswith("carelay stopping:"), text
    assert "shard 0: stopping: the relay is stopping" in text


def _held(pid: int) -> None:
    """SIGSTOP process ``pid`` and wait until /proc says it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, "the stand-in did not stop"
        time.sleep(0.01)


def test_a_young_process_that_is_stopped_is_not_starting(config, pids):
    """Stopped before it wrote its status: /proc says so, and status does not wait for it."""
    relay_files(config.run_dir, pids, link="connecting", uptime=1.0)
    (config.run_dir / "shard-0.json").unlink()
    _held(pids[1])
    assert states(config)["shard 0"] == "not answering"
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert f"shard 0: not answering: pid {pids[1]} is stopped (SIGSTOP" in text, text


def test_a_young_shard_stopped_after_it_answered_is_not_starting(config, pids):
    """Its own status is still fresh and the broker's link to it is down: in a young
    relay that reads as a shard not yet found, unless /proc says it is stopped."""
    relay_files(config.run_dir, pids, link="down", uptime=4.0)
    assert states(config)["shard 0"] == "starting"
    _held(pids[1])
    assert states(config)["shard 0"] == "not answering"
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert f"shard 0: not answering: pid {pids[1]} is stopped (SIGSTOP" in text, text


def test_a_process_started_again_after_dying_again_and_again_is_failing(config, pids):
    relay_files(config.run_dir, pids, link="connecting", uptime=1.0)
    (config.run_dir / "shard-0.json").unlink()
    sup = json.loads((config.run_dir / "supervisor.json").read_text())
    sup["processes"][0].update(restarts=5, last_exit=3, failing=True)
    (config.run_dir / "supervisor.json").write_text(json.dumps(sup))
    assert states(config)["shard 0"] == "failing"
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert f"shard 0: failing: it died {FLAPPING_DEATHS} times within" in text, text
    assert "(last exit: exit status 3); started again" in text, text


def test_a_watcher_says_it_is_failing_once_it_died_again_and_again(tmp_path):
    watcher = Watcher("shard 0", [sys.executable, "-c", "raise SystemExit(3)"])
    watcher.start()
    for _ in range(FLAPPING_DEATHS):
        assert not watcher.info(time.monotonic())["failing"]
        watcher.proc.wait()
        watcher.check(time.monotonic())
        watcher.check(watcher.restart_at)  # started again
    info = watcher.info(time.monotonic())
    assert info["failing"] and info["last_exit"] == 3
    watcher.kill()


def test_a_process_gone_while_the_supervisor_is_stopped_is_down(config, pids):
    """Nothing restarts it: not 'restarting', and the supervisor is said to be stopped."""
    relay_files(config.run_dir, pids)
    sup = json.loads((config.run_dir / "supervisor.json").read_text())
    sup["processes"][1]["pid"] = 2**22 + 1  # the broker: gone
    sup["processes"].append(
        {
            "name": "shard 1",
            "pid": None,
            "state": "restarting",
            "uptime": 0.0,
            "restarts": 1,
            "last_exit": -9,
        }
    )
    write(config.run_dir / "supervisor.json", **{**sup, "written": time.time() - STALE_AFTER - 5})
    _held(pids[0])
    assert states(config) == {"shard 0": "running", "broker": "down", "shard 1": "down"}
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert f"supervisor: not answering: pid {pids[0]} is stopped (SIGSTOP" in text, text
    assert "broker: down: the supervisor, which restarts it, does not answer" in text, text
    assert "shard 1: down: last exit: killed by SIGKILL; the supervisor" in text, text


def test_a_relay_moving_pvs_between_stores_is_starting(config, pids):
    """The supervisor reshards before it starts its children: not 'not running', nor
    'stopped' processes."""
    relay_files(config.run_dir, pids, resharding=True)
    sup = json.loads((config.run_dir / "supervisor.json").read_text())
    for p in sup["processes"]:
        p.update(state="stopped", pid=None, uptime=0.0)
    (config.run_dir / "supervisor.json").write_text(json.dumps(sup))
    assert states(config) == {"shard 0": "waiting", "broker": "waiting"}
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert text.startswith("carelay starting, moving PVs between the stores for 1 shards"), text
    assert "shard 0: waiting: it starts once the stores are resharded" in text, text
