"""An access security reload whose HAG host names take long to look up (a name server
that does not answer: each look-up waits out the resolver's timeout) holds up no client:
CA and PVA puts are served meanwhile, and the new rules go in force once the names are
known.

The relay's processes get a ``sitecustomize`` that makes the look-up of one name take
SLOW_SECONDS and leaves a mark that it started: the fault, in the relay itself."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.system.clients import connect, put, role_pid
from tests.system.pva import PvaRelay, pva_context

pytest.importorskip("p4p")

SLOW_HOST = "slow.example"
SLOW_SECONDS = 8.0
#: Every client writes; the reloaded file adds a HAG that names the slow host.
OPEN = "ASG(DEFAULT) { RULE(1, READ) RULE(1, WRITE) }\n"
WITH_SLOW = f'HAG(far) {{ "{SLOW_HOST}" }}\n' + OPEN

HOOK = f"""
import os, socket, time

_real = socket.getaddrinfo


def getaddrinfo(host, *args, **kw):
    if host == {SLOW_HOST!r}:
        marks = os.environ.get("CARELAY_TEST_SLOW_MARKS")
        if marks:
            open(os.path.join(marks, str(os.getpid())), "w").close()
        time.sleep({SLOW_SECONDS})
    return _real(host, *args, **kw)


socket.getaddrinfo = getaddrinfo
"""


def _wait_marks(marks, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(os.listdir(marks)) < n:
        assert time.monotonic() < deadline, f"{n} processes never looked {SLOW_HOST} up"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_reload_whose_host_names_take_long_holds_up_no_client(
    make_relay, tmp_path, monkeypatch, ca
):
    hook, marks = tmp_path / "hook", tmp_path / "marks"
    hook.mkdir()
    marks.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("CARELAY_TEST_SLOW_MARKS", str(marks))
    path = tmp_path / "site.acf"
    path.write_text(OPEN)
    relay = make_relay(shards=1, kind=PvaRelay, extra=["--access-security", str(path)])
    name = relay.name("dns", "f1")
    put(name, 1.0)
    pv = connect(ca, name)
    ctx = pva_context()
    try:
        ctx.put(name, 2.0, timeout=5)
        path.write_text(WITH_SLOW)
        start = len(relay.log())
        for role in ("broker", "pva"):
            os.kill(role_pid(relay, role), signal.SIGHUP)
        _wait_marks(marks, 2)  # both front-ends are looking the name up now
        # Served while the look-ups wait, each put well within them.
        assert pv.write([3.0], wait=True, timeout=SLOW_SECONDS / 4).status.success
        ctx.put(name, 4.0, timeout=SLOW_SECONDS / 4)
        assert " access security reloaded" not in relay.log()[start:]
        relay.wait_log(" broker: access security reloaded", start=start, timeout=30)
        relay.wait_log(" pva: access security reloaded", start=start, timeout=30)
    finally:
        ctx.close()
    assert pv.read(timeout=5).data[0] == 4.0
