"""The health sample's CpuMeter keeps each process's /proc stat file open and reads it
again from the start: it still sees CPU time move, and lets go of a process that ended."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from carelay.broker.health import CpuMeter
from carelay.common.procstat import read_stat


def test_a_kept_stat_file_shows_cpu_time_move_and_a_gone_process_is_let_go():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        meter = CpuMeter()
        pids = [os.getpid(), child.pid]
        meter.sample(pids, time.monotonic())
        before = meter._last[os.getpid()]
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            pass  # burn CPU time in this process
        load, rss = meter.sample(pids, time.monotonic())
        assert meter._last[os.getpid()] > before and load > 0
        assert rss >= read_stat(os.getpid()).rss
        assert set(meter._files) == set(pids)
        child.kill()
        child.wait()
        _, rss_alone = meter.sample(pids, time.monotonic())
        assert set(meter._files) == {os.getpid()} and 0 < rss_alone < rss
    finally:
        child.kill()
        child.wait()
