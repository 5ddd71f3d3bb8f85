"""OffLoop, and the access security reload that runs on it: the host names of a HAG are
looked up off the loop (a name server that does not answer holds up no client), and the
rules go in force on the loop thread."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from carelay.broker import access
from carelay.broker.offloop import OffLoop
from carelay.broker.pva.access import PvaAccess
from tests.unit.test_read_only_group import FakeCas


def _poll_until(off: OffLoop, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the work did not end"
        off.poll()
        time.sleep(0.005)


def test_the_work_runs_off_the_loop_and_its_result_is_handed_on_the_loop():
    release = threading.Event()
    ran_on, results = [], []

    def work():
        ran_on.append(threading.current_thread())
        release.wait(5)
        return 42

    def then(result):
        results.append((result, threading.current_thread()))

    off = OffLoop("test")
    off.submit(work, then)  # returns at once, the work waiting
    off.poll()
    assert off.busy and results == []
    release.set()
    _poll_until(off, lambda: results)
    assert results == [(42, threading.main_thread())]
    assert ran_on and ran_on[0] is not threading.main_thread()
    assert not off.busy


def test_asked_again_while_busy_it_runs_once_more_after():
    release = threading.Event()
    order = []

    def work(k):
        def run():
            if k == 1:
                release.wait(5)
            return k

        return run

    off = OffLoop("test")
    off.submit(work(1), order.append)
    off.submit(work(2), order.append)  # replaced by the next: one more run is enough
    off.submit(work(3), order.append)
    release.set()
    _poll_until(off, lambda: len(order) == 2)
    assert order == [1, 3]
    assert not off.busy


def test_work_that_raises_hands_on_none(caplog):
    def work():
        raise RuntimeError("boom")

    got = []
    off = OffLoop("acf-reload")
    off.submit(work, got.append)
    _poll_until(off, lambda: got)
    assert got == [None]
    assert "acf-reload failed" in caplog.text


SITE = 'HAG(ops) {"slow.example"}\nASG(DEFAULT) { RULE(1, READ) RULE(1, WRITE) { HAG(ops) } }\n'


def _slow_names(monkeypatch, module):
    """Host name look-ups that wait for the returned event, as with a name server that
    does not answer; and the threads they ran on."""
    release, threads = threading.Event(), []

    def resolve(host):
        threads.append(threading.current_thread())
        release.wait(5)
        return {"127.0.0.9"}

    monkeypatch.setattr(module, "resolve", resolve)
    return release, threads


def test_a_ca_reload_looks_host_names_up_off_the_loop(tmp_path, monkeypatch):
    site = tmp_path / "site.acf"
    site.write_text(SITE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = SimpleNamespace(
        access_security=site, access_group="DEFAULT", access_by_ip=True, run_dir=run_dir
    )
    release, threads = _slow_names(monkeypatch, access)
    cas, off = FakeCas(), OffLoop("acf-reload")
    off.submit(
        lambda: access.reread_rules(config), lambda t: access.reinstall_rules(cas, config, t)
    )
    off.poll()
    assert cas.loaded == []  # the loop goes on while the name is looked up
    release.set()
    _poll_until(off, lambda: cas.loaded)
    assert access.address_token("127.0.0.9") in cas.loaded[0]
    assert threads and threading.main_thread() not in threads


def test_a_pva_reload_looks_host_names_up_off_the_loop(tmp_path, monkeypatch):
    from carelay.broker.pva import access as pva_access

    site = tmp_path / "site.acf"
    site.write_text(SITE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = SimpleNamespace(access_security=site, access_group="DEFAULT", run_dir=run_dir)
    release, threads = _slow_names(monkeypatch, pva_access)
    rules = PvaAccess(config)
    installed = []
    off = OffLoop("acf-reload")
    off.submit(rules.reread, lambda r: installed.append(rules.install(r)))
    off.poll()
    assert installed == [] and rules.rules is None
    release.set()
    _poll_until(off, lambda: installed)
    assert installed == [True]
    assert rules.allows("127.0.0.9", "anyone") == pva_access.READ | pva_access.WRITE
    assert threads and threading.main_thread() not in threads
