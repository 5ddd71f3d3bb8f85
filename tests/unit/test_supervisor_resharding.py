"""While `carelay up` moves PVs between stores, before its children start, its status
says so and stays fresh (`carelay status` said "not running" meanwhile)."""

from __future__ import annotations

import json
import os
import threading
import time

from carelay.common.config import load_config
from carelay.supervisor import supervisor as sup


def test_while_it_reshards_the_supervisor_says_so_and_keeps_its_status_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(sup, "STATUS_TOUCH_INTERVAL", 0.02)
    s = sup.Supervisor(load_config(None, data_dir=str(tmp_path)), [])
    s.config.run_dir.mkdir(parents=True)
    with s._resharding() as moving:
        moving()
        assert json.loads(s.status_path.read_text())["resharding"] is True
        os.utime(s.status_path, (0, 0))
        deadline = time.monotonic() + 10
        while s.status_path.stat().st_mtime == 0:
            assert time.monotonic() < deadline, "the status file was not touched"
            time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "resharding"]
