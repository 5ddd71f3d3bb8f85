"""``carelay status`` with several CA brokers (``[[ca]]``), from made-up status files.

Stand-in processes (a sleeping Python whose command line names carelay) play the
supervisor, one shard and two brokers, as in test_status_view.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carelay.common.config import load_config
from carelay.supervisor.status import EXIT_PROBLEM, EXIT_RUNNING, collect
from tests.unit.test_status_view import OLD, shown, stand_ins, write


@pytest.fixture
def pids():
    with stand_ins("up", "shard", "broker", "broker") as pids:
        yield pids


@pytest.fixture
def config(tmp_path):
    config = load_config(data_dir=str(tmp_path / "data"), shards=1)
    config.run_dir.mkdir(parents=True)
    return config


def files(run: Path, pids, ready=None, links=None, doors=None) -> None:
    """A running relay's status files: the supervisor, shard 0 and broker k of
    ``pids[2:]``, ready or not (``ready[k]``, default all), its link to the shard in
    state ``links[k]`` (default live), serving CA at ``doors[k]``: (interfaces, port),
    or (None, port) for a status file without its door (default 10.0.k+1.5:5064+k)."""
    sup, shard, *brokers = pids
    now = time.time()
    ready = ready or (True,) * len(brokers)
    links = links or ("live",) * len(brokers)
    doors = doors or [([f"10.0.{k + 1}.5"], 5064 + k) for k in range(len(brokers))]
    names = ["broker", *(f"broker {k}" for k in range(1, len(brokers)))]
    procs = [{"name": "shard 0", "pid": shard, "state": "running", "uptime": OLD, "restarts": 0}]
    procs += [
        {"name": n, "pid": pid, "state": "running", "uptime": OLD, "restarts": 0}
        for n, pid in zip(names, brokers, strict=True)
    ]
    config = {"prefix": "X:", "shards": 1, "max_elements": 10, "max_name_length": 64}
    write(run / "supervisor.json", pid=sup, written=now, uptime=OLD, config=config,
          processes=procs)  # fmt: skip
    for k, (pid, (interfaces, port)) in enumerate(zip(brokers, doors, strict=True)):
        door = None
        if interfaces is not None:
            door = {"index": k, "interfaces": interfaces, "clients": 3 + k, "put_rate": 0.0}
        write(run / ("broker.json" if k == 0 else f"broker-{k}.json"), pid=pid, written=now,
              ready=ready[k], ca_port=port, door=door,
              shards=[{"index": 0, "state": links[k]}])  # fmt: skip
    write(run / "shard-0.json", pid=shard, written=now, pvs=3)


def _row(text: str, name: str) -> list[str]:
    for line in text.splitlines():
        words = line.split()
        if len(words) > 3 and " ".join(words[: len(name.split())]) == name:
            if name == "broker" and words[1] == "1":
                continue
            return words
    raise AssertionError(f"no row {name!r} in:\n{text}")


def test_each_broker_shows_its_door_and_clients(config, pids):
    files(config.run_dir, pids)
    code, text = shown(config)
    assert code == EXIT_RUNNING, text
    header = text.splitlines()[0]
    assert "CA ports 5064, 5065" in header and "2 of 2 brokers ready" in header, header
    assert _row(text, "broker")[-2:] == ["10.0.1.5:5064", "3"]
    assert _row(text, "broker 1")[-2:] == ["10.0.2.5:5065", "4"]


def test_a_broker_not_ready_is_syncing(config, pids):
    files(config.run_dir, pids, ready=(True, False))
    states = {p["name"]: p["state"] for p in collect(config)["processes"]}
    assert states == {"shard 0": "running", "broker": "running", "broker 1": "syncing"}
    code, text = shown(config)
    assert code == EXIT_PROBLEM
    assert "1 of 2 brokers ready" in text.splitlines()[0]
    assert "broker 1: syncing: not ready" in text


def test_a_shard_any_broker_reaches_is_running(config, pids):
    files(config.run_dir, pids, links=("down", "live"))
    states = {p["name"]: p["state"] for p in collect(config)["processes"]}
    assert states["shard 0"] == "running"
