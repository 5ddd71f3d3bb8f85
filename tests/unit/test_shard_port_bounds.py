"""A shard's tcp port under connections that never complete their handshake (idle
sockets, keys or none): each is closed after SHARD_HANDSHAKE_MS, and the shard runs
with descriptors enough for a flood of them (with systemd's usual 1,024, such a flood
left it none: no broker could connect again)."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from bench.servers import free_port
from carelay.common.config import SHARD_FD_LIMIT, load_config
from carelay.shard import server as shard_server
from carelay.shard.persist import ShardDatabase
from carelay.shard.server import ShardServer
from tests.unit.driven_shard import PREFIX


def test_a_connection_that_never_shakes_hands_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_server, "SHARD_HANDSHAKE_MS", 200)
    port = free_port()
    config = load_config(
        prefix=PREFIX,
        shards=1,
        data_dir=str(tmp_path / "data"),
        endpoints=[f"tcp://127.0.0.1:{port}"],
    )
    config.run_dir.mkdir(parents=True)
    server = ShardServer(config, 0, db=ShardDatabase(config.store_path(0)))
    server.load()
    server.bind()
    stop = SimpleNamespace(stopping=False)
    serving = threading.Thread(target=server.serve, args=(stop,))
    serving.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.settimeout(10)
            start = time.monotonic()
            try:
                while idle.recv(4096):  # its greeting; then nothing until it closes
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - start < 5, "the idle connection was held"
    finally:
        stop.stopping = True
        serving.join(10)
        server.close()


def test_a_shard_raises_its_descriptor_limit(tmp_path):
    """Started with a soft limit of 1,024, as systemd starts services."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = SHARD_FD_LIMIT if hard == resource.RLIM_INFINITY else min(SHARD_FD_LIMIT, hard)
    shard = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "carelay.supervisor.cli",
            "shard",
            "0",
            "--prefix",
            PREFIX,
            "--shards",
            "1",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "data" / "run" / "shard-0.json").exists():
            assert shard.poll() is None, shard.stderr.read()
            assert time.monotonic() < deadline, "the shard did not start"
            time.sleep(0.05)
        limits = Path(f"/proc/{shard.pid}/limits").read_text()
        soft = next(line.split()[3] for line in limits.splitlines() if "open files" in line)
        assert int(soft) == want, limits
    finally:
        shard.terminate()
        shard.wait(10)
