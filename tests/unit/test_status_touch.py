"""The supervisor's status file is rewritten when what it says changes and touched
meanwhile: ``carelay status`` takes its freshness from the later of its mtime and the
time written inside it."""

from __future__ import annotations

import json
import os
import time

import pytest

from carelay.common.config import STATUS_TOUCH_INTERVAL, load_config
from carelay.supervisor.status import STALE_AFTER, collect
from tests.unit.test_status_view import stand_ins


@pytest.fixture
def supervisor_pid():
    """A live process whose command line names carelay, standing in for the supervisor."""
    with stand_ins("up") as (pid,):
        yield pid


def test_touch_interval_leaves_room_before_stale():
    assert STATUS_TOUCH_INTERVAL < STALE_AFTER


@pytest.mark.parametrize(("touched_ago", "answering"), [(0.0, True), (STALE_AFTER + 2, False)])
def test_supervisor_answers_while_its_file_is_touched(
    tmp_path, supervisor_pid, touched_ago, answering
):
    config = load_config(data_dir=str(tmp_path / "data"), shards=1)
    config.run_dir.mkdir(parents=True)
    path = config.run_dir / "supervisor.json"
    written = time.time() - STALE_AFTER - 60
    path.write_text(
        json.dumps({"pid": supervisor_pid, "written": written, "uptime": 100.0, "processes": []})
    )
    touched = time.time() - touched_ago
    os.utime(path, (touched, touched))
    status = collect(config)
    assert status["answering"] is answering
    # Uptime still counts from the time written inside the file.
    assert status["uptime"] >= 100.0 + STALE_AFTER + 60 - 1
