"""``carelay list`` and ``carelay export`` into a reader that stops reading (``| head -1``):
the command ends quietly, with the status of a process a closed pipe ends (141)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from carelay.common.config import load_config
from carelay.common.exits import TRANSFER_FAILED
from carelay.shard.persist import ShardDatabase

#: 128 + SIGPIPE: what a shell reports for a writer its closed pipe ended.
CLOSED_PIPE = 141


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A stopped relay's stores, holding more than a pipe buffers (64 KiB)."""
    config = load_config(data_dir=str(tmp_path_factory.mktemp("pipe") / "data"), shards=1)
    config.data_dir.mkdir(parents=True)
    db = ShardDatabase(config.store_path(0))
    db.open()
    try:
        db.save(
            (f"{config.prefix}pv{k:05d}_f4", 1795904681.5, np.arange(4.0), {}) for k in range(2000)
        )
    finally:
        db.close()
    return config.data_dir


def carelay(*args: str, stdout) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carelay.supervisor.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["export"]])
def test_a_reader_gone_before_the_first_line(data_dir, command):
    read, write = os.pipe()
    os.close(read)
    try:
        r = carelay(*command, "--data-dir", str(data_dir), stdout=write)
    finally:
        os.close(write)
    assert r.returncode == CLOSED_PIPE, r.stderr
    assert "Error" not in r.stderr and "Exception" not in r.stderr, r.stderr


@pytest.mark.parametrize("command", [["list"], ["export"]])
def test_head_takes_one_line(data_dir, command):
    head = subprocess.Popen(["head", "-1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        r = carelay(*command, "--data-dir", str(data_dir), stdout=head.stdin)
    finally:
        head.stdin.close()
        first = head.stdout.read()
        head.wait(timeout=10)
    assert first.count(b"\n") == 1, first
    assert r.returncode == CLOSED_PIPE, r.stderr
    assert "Error" not in r.stderr and "Exception" not in r.stderr, r.stderr


def test_an_export_to_a_full_disk_says_so_in_one_line(data_dir):
    """``carelay export > /dev/full``: a traceback before; one line and a failure now."""
    with open("/dev/full", "w") as full:
        done = carelay("export", "--data-dir", str(data_dir), stdout=full)
    assert done.returncode == TRANSFER_FAILED
    assert "Traceback" not in done.stderr
    assert "cannot write the export: No space left on device" in done.stderr
