"""``carelay list``: every PV of a relay, running or stopped, from its stores."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from carelay.common.sharding import shard_for
from tests.system.clients import connect, write_status
from tests.system.conftest import CARELAY


def carelay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CARELAY, *args], capture_output=True, text=True, timeout=60, check=False
    )


def listing(relay, *args: str) -> list[dict]:
    r = carelay("list", "--data-dir", str(relay.data_dir), "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_list_running_and_stopped_relay(make_relay, ca):
    relay = make_relay()
    p = relay.prefix
    puts = {
        f"{p}alpha_f4": np.array([1.5, 2.5]),
        f"{p}beta_i1": np.array([7], dtype=np.int32),
        f"{p}gamma_C8": np.array([1.0, 2.0, 3.0]),
        f"{p}delta_c20": np.frombuffer(b"hello", dtype=np.uint8),
    }
    for name, value in puts.items():
        assert write_status(connect(ca, name), value).success
    expected = {
        f"{p}alpha_f4": ("f", 4, 2, 16),
        f"{p}beta_i1": ("i", 1, 1, 4),
        f"{p}gamma_C8": ("C", 8, 3, 3),
        f"{p}delta_c20": ("c", 20, 5, 5),
    }

    rows = listing(relay)
    assert [r["name"] for r in rows] == sorted(expected)
    for r in rows:
        assert (r["type"], r["count"], r["nord"], r["bytes"]) == expected[r["name"]]
        assert r["shard"] == shard_for(r["name"], relay.shards)
        assert r["updated"] > 0

    # The table: a header, then one aligned row per PV, sorted.
    r = carelay("list", "--data-dir", str(relay.data_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "COUNT", "NORD", "SHARD", "UPDATED", "BYTES"]
    assert [line.split()[0] for line in lines[1:]] == sorted(expected)
    column = lines[0].index("TYPE")
    assert all(line[column - 1] == " " and line[column] != " " for line in lines[1:]), r.stdout

    # A glob, on the name with or without the prefix, and one shard.
    assert [r["name"] for r in listing(relay, "al*")] == [f"{p}alpha_f4"]
    assert [r["name"] for r in listing(relay, f"{p}*_c20")] == [f"{p}delta_c20"]
    for k in range(relay.shards):
        assert [r["name"] for r in listing(relay, "--shard", str(k))] == sorted(
            n for n in expected if shard_for(n, relay.shards) == k
        )

    relay.stop()
    assert not relay.alive
    stopped = listing(relay)
    assert [(r["name"], r["nord"]) for r in stopped] == [(r["name"], r["nord"]) for r in rows]
