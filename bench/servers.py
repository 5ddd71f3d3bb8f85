"""The servers under test, each started by the suite on its own free CA port.

- ``carelay``: ``carelay up`` with N shards (a supervisor, a broker and N shards);
- ``control``: bench/control_relay.py, a single-process pcaspy relay;
- ``softioc``: bench/softioc_server.py, an IOC of the ``softioc`` package with
  its records created up front (the C CA server of EPICS base).

Every server runs in its own session (process group), so that the whole tree
can be stopped, and is stopped in a ``finally``: no server outlives the suite.
The relay CPU of a server is the utime+stime of its process and all its
descendants; its RSS is summed over the same processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
#: EPICS_CA_MAX_ARRAY_BYTES for clients and the non-carelay servers: room for 1e6 doubles.
MAX_ARRAY_BYTES = 20_000_000
#: Largest element count the servers serve (the workloads use 1e6).
MAX_ELEMENTS = 1_000_000
#: carelay's max_pvs in the suite: W5 creates 20,000 PVs.
CARELAY_MAX_PVS = 25_000
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class ServerError(RuntimeError):
    """A server that did not start or died."""


#: Lines of a server's log printed when a workload on it fails.
_LOG_TAIL = 200


def free_port(taken: set[int] | None = None) -> int:
    """A port free for TCP and UDP on loopback, never 5064 nor one already handed out."""
    taken = taken if taken is not None else set()
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if port not in (5064, 5065) and port not in taken:
            taken.add(port)
            return port
    raise ServerError("no free port")


def _clean_env() -> dict[str, str]:
    """os.environ without any EPICS_* variable (the suite sets its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}


def client_env(port: int) -> dict[str, str]:
    """What a CA client process needs in its environment before epics is imported."""
    return {
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_MAX_ARRAY_BYTES": str(MAX_ARRAY_BYTES),
    }


def server_env(port: int, max_array_bytes: bool = True) -> dict[str, str]:
    env = _clean_env()
    env.update(
        {
            "EPICS_CA_SERVER_PORT": str(port),
            "EPICS_CAS_SERVER_PORT": str(port),
            "EPICS_CA_ADDR_LIST": "127.0.0.1",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if max_array_bytes:
        env["EPICS_CA_MAX_ARRAY_BYTES"] = str(MAX_ARRAY_BYTES)
    return env


def softioc_available() -> str | None:
    """None if the softioc package can be used, else the reason it cannot."""
    try:
        import softioc  # noqa: F401
    except Exception as e:  # ImportError, or a broken binary wheel
        return f"softioc cannot be imported ({type(e).__name__}: {e})"
    return None


class Server:
    """One server process tree on its own port, with a log file in its own temp dir."""

    #: Name of the server kind (carelay, control, softioc).
    kind = "?"

    def __init__(self, ports: set[int], label: str | None = None) -> None:
        self.port = free_port(ports)
        self.prefix = f"B{uuid.uuid4().hex[:6]}:"
        self.tmp = Path(tempfile.gettempdir())  # its own directory once started
        self.label = label or self.kind
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._seen: dict[int, psutil.Process] = {}  # every process of the tree seen
        #: PVs the workload uses: (full name, type code, count); an IOC creates them up front.
        self.records: list[tuple[str, str, int]] = []

    # -- to override ---------------------------------------------------------------

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return server_env(self.port)

    def client_port(self, index: int) -> int:
        """The CA port client ``index`` of a phase talks to."""
        return self.port

    ready_text = "ready"

    # -- life cycle ------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.tmp / "server.log"

    def start(self) -> Server:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.kind}-"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.tmp,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while self.ready_text not in self.log():
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.label} exited with {self.proc.returncode} before it was ready:\n"
                    + self.log()[-3000:]
                )
            if time.monotonic() > deadline:
                raise ServerError(f"{self.label} not ready after {READY_TIMEOUT} s")
            time.sleep(0.05)
        self.processes()  # remember the pids of the tree, for stop()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def processes(self) -> list[psutil.Process]:
        """The server's process and all its descendants (alive ones)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def pids(self) -> dict[str, int]:
        """Role name -> pid, for profiling."""
        out = {}
        for p in self.processes():
            try:
                out[self._role(p.pid, p.cmdline())] = p.pid
            except psutil.Error:
                continue
        return out

    def _role(self, pid: int, cmd: list[str]) -> str:
        return f"{self.kind}-{pid}"

    def seen(self) -> list[dict]:
        """Every process of the tree seen: pid and create time (to check none survives)."""
        out = []
        for p in self._seen.values():
            with contextlib.suppress(psutil.Error):
                out.append({"pid": p.pid, "create_time": p.create_time()})
        return out

    def cpu_by_role(self) -> dict[str, float]:
        """utime+stime (seconds) of each process of the server, by role."""
        out: dict[str, float] = {}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                role = self._role(p.pid, p.cmdline())
                out[role] = out.get(role, 0.0) + t.user + t.system
        return out

    def cpu_seconds(self) -> float:
        """utime+stime of every process of the server, summed."""
        return sum(self.cpu_by_role().values())

    def rss_by_role(self) -> dict[str, int]:
        """Resident set size (bytes) of each process of the server, by role."""
        out: dict[str, int] = {}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                role = self._role(p.pid, p.cmdline())
                out[role] = out.get(role, 0) + p.memory_info().rss
        return out

    def rss_bytes(self) -> int:
        """RSS summed over every process of the server."""
        return sum(self.rss_by_role().values())

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise ServerError(f"{self.label} died:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the whole tree; nothing of it survives."""
        if self.proc is None:
            self._remove_tmp()
            return
        self.processes()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self._seen.values():
            # psutil checks the pid was not reused (create time) before it signals.
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.tmp.name.startswith("bench-"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            # A workload failed on this server: its log goes with the error, since the
            # server's directory goes with the server.
            tail = "\n".join(self.log().splitlines()[-_LOG_TAIL:])
            print(f"--- {self.label}: the last lines of its log ---\n{tail}", file=sys.stderr)
        self.stop()


class CarelayServer(Server):
    """``carelay up``; with ``brokers`` > 1, one CA broker per loopback port (``[[ca]]``),
    the phase's clients dealt out over them in turn."""

    kind = "carelay"
    #: What its label says after the shards and brokers (", PVA" for CarelayPvaServer).
    doors = ""

    def __init__(
        self, ports: set[int], shards: int = 2, label: str | None = None, brokers: int = 1
    ) -> None:
        extra = f", {brokers} brokers" if brokers > 1 else ""
        super().__init__(ports, label or f"carelay ({shards} shards{extra}{self.doors})")
        self.shards = shards
        self.ports = [self.port, *(free_port(ports) for _ in range(brokers - 1))]
        # Several brokers: the supervisor's line once every one serves.
        self.ready_text = "CA brokers ready" if brokers > 1 else "ready:"

    def client_port(self, index: int) -> int:
        return self.ports[index % len(self.ports)]

    def _doors(self) -> list[str]:
        if len(self.ports) == 1:
            return []
        config = self.tmp / "carelay.toml"
        config.write_text(
            "".join(f'[[ca]]\ninterfaces = ["127.0.0.1"]\nport = {p}\n\n' for p in self.ports)
        )
        return ["--config", str(config)]

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "carelay.supervisor.cli",
            "up",
            "--prefix",
            self.prefix,
            "--shards",
            str(self.shards),
            "--data-dir",
            str(self.tmp / "data"),
            "--max-pvs",
            str(CARELAY_MAX_PVS),
            "--max-elements",
            str(MAX_ELEMENTS),
            *self._doors(),
        ]

    def env(self) -> dict[str, str]:
        # The broker sets EPICS_CA_MAX_ARRAY_BYTES for itself from max_elements.
        return server_env(self.port, max_array_bytes=False)

    def _role(self, pid: int, cmd: list[str]) -> str:
        if "broker" in cmd:
            return f"broker{cmd[cmd.index('--index') + 1]}" if "--index" in cmd else "broker"
        if "shard" in cmd:
            return f"shard{cmd[cmd.index('shard') + 1]}"
        return "supervisor"


class ControlServer(Server):
    kind = "control"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.control_relay",
            "--prefix",
            self.prefix,
            "--max-elements",
            str(MAX_ELEMENTS),
        ]

    def _role(self, pid: int, cmd: list[str]) -> str:
        return "control"


class SoftiocServer(Server):
    """An IOC whose records (name, type code, count) are given up front."""

    kind = "softioc"

    def argv(self) -> list[str]:
        spec = self.tmp / "records.json"
        spec.write_text(json.dumps({"prefix": self.prefix, "records": self.records}))
        return [sys.executable, "-m", "bench.softioc_server", str(spec)]

    def env(self) -> dict[str, str]:
        env = server_env(self.port)
        env["PVXS_QSRV_ENABLE"] = "NO"  # CA only: no PVA server beside it
        return env

    def _role(self, pid: int, cmd: list[str]) -> str:
        return "softioc"
