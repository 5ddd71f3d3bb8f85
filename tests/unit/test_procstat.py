"""The one parse of /proc/PID/stat (broker health, supervisor stop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from carelay.common.procstat import parse_stat, read_stat


def test_this_process():
    stat = read_stat(os.getpid())
    assert stat.state in "RS" and stat.cpu_ticks >= 0 and stat.rss > 0
    assert stat.cpu_seconds == stat.cpu_ticks / os.sysconf("SC_CLK_TCK")


def test_a_process_that_is_gone_or_not_a_stat():
    assert read_stat(2**22 + 12345) is None
    assert parse_stat(b"") is None
    assert parse_stat(b"12 (name) S 1 2") is None


def test_fields_are_counted_from_the_last_parenthesis():
    rest = b" T 1 2 3 4 5 6 7 8 9 10 700 55 0 0 20 0 1 0 100 1000 9"
    stat = parse_stat(b"42 (a) (b c)" + rest)
    assert (stat.state, stat.cpu_ticks, stat.rss) == ("T", 755, 9 * os.sysconf("SC_PAGE_SIZE"))


def test_a_stopped_child_reads_stopped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while read_stat(child.pid).state != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_stat(child.pid).state == "T"
    finally:
        child.kill()
        child.wait()
