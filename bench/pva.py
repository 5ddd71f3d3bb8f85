"""W7 and W8: PV Access, the relay's second front door (``pva = true``).

    python -m bench --only W7,W8 --servers carelay,control

- **W7 cross-protocol latency**: on one relay with PVA, a CA writer at ``w2_rate`` Hz
  (W2's ``latency_writer``, stamping ``time.time()``) and ``w2_monitors`` PVA monitors;
  then the reverse, a PVA writer at the same rate and as many CA monitors (W2's
  ``latency_monitor``).  ``w2_puts`` puts each way.  Figures per direction
  (``ca_to_pva``, ``pva_to_ca``): p50, p99 and max put-to-monitor latency, the events
  received, the writer's late puts and its rate.  The PVA writer does not wait for each
  put's completion (p4p's raw put, completed in the background), as the CA writer puts
  without callback; it waits for them all at the end.  On the control for PVA, the
  same PVA writer and as many PVA monitors, in the ``pva_to_ca`` column: what this
  machine gives a p4p writer and p4p monitors through one server process, no relay.
- **W8 PVA puts/s**: the largest W1 client count of p4p clients, each ``w1_puts // 4``
  puts to its own f1 PV, one at a time (each waits for its completion), then a get that
  must read the last value; against carelay with PVA and against the control for PVA,
  bench/pva_control.py (a plain p4p ``SharedPV`` server with the same PVs created up
  front), which ``--servers control`` selects for this workload.  Figures: puts/s, the
  relay CPU per put (every process of the server) and the clients' (every thread of
  the p4p clients' processes, over their puts): the two share the machine's cores.

Neither workload runs on softioc.  Every server gets its own free PVA TCP and UDP ports
(never 5075/5076), on loopback; the clients reach it by name server, without broadcast.
The PVA clients run in the suite's client processes like the CA ones (bench/phase.py).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from bench.clients import paced_puts
from bench.report import Row
from bench.servers import (
    READY_TIMEOUT,
    CarelayServer,
    Server,
    ServerError,
    free_port,
    server_env,
)
from bench.workloads import spread_names

#: Values below this are warm-up puts, not timestamps (as bench/clients.py).
_STAMP_MIN = 1e9
#: Seconds a PVA operation of a client may take before it fails.
PVA_TIMEOUT = 30.0
#: How the CA writer and monitor of W2 are named for bench/phase.py.
CA_WRITER, CA_MONITOR = "latency_writer", "latency_monitor"
PVA_WRITER, PVA_MONITOR = "bench.pva.pva_latency_writer", "bench.pva.pva_latency_monitor"


def pvas_env(tcp: int, udp: int) -> dict[str, str]:
    """What a PVA server (pvxs) reads: its ports, on loopback only."""
    return {
        "EPICS_PVAS_SERVER_PORT": str(tcp),
        "EPICS_PVAS_BROADCAST_PORT": str(udp),
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    }


def pva_conf(tcp: int, udp: int) -> dict[str, str]:
    """A p4p client's configuration: the server by TCP, no broadcast search."""
    return {
        "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{tcp}",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_BROADCAST_PORT": str(udp),
        "EPICS_PVA_SERVER_PORT": str(tcp),
    }


def pva_available() -> str | None:
    """None if p4p can be used, else the reason it cannot."""
    try:
        import p4p.client.thread  # noqa: F401
    except Exception as e:  # ImportError, or a broken binary wheel
        return f"p4p cannot be imported ({type(e).__name__}: {e}); pip install carelay[pva]"
    return None


class _PvaPorts:
    """A PVA TCP and UDP port of the suite's port book, and the client configuration."""

    def _pva_ports(self, ports: set[int]) -> None:
        self.pva_port = free_port(ports)
        self.pva_udp_port = free_port(ports)

    @property
    def conf(self) -> dict[str, str]:
        return pva_conf(self.pva_port, self.pva_udp_port)


class CarelayPvaServer(_PvaPorts, CarelayServer):
    """``carelay up --pva true``: ready once the CA broker and the PVA front-end are."""

    doors = ", PVA"

    def __init__(self, ports: set[int], shards: int = 2, brokers: int = 1) -> None:
        super().__init__(ports, shards, brokers=brokers)
        self._pva_ports(ports)
        self.ready_text = " pva: ready:"

    def argv(self) -> list[str]:
        return [*super().argv(), "--pva", "true"]

    def env(self) -> dict[str, str]:
        return {**super().env(), **pvas_env(self.pva_port, self.pva_udp_port)}

    def start(self) -> Server:
        super().start()
        deadline = time.monotonic() + READY_TIMEOUT
        while " broker: ready:" not in self.log():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"{self.label}: no CA broker ready")
            time.sleep(0.05)
        return self

    def _role(self, pid: int, cmd: list[str]) -> str:
        return "pva" if "pva" in cmd else super()._role(pid, cmd)


class PvaControlServer(_PvaPorts, Server):
    """bench/pva_control.py, with the workload's records created up front."""

    kind = "control"
    #: The server's module (``python -m MODULE SPEC.json``), and its label.
    module = "bench.pva_control"
    title = "control (p4p SharedPV)"

    def __init__(self, ports: set[int]) -> None:
        super().__init__(ports, self.title)
        self._pva_ports(ports)

    def argv(self) -> list[str]:
        spec = self.tmp / "records.json"
        spec.write_text(json.dumps({"prefix": self.prefix, "records": self.records}))
        return [sys.executable, "-m", self.module, str(spec)]

    def env(self) -> dict[str, str]:
        return {**server_env(self.port), **pvas_env(self.pva_port, self.pva_udp_port)}

    def _role(self, pid: int, cmd: list[str]) -> str:
        return "control"


class PvaFloorServer(PvaControlServer):
    """bench/pva_floor.py: the control's PVs, each put kept by a second process over
    ZeroMQ before it completes.  Its processes are ``floor`` and ``truth``."""

    kind = "floor"
    module = "bench.pva_floor"
    title = "floor (p4p over ZeroMQ)"

    def _role(self, pid: int, cmd: list[str]) -> str:
        return "truth" if "--truth" in cmd else "floor"


# -- the workloads ---------------------------------------------------------------------


def w7(bench, kind: str) -> dict:
    """W7 on ``kind``: both ways on carelay, PVA to PVA on the control; nothing on softioc."""
    if kind not in ("carelay", "control"):
        return {}
    p = bench.params
    if kind == "carelay":
        srv = CarelayPvaServer(bench.ports, p.carelay_shards)
        ways = (("ca_to_pva", CA_WRITER, PVA_MONITOR), ("pva_to_ca", PVA_WRITER, CA_MONITOR))
    else:
        srv = PvaControlServer(bench.ports)
        srv.records = [(f"{srv.prefix}w7pvatoca_f1", "f", 1)]
        ways = (("pva_to_ca", PVA_WRITER, PVA_MONITOR),)
    bench.started.append(srv)
    out = {}
    with srv:
        for way, writer, monitor in ways:
            name = f"{srv.prefix}w7{way.replace('_', '')}_f1"
            clients = [(writer, _kw(writer, srv, name=name, n=p.w2_puts, rate=p.w2_rate))]
            clients += [(monitor, _kw(monitor, srv, name=name))] * p.w2_monitors
            r = bench.phase(srv, clients, [0], f"W7-{way}")
            lat = np.concatenate(
                [np.asarray(r.results[i]["latency"]) for i in range(1, len(clients))]
            )
            if lat.size == 0:
                raise RuntimeError(f"W7 {way}: no monitor event received")
            out[f"p50_ms_{way}"] = float(np.percentile(lat, 50) * 1e3)
            out[f"p99_ms_{way}"] = float(np.percentile(lat, 99) * 1e3)
            out[f"max_ms_{way}"] = float(lat.max() * 1e3)
            out[f"events_received_pct_{way}"] = 100.0 * lat.size / (p.w2_puts * p.w2_monitors)
            out[f"writer_late_puts_{way}"] = float(r.results[0]["late"])
            out[f"writer_puts_per_s_{way}"] = p.w2_puts / r.results[0]["elapsed"]
    return out


def w8(bench, kind: str) -> dict:
    """W8 on ``kind`` (carelay, or the PVA control); nothing for softioc."""
    if kind not in ("carelay", "control"):
        return {}
    p = bench.params
    n, puts = max(p.w1_clients), max(1, p.w1_puts // 4)
    if kind == "carelay":
        srv = CarelayPvaServer(bench.ports, p.carelay_shards)
    else:
        srv = PvaControlServer(bench.ports)
    bench.started.append(srv)
    # Spread evenly over carelay's shards (the average case of many PVs), as in W9 and
    # bench.pva_cost: random names land the clients' PVs 4/0, 3/1 or 2/2.
    names = spread_names(srv.prefix, "w8c", "f1", n, [p.carelay_shards])
    srv.records = [(name, "f", 1) for name in names]
    clients = [
        ("bench.pva.pva_put_writer", {"name": name, "n": puts, "base": 1e6 * k, "conf": srv.conf})
        for k, name in enumerate(names, start=1)
    ]
    with srv:
        r = bench.phase(srv, clients, list(range(n)), "W8")
    total = n * puts
    return {
        "puts_per_s": total / r.driver_span(range(n)),
        "cpu_us_per_put": r.cpu_s / total * 1e6,
        "client_cpu_us_per_put": client_cpu_s(r, n) / total * 1e6,
    }


def client_cpu_s(r, n: int) -> float:
    """The CPU seconds W8's ``n`` writers spent on their puts, all together."""
    return sum(r.done[i]["cpu"] for i in range(n))


def _kw(fn: str, srv, **kw) -> dict:
    """A client's kwargs: the PVA ones also get the server's PVA configuration."""
    return {**kw, "conf": srv.conf} if fn.startswith("bench.pva.") else kw


def rows(params) -> list[Row]:
    """The table rows of W7 (per direction) and W8."""
    out = []
    for way, what in (
        ("ca_to_pva", "CA put to PVA monitor"),
        ("pva_to_ca", "PVA put to CA monitor (control: PVA)"),
    ):
        out += [
            Row("W7", f"{what}, latency p50 (ms)", f"p50_ms_{way}"),
            Row("W7", f"{what}, latency p99 (ms)", f"p99_ms_{way}", ("<", 5.0, "abs")),
            Row("W7", f"{what}, latency max (ms)", f"max_ms_{way}"),
            Row("W7", f"{what}, monitor events received (%)", f"events_received_pct_{way}"),
            Row("W7", f"{what}, writer puts/s", f"writer_puts_per_s_{way}"),
        ]
    n = max(params.w1_clients)
    out += [
        Row("W8", f"PVA puts/s, {n} clients", "puts_per_s", (">=", 0.8, "ratio")),
        Row("W8", "relay CPU-us per PVA put", "cpu_us_per_put"),
        Row("W8", "clients' CPU-us per PVA put", "client_cpu_us_per_put"),
    ]
    return out


# -- the PVA clients (run by bench.clients.client_main; ``epics`` unused) ---------------


def _context(conf: dict):
    from p4p.client.thread import Context

    return Context("pva", conf=conf, useenv=False)


def pva_put_writer(epics, sync, name: str, n: int, base: float, conf: dict) -> dict:
    """n puts to one f1 PV, each waiting for its completion; then a read of the last."""
    ctx = _context(conf)
    try:
        ctx.put(name, base, timeout=PVA_TIMEOUT)  # creates the PV on a relay: not timed
        t0 = sync.ready()
        cpu0 = time.process_time()
        last = base
        for i in range(1, n + 1):
            last = base + i
            ctx.put(name, last, timeout=PVA_TIMEOUT, get=False)
        # The client's own CPU (every thread of its process, p4p's included): it shares
        # the machine with the server, so what it spends per put bounds the puts/s too.
        cpu = time.process_time() - cpu0
        got = float(ctx.get(name, timeout=PVA_TIMEOUT))
        if got != last:
            raise AssertionError(f"{name}: read {got} after the last put of {last}")
        return {"start": t0, "end": time.monotonic(), "puts": n, "cpu": cpu}
    finally:
        ctx.close()


class _Puts:
    """PVA puts that do not wait, each completed in the background (p4p's raw put), the
    way a CA put without callback does not wait: the writer keeps its rate."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.ops: list = []  # an operation dropped is cancelled: keep them all
        self.left = 0
        self.errors: list = []
        self.cond = threading.Condition()

    def put(self, name: str, value: float) -> None:
        from p4p.client.raw import Context as RawContext

        with self.cond:
            self.left += 1
        self.ops.append(RawContext.put(self.ctx, name, self._done, builder=value, get=False))

    def _done(self, err) -> None:
        with self.cond:
            self.left -= 1
            if err is not None:
                self.errors.append(err)
            self.cond.notify_all()

    def wait(self, timeout: float) -> None:
        """Every put completed; the first failure raised."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.left == 0, timeout):
                raise TimeoutError(f"{self.left} PVA puts not completed after {timeout} s")
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} PVA puts failed: {self.errors[0]!r}")


def pva_latency_writer(epics, sync, name: str, n: int, rate: float, conf: dict) -> dict:
    """n PVA puts at ``rate`` Hz, each the writer's time.time() (W2's writer over PVA)."""
    ctx = _context(conf)
    try:
        ctx.put(name, 0.0, timeout=PVA_TIMEOUT)
        puts = _Puts(ctx)
        sync.ready()
        time.sleep(0.2)  # let every monitor settle
        t0, late = paced_puts(lambda stamp: puts.put(name, stamp), n, rate)
        elapsed = time.perf_counter() - t0
        puts.wait(PVA_TIMEOUT)
        ctx.put(name, 0.0, timeout=PVA_TIMEOUT)  # every stamp has been applied
        return {"puts": n, "late": late, "elapsed": elapsed}
    finally:
        ctx.close()


def pva_latency_monitor(epics, sync, name: str, conf: dict) -> dict:
    """A PVA monitor of ``name``; the latency of each event is now - value."""
    ctx = _context(conf)
    lat: list[float] = []
    first = threading.Event()

    def on_event(value) -> None:
        now = time.time()
        if isinstance(value, Exception):
            return
        first.set()
        v = float(value)
        if v > _STAMP_MIN:
            lat.append(now - v)

    sub = ctx.monitor(name, on_event)
    try:
        if not first.wait(PVA_TIMEOUT):
            raise TimeoutError(f"{name}: no first PVA monitor event")
        sync.ready()
        sync.stop.wait(600)
        time.sleep(0.05)
        return {"latency": list(lat)}
    finally:
        sub.close()
        ctx.close()
