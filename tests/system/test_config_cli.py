"""``carelay up`` with a wrong value for any configuration key: exit 2, one line, nothing started.

The values come from the unit table (tests/unit/test_config_keys.py), one per key.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from bench.servers import free_port
from tests.system.conftest import CA_PORT, CARELAY, wait_for
from tests.unit.test_config_keys import BAD_VALUES, toml_text

#: One wrong value per key (the last the table gives: past the type checks), and for
#: endpoints the one of the issue.
ONE_PER_KEY = {key: line for key, line in BAD_VALUES if key != "endpoints" or "notaport" in line}
#: Seconds within which a refused configuration must have exited.
REFUSE_WITHIN = 30


def run_up(tmp_path: Path, line: str) -> subprocess.CompletedProcess:
    """``carelay up --config FILE``; a relay that starts anyway is stopped, group and all."""
    path = tmp_path / "carelay.toml"
    path.write_text(toml_text(line))
    # Not the session's CA port: a relay that wrongly starts must not meet the others.
    port = str(free_port({CA_PORT}))
    env = {**os.environ, "EPICS_CAS_SERVER_PORT": port, "EPICS_CA_SERVER_PORT": port}
    # No --data-dir: it would override the file's data_dir; the default lands in tmp_path.
    argv = [*CARELAY, "up", "--config", str(path)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=REFUSE_WITHIN)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"carelay up started with {line!r} instead of refusing it:\n{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.system
@pytest.mark.parametrize(("key", "line"), sorted(ONE_PER_KEY.items()), ids=sorted(ONE_PER_KEY))
def test_up_with_a_wrong_value_exits_2_with_one_line(tmp_path: Path, key: str, line: str):
    r = run_up(tmp_path, line)
    lines = [text for text in r.stderr.splitlines() if text.strip()]
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"carelay: invalid configuration: {key}:"), lines[0]
    assert r.stdout == ""
    # Refused before anything started: no run directory, no store.
    assert not (tmp_path / "carelay-data").exists()


@pytest.mark.system
def test_up_hands_a_value_beginning_with_a_dash_to_its_children(tmp_path: Path):
    """``--prefix=-X:`` is a valid prefix: each child must take it as the value of
    ``--prefix``, not as an option of its own, and the relay serves."""
    port = str(free_port({CA_PORT}))
    env = {**os.environ, "EPICS_CAS_SERVER_PORT": port, "EPICS_CA_SERVER_PORT": port}
    log = tmp_path / "relay.log"
    argv = [*CARELAY, "up", "--prefix=-X:", "--shards=1", f"--data-dir={tmp_path / 'data'}"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        # A child that misreads its flags says "error:" and is restarted again and again.
        wait_for(
            lambda: (
                proc.poll() is not None or any(w in log.read_text() for w in ("ready:", "error:"))
            ),
            timeout=REFUSE_WITHIN,
            what="the relay to serve or a child to fail",
        )
        text = log.read_text()
        assert proc.poll() is None, text
        assert "error:" not in text, text
        ready = [line for line in text.splitlines() if " ready:" in line]
        assert ready and "prefix -X:" in ready[0], text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
