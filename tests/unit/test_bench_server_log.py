"""A workload that fails on a bench server shows the server's log: its directory, and the
log in it, go with the server when it stops."""

from __future__ import annotations

import sys

import pytest

from bench.servers import Server


class _Echo(Server):
    kind = "echo"

    def argv(self) -> list[str]:
        code = "import time; print('a line of the server', flush=True); time.sleep(60)"
        return [sys.executable, "-c", code]

    ready_text = "a line of the server"


def test_a_failed_workload_prints_the_servers_log(capsys):
    srv = _Echo(set())
    with pytest.raises(RuntimeError, match="the workload failed"), srv:
        raise RuntimeError("the workload failed")
    err = capsys.readouterr().err
    assert "echo: the last lines of its log" in err and "a line of the server" in err
    assert not srv.tmp.exists()  # stopped and cleaned up all the same


def test_a_workload_that_ends_well_prints_nothing(capsys):
    with _Echo(set()):
        pass
    assert "the last lines" not in capsys.readouterr().err
