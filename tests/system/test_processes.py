"""The process tree: roles, clean stop, restarts, status, configuration errors, logs.

Every test here starts its own relay (make_relay): the module-scoped shared relay
would stay up on the session's CA port while a test's own relay starts on it too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import epics
import numpy as np
import pytest

from carelay.common.sharding import shard_for
from tests.system.clients import get, name_on_shard
from tests.system.conftest import CARELAY, wait_for

STOP_BOUND = 5.0  # seconds the issue allows for a clean stop, children included
#: An uptime as status shows it: "42 s", "5 min 3 s", "2 h 5 min", "3 d 4 h", or "-".
UPTIME = r"-|\d+ s|\d+ min \d+ s|\d+ h \d+ min|\d+ d \d+ h"
ROW = re.compile(
    r"^(?P<name>shard \d+|broker)\s+(?P<pid>\d+|-)\s+(?P<state>not answering|store failing|\S+)"
    rf"\s+(?P<uptime>{UPTIME})"
    r"\s+(?P<restarts>\d+)\s+(?P<pvs>\d+|-)"
    r"(?:\s+(?P<flush>never|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"
    r"\s+(?P<store>-|[\d.]+ (?:B|KiB|MiB|GiB)))?"
    r"\s*$"
)


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def uptime_seconds(text: str) -> int | None:
    """Seconds of an uptime as status shows it, to the unit shown; None for "-"."""
    if text == "-":
        return None
    unit = {"d": 86400, "h": 3600, "min": 60, "s": 1}
    words = text.split()
    return sum(int(n) * unit[u] for n, u in zip(words[::2], words[1::2], strict=True))


def status_rows(relay, codes=(0,)) -> dict[str, dict]:
    """``carelay status`` as {"shard 0": {"pid": ..., "state": ..., ...}}; asserts its exit
    status is one of ``codes`` (0: all running, 3: one is down)."""
    r = relay.status()
    assert r.returncode in codes, f"status exited {r.returncode}: {r.stdout}{r.stderr}"
    rows = {}
    # The table ends at the first blank line; notes on processes that are not running follow.
    for line in r.stdout.split("\n\n")[0].splitlines()[2:]:
        m = ROW.match(line)
        assert m, f"unexpected status line {line!r} in:\n{r.stdout}"
        if m:
            row = m.groupdict()
            for key in ("pid", "restarts", "pvs"):
                row[key] = None if row[key] == "-" else int(row[key])
            row["uptime"] = uptime_seconds(row["uptime"])
            rows[row.pop("name")] = row
    return rows


def put_and_read(name: str, value: float) -> bool:
    """A put with completion whose value then reads back: the relay serves ``name``."""
    # pyepics reports 1 even when the server fails the put: the read-back decides.
    if epics.caput(name, value, wait=True, timeout=2, connection_timeout=2) != 1:
        return False
    return epics.caget(name, use_monitor=False, timeout=2) == value


# -- 5. roles on the command line ---------------------------------------------------


def test_each_child_names_its_role_on_its_command_line(make_relay):
    relay = make_relay(shards=2)
    pids = relay.children()
    assert relay.proc.pid in pids
    roles = {}
    for pid in pids:
        argv = argv_of(pid)
        role = next(i for i, a in enumerate(argv) if a in ("up", "broker", "shard"))
        assert any("carelay" in a for a in argv[:role]), argv
        roles[pid] = tuple(argv[role : role + 2 if argv[role] == "shard" else role + 1])
    assert roles.pop(relay.proc.pid) == ("up",)
    assert sorted(roles.values()) == [("broker",), ("shard", "0"), ("shard", "1")]
    for pid in roles:
        assert parent_of(pid) == relay.proc.pid, f"{roles[pid]} is not the supervisor's child"


# -- 6. clean stop -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything_within_5_seconds(make_relay, sig):
    relay = make_relay(shards=2)
    name = relay.name("stopme", "f1")
    assert put_and_read(name, 1.5)
    pv = epics.PV(name)  # a client still connected when the relay stops
    assert pv.wait_for_connection(timeout=5)
    assert len(relay.children()) == 4

    started = time.monotonic()
    relay.proc.send_signal(sig)
    try:
        code = relay.proc.wait(timeout=STOP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"carelay up still running {STOP_BOUND} s after {sig.name}")
    left = max(0.0, STOP_BOUND - (time.monotonic() - started))
    wait_for(lambda: not relay.children(), timeout=left, what="every relay process to be gone")
    assert code == 0
    assert "supervisor: stopped" in relay.log()
    pv.disconnect()


# -- 7. restarts ----------------------------------------------------------------------


def test_killed_shard_is_restarted_and_serves_again(make_relay):
    relay = make_relay(shards=2)
    before = status_rows(relay)
    old_pid = before["shard 0"]["pid"]
    assert old_pid in relay.children()
    assert put_and_read(name_on_shard(relay, 0, "before"), 1.0)

    mark = len(relay.log())
    os.kill(old_pid, signal.SIGKILL)
    relay.wait_log("shard 0 died (killed by SIGKILL); restarting", start=mark)
    relay.wait_log("restarted shard 0 (restart 1)", start=mark)

    def restarted():
        row = status_rows(relay, codes=(0, 3))["shard 0"]
        return row if row["pid"] not in (None, old_pid) and row["state"] == "running" else None

    row = wait_for(restarted, timeout=10, interval=0.2, what="a new shard 0 pid in status")
    assert row["restarts"] == 1
    assert row["pid"] in relay.children()
    assert status_rows(relay)["shard 1"]["pid"] == before["shard 1"]["pid"]

    # The shard's PVs are in memory only for now: check that new puts work again.
    name = name_on_shard(relay, 0, "after")
    wait_for(lambda: put_and_read(name, 2.5), timeout=15, what="a put to shard 0 to work")
    other = name_on_shard(relay, 1, "other")
    assert put_and_read(other, 3.5)


def test_killed_broker_is_restarted_and_clients_reconnect(make_relay):
    relay = make_relay(shards=2)
    name = relay.name("survivor", "f1")
    events = []
    pv = epics.PV(name, connection_callback=lambda conn, **kw: events.append(conn))
    assert pv.wait_for_connection(timeout=5)
    assert pv.put(7.25, wait=True, timeout=5) == 1
    assert pv.get(use_monitor=False) == 7.25

    old_pid = status_rows(relay)["broker"]["pid"]
    mark = len(relay.log())
    os.kill(old_pid, signal.SIGKILL)
    relay.wait_log("broker died (killed by SIGKILL); restarting", start=mark)
    relay.wait_log("restarted broker (restart 1)", start=mark)
    relay.wait_ready(start=mark)

    wait_for(lambda: False in events, timeout=10, what="the client to see the disconnect")
    wait_for(lambda: pv.connected, timeout=30, interval=0.1, what="the PV object to reconnect")
    # The shards kept the value; the new broker rebuilt its table from them.
    assert pv.get(use_monitor=False) == 7.25
    assert pv.put(8.5, wait=True, timeout=5) == 1
    assert pv.get(use_monitor=False) == 8.5

    row = status_rows(relay)["broker"]
    assert row["pid"] != old_pid and row["restarts"] == 1 and row["state"] == "running"
    pv.disconnect()


# -- 8. status ---------------------------------------------------------------------


def test_status_shows_every_process_then_fails_once_stopped(make_relay):
    relay = make_relay(shards=2)
    name = relay.name("counted", "f1")
    assert put_and_read(name, 4.0)
    owner = f"shard {shard_for(name, 2)}"
    other = f"shard {1 - shard_for(name, 2)}"

    def counted():
        rows = status_rows(relay)
        ok = rows[owner]["pvs"] == 1 and rows[other]["pvs"] == 0 and rows["broker"]["pvs"] == 1
        return rows if ok else None

    rows = wait_for(counted, timeout=10, interval=0.2, what="status to count the new PV")
    assert set(rows) == {"shard 0", "shard 1", "broker"}
    children = set(relay.children()) - {relay.proc.pid}
    assert {row["pid"] for row in rows.values()} == children
    for row in rows.values():
        assert row["state"] == "running"
        assert row["restarts"] == 0
        assert row["uptime"] >= 0
    r = relay.status()
    header = r.stdout.splitlines()[1].split()
    assert header == [
        "PROCESS",
        "PID",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "PVS",
        "LAST",
        "FLUSH",
        "STORE",
    ]
    for shard in ("shard 0", "shard 1"):
        assert rows[shard]["store"] not in (None, "-"), rows[shard]
    assert f"supervisor pid {relay.proc.pid}" in r.stdout

    assert relay.stop() == 0
    r = relay.status()
    assert r.returncode != 0
    assert "not running" in r.stdout + r.stderr


# -- 9. configuration errors --------------------------------------------------------


def config_error(tmp_path: Path, *args: str, toml: str | None = None) -> str:
    """Run ``carelay up`` with a bad configuration: exit 2 and one line, returned."""
    argv = [*CARELAY, "up", "--data-dir", str(tmp_path / "data"), *args]
    if toml is not None:
        path = tmp_path / "carelay.toml"
        path.write_text(toml)
        argv += ["--config", str(path)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "data").exists(), "a relay started anyway"
    return lines[0]


@pytest.mark.parametrize(
    "toml, names",
    [
        ("shards = [\n", ["not valid TOML", "carelay.toml"]),
        ('prefix = "X:"\nbogus_key = 1\n', ["bogus_key", "unknown"]),
        ('shards = "two"\n', ["shards", "two"]),
        ("shards = 3.5\n", ["shards", "3.5"]),
        ('"odd\\nkey" = 1\n', ["odd", "key", "unknown"]),
    ],
    ids=["invalid-toml", "unknown-key", "wrong-type", "float-for-int", "key-with-newline"],
)
def test_bad_config_file_exits_2_with_one_line(tmp_path, toml, names):
    line = config_error(tmp_path, toml=toml)
    for word in names:
        assert word in line, line


def test_unreadable_config_file_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "carelay.toml"
    line = config_error(tmp_path, "--config", str(missing))
    assert str(missing) in line


@pytest.mark.parametrize(
    "args, word",
    [
        (["--shards", "x"], "--shards"),
        (["--shards", "0"], "shards"),
        (["--log-level", "nope"], "--log-level"),
        (["--max-elements", "-5"], "max_elements"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
    ids=["shards-x", "shards-0", "log-level", "max-elements", "unknown-flag"],
)
def test_bad_flag_exits_2_with_one_line(tmp_path, args, word):
    line = config_error(tmp_path, *args)
    assert word in line, line


# -- 10. logs ------------------------------------------------------------------------


def test_pv_creation_is_one_log_line_with_name_and_shard(make_relay):
    relay = make_relay(shards=2)
    name = relay.name("logged", "i1")
    mark = len(relay.log())
    assert epics.caput(name, 3, wait=True, timeout=5) == 1
    relay.wait_log(f"created PV {name}", start=mark)
    lines = [line for line in relay.log()[mark:].splitlines() if f"created PV {name}" in line]
    assert len(lines) == 1, lines
    assert f"shard {shard_for(name, relay.shards)}" in lines[0]


# -- 11. EPICS_CA_MAX_ARRAY_BYTES ------------------------------------------------------


def test_broker_sets_max_array_bytes_itself(make_relay):
    relay = make_relay(shards=2)
    for pid in relay.children():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"EPICS_CA_MAX_ARRAY_BYTES=") for e in env), argv_of(pid)
    # Eight megabytes in one CA array: more than the 16 kB libca/PCAS allow by default.
    name = relay.name("wide", "f1000000")
    data = np.linspace(-1.0, 1.0, 1_000_000)
    assert epics.caput(name, data, wait=True, timeout=20) == 1
    np.testing.assert_array_equal(get(name), data)
