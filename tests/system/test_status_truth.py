"""``carelay status`` tells the truth: a silent process is not "running", the relay is
found from anywhere, ``--pv`` uses the running relay's shard count, and a failing
process says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from carelay.common.sharding import shard_for
from tests.system.clients import name_on_shard
from tests.system.conftest import CA_PORT, CARELAY, wait_for
from tests.system.test_durability import connect, damage, put_ok, store
from tests.system.test_processes import ROW

pytestmark = pytest.mark.system

#: Seconds within which status must see a stopped shard: its link's heartbeat timeout
#: or its stale status file, whichever comes first, with room for a loaded machine.
NOTICE_WITHIN = 30.0


def status(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``carelay status ARGS``, with no flag of the relay unless given."""
    return subprocess.run(
        [*CARELAY, "status", *args], capture_output=True, text=True, timeout=30, cwd=cwd
    )


def shard_pid(relay, index: int) -> int:
    """PID of the relay's ``carelay shard INDEX`` process."""
    for pid in relay.children():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"shard" in argv and argv[argv.index(b"shard") + 1] == str(index).encode():
            return pid
    raise AssertionError(f"no shard {index} process")


def line_of(output: str, name: str) -> str:
    """The table row of process ``name``."""
    return next(line for line in output.splitlines() if line.startswith(f"{name} "))


def state_of(output: str, name: str) -> str:
    """The state status shows for process ``name``."""
    return ROW.match(line_of(output, name))["state"]


@pytest.mark.slow
def test_sigstopped_shard_is_not_answering_then_running_again(make_relay):
    relay = make_relay(shards=2)
    wait_for(lambda: relay.status().returncode == 0, what="status 0 on a fresh relay")
    pid = shard_pid(relay, 1)
    os.kill(pid, signal.SIGSTOP)
    try:

        def noticed():
            r = relay.status()
            silent = r.returncode == 3 and state_of(r.stdout, "shard 1") == "not answering"
            return r if silent else None

        r = wait_for(noticed, timeout=NOTICE_WITHIN, interval=0.5, what="shard 1 not answering")
        assert state_of(r.stdout, "shard 0") == "running"
        assert "carelay degraded" in r.stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    r = wait_for(
        lambda: (lambda r: r if r.returncode == 0 else None)(relay.status()),
        timeout=NOTICE_WITHIN,
        interval=0.5,
        what="status 0 once shard 1 runs again",
    )
    assert "not answering" not in r.stdout
    assert state_of(r.stdout, "shard 1") == "running"


def test_status_from_another_directory_finds_the_relay_and_says_where_it_looked(
    make_relay, tmp_path
):
    relay = make_relay(shards=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = relay.data_dir.resolve()
    # Only the data directory: prefix and shard count come from the running relay.
    r = wait_for(
        lambda: (lambda r: r if r.returncode == 0 else None)(
            status("--data-dir", str(data_dir), cwd=elsewhere)
        ),
        what="status 0 from another directory",
    )
    header = r.stdout.splitlines()[0]
    assert header.startswith("carelay running:"), r.stdout
    assert f"prefix {relay.prefix}" in header
    assert f"CA port {CA_PORT}" in header
    assert f"data directory {data_dir}" in header
    assert f"supervisor pid {relay.proc.pid}" in header

    # --config names the data directory just as well.
    config = elsewhere / "carelay.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    assert status("--config", str(config), cwd=elsewhere).returncode == 0

    # From here the default ./carelay-data is another directory: it says which.
    r = status(cwd=elsewhere)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"no relay runs on data directory {elsewhere / 'carelay-data'}" in r.stdout


def test_status_pv_names_the_shard_of_the_running_relay(make_relay, tmp_path, ca):
    relay = make_relay(shards=3)
    name = name_on_shard(relay, 2, "third")
    (pv,) = connect(ca, name)
    assert put_ok(pv, [1.5])
    r = status("--data-dir", str(relay.data_dir.resolve()), "--pv", name, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{name}: shard {shard_for(name, 3)} of 3 (stored)" in r.stdout


def test_failing_shard_shows_its_last_error_line(make_relay):
    relay = make_relay(shards=2)
    assert relay.stop() == 0
    damage(store(relay))
    store(relay).with_name("shard-0.sqlite.good").unlink(missing_ok=True)
    # Not "ready:": the broker says it only after its startup timeout while a shard is down.
    mark = len(relay.log())
    relay.wait_ready = lambda start=0: relay.wait_log("shard 1 in sync", start=start)
    relay.start()
    relay.wait_log("shard 0 died (exit status 3)", start=mark)

    def shown():
        r = relay.status()
        errors = [line for line in r.stdout.splitlines() if line.startswith("shard 0: last error")]
        serving = state_of(r.stdout, "shard 1") == "running"
        return (r, errors) if r.returncode == 3 and errors and serving else None

    r, errors = wait_for(shown, what="the last error of shard 0 in status, shard 1 running")
    assert "cannot start" in errors[0] and str(store(relay)) in errors[0], r.stdout
    assert state_of(r.stdout, "shard 0") != "running", r.stdout


def test_version_is_the_installed_one():
    r = subprocess.run([*CARELAY, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"carelay {version('carelay')}"
