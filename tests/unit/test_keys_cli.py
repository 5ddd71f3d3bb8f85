"""``carelay keys DIR``: keys that exist are kept unless ``--force`` is given.

Running processes hold the keys they loaded: keys replaced under them would lock a
remote broker or shard out of the relay at its next start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carelay.common import exits
from carelay.common.keys import KeysExist, make_keys

#: The files ``carelay keys`` writes.
KEY_FILES = ("shard.key", "shard.key_secret", "broker.key", "broker.key_secret")


def keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carelay.supervisor.cli", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_keys_are_made_in_a_new_directory(tmp_path):
    r = keys(str(tmp_path / "keys"))
    assert r.returncode == exits.OK, r.stderr
    assert set(contents(tmp_path / "keys")) == set(KEY_FILES)


def test_keys_again_are_refused_and_the_keys_kept(tmp_path):
    directory = tmp_path / "keys"
    assert keys(str(directory)).returncode == exits.OK
    before = contents(directory)
    r = keys(str(directory))
    assert r.returncode == exits.USAGE, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("carelay: ") and "--force" in line and str(directory) in line, line
    assert r.stdout == ""
    assert contents(directory) == before


@pytest.mark.parametrize("name", KEY_FILES)
def test_any_one_key_file_there_refuses_and_writes_nothing(tmp_path, name):
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / name).write_text("kept\n")
    r = keys(str(directory))
    assert r.returncode == exits.USAGE, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert name in line, line
    assert contents(directory) == {name: b"kept\n"}


def test_force_replaces_the_keys(tmp_path):
    directory = tmp_path / "keys"
    assert keys(str(directory)).returncode == exits.OK
    before = contents(directory)
    r = keys("--force", str(directory))
    assert r.returncode == exits.OK, r.stderr
    after = contents(directory)
    assert set(after) == set(KEY_FILES)
    assert all(after[name] != before[name] for name in KEY_FILES)
    for name in ("shard.key_secret", "broker.key_secret"):
        assert (directory / name).stat().st_mode & 0o077 == 0, name


def test_help_describes_force():
    r = keys("--help")
    assert r.returncode == exits.OK, r.stderr
    assert "--force" in r.stdout and "replace" in r.stdout, r.stdout


def test_make_keys_keeps_keys_that_exist(tmp_path):
    made = make_keys(tmp_path)
    before = contents(tmp_path)
    with pytest.raises(KeysExist) as e:
        make_keys(tmp_path)
    assert str(made[0]) in str(e.value)
    assert contents(tmp_path) == before
    assert make_keys(tmp_path, force=True) == made
    assert contents(tmp_path) != before
