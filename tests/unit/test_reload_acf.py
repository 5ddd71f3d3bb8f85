"""``carelay reload-acf``: every front-end of the running relay is asked, from its status
files, whatever configuration is given (made-up status files, stand-in processes).

Each stand-in front-end records the SIGHUPs it gets in a file; the supervisor's
stand-in sleeps.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carelay.common import exits
from carelay.common.config import load_config
from carelay.common.lifecycle import status_path
from carelay.supervisor import cli
from carelay.supervisor.status import STALE_AFTER, reload_access
from tests.unit.test_status_view import OLD, stand_ins, write

#: A front-end that writes a line to its file for each SIGHUP (``carelay`` in its
#: command line, as _alive wants), and says when its handler is in place.
FRONT_END = """
import signal, sys, time
path = sys.argv[1]
signal.signal(signal.SIGHUP, lambda *_: open(path, "a").write("hup\\n"))
open(path + ".ready", "w").close()
time.sleep(60)
"""

#: The front-ends of the made-up relay.
ROLES = ("broker", "broker 1", "broker 2", "pva")


@contextlib.contextmanager
def front_ends(tmp: Path, roles) -> Iterator[dict[str, tuple[int, Path]]]:
    """A live stand-in per role: its pid and the file of its SIGHUPs."""
    procs, out = [], {}
    try:
        for role in roles:
            path = tmp / f"hups-{role.replace(' ', '-')}"
            procs.append(subprocess.Popen([sys.executable, "-c", FRONT_END, path, "carelay"]))
            out[role] = (procs[-1].pid, path)
        for _, path in out.values():
            deadline = time.monotonic() + 10
            while not Path(f"{path}.ready").exists():
                assert time.monotonic() < deadline, "the stand-in front-end did not start"
                time.sleep(0.01)
        yield out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def hups(path: Path) -> int:
    """How many SIGHUPs the stand-in of ``path`` has recorded, once it has recorded one
    (or after 2 s)."""
    deadline = time.monotonic() + 2
    while True:
        text = path.read_text() if path.exists() else ""
        if "hup" in text or time.monotonic() > deadline:
            return text.count("hup")
        time.sleep(0.01)


@pytest.fixture
def config(tmp_path):
    """What ``carelay reload-acf --data-dir DIR`` loads: one broker, no PVA."""
    config = load_config(data_dir=str(tmp_path / "data"))
    config.run_dir.mkdir(parents=True)
    assert config.brokers == 1 and not config.pva
    return config


@pytest.fixture
def supervisor():
    with stand_ins("up", "shard") as pids:
        yield pids


def relay_files(run: Path, supervisor, fronts, *, stale=(), gone=(), state=None) -> None:
    """The status files of a relay with a shard and ``fronts``: those in ``stale`` last
    wrote theirs long ago, those in ``gone`` exited; ``state`` overrides the
    supervisor's view of some."""
    sup_pid, shard_pid = supervisor
    now = time.time()
    procs = [{"name": "shard 0", "pid": shard_pid, "state": "running", "uptime": OLD}]
    for role, (pid, _) in fronts.items():
        said = (state or {}).get(role, "running")
        procs.append({"name": role, "pid": pid, "state": said, "uptime": OLD, "restarts": 0})
        written = now - STALE_AFTER - 10 if role in stale else now
        own = {"pid": pid, "written": written, "ready": True}
        if role in gone:
            own["exit"] = 1
        write(status_path(run, role), **own)
    config = {"prefix": "X:", "shards": 1, "max_elements": 10, "max_name_length": 64}
    write(run / "supervisor.json", pid=sup_pid, written=now, uptime=OLD, config=config,
          processes=procs)  # fmt: skip
    write(status_path(run, "shard 0"), pid=shard_pid, written=now)


def reload(config) -> tuple[int, str]:
    out = io.StringIO()
    return reload_access(config, out), out.getvalue()


def test_every_front_end_of_the_running_relay_is_asked(config, supervisor, tmp_path):
    with front_ends(tmp_path, ROLES) as fronts:
        relay_files(config.run_dir, supervisor, fronts)
        code, text = reload(config)
        assert code == exits.OK, text
        for role, (pid, path) in fronts.items():
            what = "PVA front-end" if role == "pva" else role
            assert f"asked the {what} (pid {pid})" in text, text
            assert hups(path) == 1, role


def test_the_command_with_only_the_data_directory_asks_them_all(
    config, supervisor, tmp_path, capsys
):
    with front_ends(tmp_path, ROLES) as fronts:
        relay_files(config.run_dir, supervisor, fronts)
        code = cli.main(["reload-acf", "--data-dir", str(config.data_dir)])
        assert code == exits.OK, capsys.readouterr()
        assert [hups(path) for _, path in fronts.values()] == [1] * len(fronts)


def test_a_front_end_that_cannot_be_asked_fails_the_command(config, supervisor, tmp_path, capsys):
    with front_ends(tmp_path, ROLES) as fronts:
        relay_files(config.run_dir, supervisor, fronts, stale={"broker 2"})
        code, text = reload(config)
        err = capsys.readouterr().err
        assert code == exits.FAILED, text
        (line,) = err.splitlines()
        assert line.startswith("carelay: ") and "broker 2" in line, err
        # The others are asked all the same; the silent one is not signalled.
        assert [hups(fronts[role][1]) for role in ROLES] == [1, 1, 0, 1]


def test_a_front_end_the_supervisor_restarts_fails_the_command(
    config, supervisor, tmp_path, capsys
):
    with front_ends(tmp_path, ROLES) as fronts:
        relay_files(
            config.run_dir, supervisor, fronts, gone={"broker 1"}, state={"broker 1": "failing"}
        )
        code, text = reload(config)
        err = capsys.readouterr().err
        assert code == exits.FAILED, text
        assert "broker 1" in err and "failing" in err, err
        assert [hups(fronts[role][1]) for role in ROLES] == [1, 0, 1, 1]


def test_a_front_end_the_supervisor_just_started_fails_the_command(
    config, supervisor, tmp_path, capsys
):
    """Its status file is still its former process's: it may not handle SIGHUP yet."""
    with front_ends(tmp_path, ROLES) as fronts:
        relay_files(config.run_dir, supervisor, fronts)
        write(status_path(config.run_dir, "broker 1"), pid=2**22 + 1, written=time.time())
        code, text = reload(config)
        err = capsys.readouterr().err
        assert code == exits.FAILED, text
        assert "broker 1" in err and "starting" in err, err
        assert [hups(fronts[role][1]) for role in ROLES] == [1, 0, 1, 1]


def test_brokers_started_alone_are_asked_too(config, tmp_path):
    """No supervisor: each front-end whose status file is in the run directory and
    whose process runs."""
    with front_ends(tmp_path, ("broker", "broker 1")) as fronts:
        for role, (pid, _) in fronts.items():
            write(status_path(config.run_dir, role), pid=pid, written=time.time())
        # One that ran there once and exited.
        write(status_path(config.run_dir, "broker 2"), pid=2**22 + 1, written=time.time(), exit=1)
        code, text = reload(config)
        assert code == exits.OK, text
        assert [hups(path) for _, path in fronts.values()] == [1, 1]
        assert "broker 2" not in text


def test_no_relay_is_a_failure(config, capsys):
    code, text = reload(config)
    assert code == exits.FAILED and text == ""
    assert "no broker runs" in capsys.readouterr().err
