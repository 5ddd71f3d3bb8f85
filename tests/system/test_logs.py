"""Logs that read well: a short start-up, one line per event, no repetition."""

from __future__ import annotations

import re

import numpy as np

from tests.system.clients import connect, write_status

#: The most INFO lines a default ``carelay up`` may take to say it is ready.
MAX_STARTUP_INFO_LINES = 5


def test_startup_says_it_all_in_a_few_lines(make_relay):
    relay = make_relay()
    lines = relay.log().splitlines()
    until_ready = lines[: next(i for i, line in enumerate(lines) if "ready:" in line) + 1]
    info = [line for line in until_ready if " INFO " in line]
    assert len(info) <= MAX_STARTUP_INFO_LINES, "\n".join(info)
    said = "\n".join(info)
    # The ports, the interfaces, the prefix, the shards, the data directory, the control PVs.
    for part in (
        "CA port",
        "127.0.0.1",
        relay.prefix,
        "2 shards",
        str(relay.data_dir.resolve()),
        f"{relay.prefix}pvlist",
        f"{relay.prefix}delpv",
    ):
        assert part in said, f"{part!r} not in the start-up lines:\n{said}"
    # Epochs and sequence numbers are for DEBUG.
    assert "epoch" not in said and "seq" not in said, said


def test_no_line_names_its_process_twice(make_relay, ca, tmp_path):
    relay = make_relay()
    name = relay.prefix + "twice_f1"
    assert write_status(connect(ca, name), np.array([1.0])).success
    assert write_status(connect(ca, name + ".EGU"), [b"V"]).success
    assert write_status(connect(ca, relay.prefix + "delpv"), name.encode()).success
    relay.stop()
    log = relay.log()
    # "shard 1: shard 1: ...", "shard 1: created PV X (shard 1)", "broker: broker started".
    twice = [
        line
        for line in log.splitlines()
        if (m := re.search(r" (INFO|WARNING|ERROR|DEBUG) (shard \d+|broker|supervisor): ", line))
        and m[2] in line[m.end() :]
    ]
    assert twice == [], "\n".join(twice)
    assert "flushed 1 values" not in log and "flushed 0 values" not in log
