"""System-test harness: the real ``carelay up`` in a subprocess, real CA clients.

The whole session uses one random free CA port, chosen before any CA client
library starts (libca reads its environment once); every relay gets its own
random prefix and data directory, and at most one relay runs at a time, so
no two servers ever share a port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench.servers import free_port

# Client processes spawned by a test import this module again: they must keep
# the session's port, which they find in the environment they inherit.
CA_PORT = int(os.environ.get("CARELAY_TEST_CA_PORT") or free_port())
os.environ["CARELAY_TEST_CA_PORT"] = str(CA_PORT)
# The session's own CA repeater port too (see ca_repeater): never the machine's 5065.
REPEATER_PORT = int(os.environ.get("CARELAY_TEST_REPEATER_PORT") or free_port({CA_PORT}))
os.environ["CARELAY_TEST_REPEATER_PORT"] = str(REPEATER_PORT)
CA_ENV = {
    "EPICS_CA_SERVER_PORT": str(CA_PORT),
    "EPICS_CA_REPEATER_PORT": str(REPEATER_PORT),
    "EPICS_CAS_SERVER_PORT": str(CA_PORT),
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CA_MAX_ARRAY_BYTES": str(20_000_000),
}
os.environ.update(CA_ENV)

CARELAY = [sys.executable, "-m", "carelay.supervisor.cli"]
READY_TIMEOUT = 30.0


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _udp_port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.bind(("", port))
        except OSError:
            return True
    return False


@pytest.fixture(scope="session", autouse=True)
def ca_repeater():
    """A CA repeater for the session, as every CA host runs one.

    Servers send their beacons to it and libca clients learn from it that a
    restarted server is back; without one, a client finds the server again only
    through its searches, whose back-off can outlast a test's patience.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "caproto.commandline.repeater", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or _udp_port_taken(REPEATER_PORT),
            what=f"the CA repeater on port {REPEATER_PORT}",
        )
        assert proc.poll() is None, f"the CA repeater exited with status {proc.returncode}"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def unique(stem: str = "pv") -> str:
    return f"{stem}{uuid.uuid4().hex[:8]}"


class Relay:
    """One ``carelay up`` process tree on the session's CA port.

    At most one runs at a time: two servers on one port split the searches
    between them, so starting a second one is an error, not a flaky test.
    """

    running: Relay | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @staticmethod
    def give_way() -> None:
        """Stop a module's shared relay, so that another can use the port; the fixture that
        shares it starts it again (see using_shared)."""
        if Relay.running is not None and Relay.running.shared and Relay.running.alive:
            Relay.running.stop()

    def __init__(self, tmp: Path, shards: int = 2, extra: list[str] | None = None) -> None:
        self.prefix = f"T{uuid.uuid4().hex[:8]}:"
        self.data_dir = tmp / "data"
        self.log_path = tmp / "relay.log"
        self.shards = shards
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.shared = False

    def argv(self, command: str = "up") -> list[str]:
        return [
            *CARELAY,
            command,
            "--prefix",
            self.prefix,
            "--shards",
            str(self.shards),
            "--data-dir",
            str(self.data_dir),
            *self.extra,
        ]

    def start(self) -> Relay:
        other = Relay.running
        if other is not None and other.alive:
            raise RuntimeError(
                f"relay {other.prefix} still runs on port {CA_PORT}; stop it before another starts"
            )
        Relay.running = self
        offset = len(self.log())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # The relay must set EPICS_CA_MAX_ARRAY_BYTES for itself: it gets none from us.
        env = {k: v for k, v in os.environ.items() if k != "EPICS_CA_MAX_ARRAY_BYTES"}
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self.wait_ready(start=offset)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = READY_TIMEOUT, start: int = 0) -> None:
        def seen():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode} waiting for {text}")
            return text in self.log()[start:]

        wait_for(seen, timeout, 0.05, f"{text!r} in the relay log")

    def wait_ready(self, start: int = 0) -> None:
        self.wait_log("ready:", start=start)

    def name(self, stem: str, type_count: str) -> str:
        """A fresh PV name under this relay's prefix, e.g. name("temp", "f1")."""
        return f"{self.prefix}{unique(stem)}_{type_count}"

    def status(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv("status"), capture_output=True, text=True, timeout=30, check=False
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def children(self) -> list[int]:
        """PIDs of the running processes whose command line names this relay's prefix."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # `carelay up` hands its children their flags as --prefix=P.
            prefix = self.prefix.encode()
            named = prefix in cmd or b"--prefix=" + prefix in cmd
            if named and int(entry.name) != os.getpid():
                try:
                    state = (entry / "stat").read_text().split(")")[-1].split()[0]
                except OSError:
                    continue
                if state != "Z":
                    out.append(int(entry.name))
        return out


def pytest_collection_modifyitems(config, items):
    """Every test under tests/system starts the real relay: marked ``system``, so that
    ``pytest -m "not system"`` runs the fast suite.  The hook sees the whole session's
    items, so it marks only those of this folder."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.system)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _report_log(request, relay: Relay) -> None:
    failed = any(
        getattr(request.node, f"rep_{when}", None) is not None
        and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )
    if failed:
        sys.stderr.write(f"\n----- relay log ({relay.log_path}) -----\n{relay.log()}\n")


@pytest.fixture
def make_relay(tmp_path, request):
    """Start relays of one's own (stopped at the end of the test)."""
    relays: list[Relay] = []

    def make(
        shards: int = 2, extra: list[str] | None = None, start: bool = True, kind=None
    ) -> Relay:
        """``kind``: the Relay class (e.g. tests.system.pva.PvaRelay); Relay by default."""
        Relay.give_way()
        d = tmp_path / f"relay{len(relays)}"
        d.mkdir()
        relay = (kind or Relay)(d, shards, extra)
        relays.append(relay)
        return relay.start() if start else relay

    yield make
    for relay in relays:
        relay.stop()
        _report_log(request, relay)


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory):
    """One relay for a whole module of tests that each use their own PV names."""
    relay = Relay(tmp_path_factory.mktemp("shared"), shards=2)
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def ca():
    """One caproto client context for the module."""
    from tests.system.clients import Context

    ctx = Context()
    yield ctx
    ctx.disconnect()


@pytest.fixture
def relay(shared_relay, request):
    yield from using_shared(shared_relay, request)


def using_shared(shared: Relay, request):
    """Body of a fixture that hands a module's shared relay to one test: started again if
    it gave way, its log printed if the test failed, and it must not die meanwhile."""
    if not shared.alive:
        shared.start()
    yield shared
    _report_log(request, shared)
    assert shared.proc.poll() is None, "the shared relay died during the test"


def caproto_cli(
    tool: str, *args: str, timeout: float = 30, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run caproto-get/put/monitor as a user would (``env``: its environment, if not ours).

    ``--no-repeater``: otherwise the first call on a machine without a CA
    repeater spawns one, which inherits our stdout/stderr pipes and keeps
    them open, so ``subprocess.run`` waits for it until the timeout.
    """
    return subprocess.run(
        [sys.executable, "-m", f"caproto.commandline.{tool}", "--no-repeater", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
