"""The relay's own health, as plain Python values: no pcaspy, no threads.

The broker's loop feeds a ``Health`` (counters as they happen, ``sample`` once
every HEALTH_INTERVAL); the health PVs (broker/healthpvs.py) and the Prometheus
collector (broker/metrics.py) read what ``sample`` left.  The collector runs in
prometheus_client's thread: it reads only ``Health.snapshot``, a dict that the
loop replaces whole and never changes in place.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from carelay.broker.circuits import is_ca_circuit
from carelay.broker.errorlog import ErrorLog, KeepsRefusals, fit_line
from carelay.broker.logbudget import RefusedPuts
from carelay.common import fields
from carelay.common.config import (
    SHARD_FAILING_RESTARTS,
    SHARD_FAILING_WINDOW,
)
from carelay.common.histogram import FLUSH_BUCKETS, PUT_BUCKETS, Histogram
from carelay.common.keys import is_loopback_endpoint
from carelay.common.procstat import parse_stat

log = logging.getLogger(__name__)

#: EPICS alarm status STATE_ALARM (alarm.h), raised by a shard's STATE.
STATE_ALARM = 7
#: What PCAS can wait on in select(): descriptors at or above it are ignored.
FD_SETSIZE = 1024
#: Kinds of refusal, as the ``reason`` label of carelay_refusals_total says them.
REFUSAL_KINDS = (
    "name",  # a name that breaks the naming rule, or an unknown field
    "limit",  # max_pvs or max_bytes
    "convert",  # a value that cannot convert to the PV's type
    "field",  # a field value that is not accepted (a DESC too long, ...)
    "provisional",  # a field put to a PV that has had no put yet
    "no_such_pv",  # delpv of a PV that does not exist
    "shard_down",  # the owning shard cannot be reached or did not answer in time
    "shard_refused",  # the owning shard refused it (its store cannot be written, ...)
    "access",  # a put without write access (access security), refused by PCAS itself
)


class RateMeter:
    """Events per second over the last 1 s and 10 s, from a counter sampled each second."""

    def __init__(self, span: int = 10) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=span + 1)

    def sample(self, now: float, count: int) -> tuple[float, float]:
        if self.samples and count < self.samples[-1][1]:
            self.samples.clear()  # the counter began again (a new process): no rate across
        self.samples.append((now, count))
        return self._rate(2), self._rate(len(self.samples))

    def _rate(self, n: int) -> float:
        if len(self.samples) < 2 or n < 2:
            return 0.0
        t0, c0 = self.samples[-n]
        t1, c1 = self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


# -- shard states ---------------------------------------------------------------------

#: The states of ``relay:shard<K>:STATE``, in enum order, with the severity of each.
SHARD_STATES = ("OK", "CONNECTING", "NOT_ANSWERING", "STORE_FAILED", "FAILING")
SHARD_SEVERITY = {
    "OK": fields.NO_SEVERITY,
    "CONNECTING": fields.MINOR,
    "NOT_ANSWERING": fields.MAJOR,
    "STORE_FAILED": fields.MAJOR,
    "FAILING": fields.INVALID,
}


@dataclass
class ShardView:
    """What the broker knows of one shard, for its STATE."""

    live: bool
    ever_synced: bool
    store_error: str
    restarts: collections.deque  # monotonic times a new process of it was seen
    #: The supervisor says it keeps dying (before it ever answers, the only word of it).
    failing: bool = False


def shard_state(view: ShardView, now: float, young: bool) -> str:
    """OK, CONNECTING (not in sync yet, the relay just started), NOT_ANSWERING (was in
    sync, or had time to be, and is not), STORE_FAILED (in sync, its store cannot be
    written), FAILING (not in sync, and it restarted SHARD_FAILING_RESTARTS times within
    SHARD_FAILING_WINDOW: it keeps dying)."""
    recent = sum(1 for t in view.restarts if now - t <= SHARD_FAILING_WINDOW)
    if view.live:
        return "STORE_FAILED" if view.store_error else "OK"
    if recent >= SHARD_FAILING_RESTARTS or view.failing:
        return "FAILING"
    if not view.ever_synced and young:
        return "CONNECTING"
    return "NOT_ANSWERING"


# -- processes --------------------------------------------------------------------------


def _is_carelay(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"carelay" in f.read()
    except OSError:
        return False


class CpuMeter:
    """CPU load (percent of the machine, as iocStats says it) and memory of a set of
    processes, from /proc, between two samples.  Each process's stat file stays open and
    is read again from its start: one read a process, no open, each second."""

    def __init__(self) -> None:
        self._last: dict[int, float] = {}
        self._when = 0.0
        self.ncpu = os.cpu_count() or 1
        self._files: dict[int, int] = {}  # pid: descriptor of its /proc/PID/stat

    def _usage(self, pid: int) -> tuple[float, int] | None:
        fd = self._files.get(pid)
        try:
            if fd is None:
                fd = self._files[pid] = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            stat = parse_stat(os.pread(fd, 1024, 0))
            return None if stat is None else (stat.cpu_seconds, stat.rss)
        except OSError:  # gone (a file of a process that ended reads ESRCH)
            self._close(pid)
            return None

    def _close(self, pid: int) -> None:
        fd = self._files.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def sample(self, pids: Iterable[int], now: float) -> tuple[float, int]:
        """(CPU load in percent since the last sample, resident bytes now)."""
        used, rss, seen = 0.0, 0, {}
        for pid in set(pids):
            usage = self._usage(pid)
            if usage is None:
                continue
            seen[pid] = usage[0]
            used += usage[0] - self._last.get(pid, usage[0])
            rss += usage[1]
        for pid in self._files.keys() - seen.keys():
            self._close(pid)  # a process no longer watched (a shard restarted)
        dt = now - self._when
        load = 100.0 * used / (dt * self.ncpu) if self._when and dt > 0 else 0.0
        self._last, self._when = seen, now
        return max(0.0, load), rss


def descriptors(ca_ports: Iterable[int]) -> tuple[int, int]:
    """(open descriptors, connected TCP sockets on one of ``ca_ports``) of this process,
    for a broker whose circuits are not watched (see CircuitMonitor, which counts both
    at each scan).  Each socket is asked for its own addresses: /proc/net/tcp would cost
    milliseconds a read, as the kernel walks every socket of the host to write it."""
    ports = frozenset(ca_ports)
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0, 0
    if not ports:
        return len(fds), 0
    return len(fds), sum(1 for fd in fds if is_ca_circuit(int(fd), ports))


def fd_limit() -> int:
    """Descriptors this process can use for CA: its soft limit, but at most FD_SETSIZE
    (PCAS ignores descriptors beyond it)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FD_SETSIZE if soft == resource.RLIM_INFINITY else min(soft, FD_SETSIZE)


def uptime_text(seconds: float) -> str:
    """``UPTIME`` as iocStats writes it: ``D days, HH:MM:SS``."""
    s = int(max(0.0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours:02d}:{minutes:02d}:{s:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {text}" if days else text


#: Seconds after the last PONG that a shard's put rate is still taken from its counts.
_COUNTS_FRESH = 2.0


class ShardFigures:
    """What one shard says of itself in its Pongs (see RequestHandler.pong)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.puts = 0
        self.store_bytes: float | None = None
        self.saved_at: float | None = None
        self.flush = Histogram(FLUSH_BUCKETS)
        #: (monotonic time it came, puts) of the recent PONGs.
        self._counts: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)

    def update(self, pong, now: float | None = None) -> None:
        """Take a Pong's figures (``now``: when it came); a flush histogram that does not
        fit is left as it was.  A new process of the shard counts its puts from 0: its
        rate starts afresh."""
        if pong.pid != self.pid or (self._counts and pong.puts < self._counts[-1][1]):
            self._counts.clear()
        self._counts.append((time.monotonic() if now is None else now, pong.puts))
        self.pid = pong.pid
        self.puts = pong.puts
        if pong.store_bytes is not None:
            self.store_bytes = float(pong.store_bytes)
        self.saved_at = pong.saved_at
        hist = Histogram.from_dict(pong.flush) if pong.flush else None
        if hist is not None:
            self.flush = hist

    def put_rate(self, now: float) -> float:
        """Puts a second over about the last second, from the counts the PONGs brought at
        the times they came.  Not from the count at each sample's time: PONGs come every
        0.4-0.5 s, so a second's samples spanned two or three of them, and the rate read
        0.76x or 1.14x what it was.  0 once the PONGs have stopped."""
        counts = self._counts
        if len(counts) < 2 or now - counts[-1][0] > _COUNTS_FRESH:
            return 0.0
        t1, c1 = counts[-1]
        t0, c0 = counts[0]
        for t, c in reversed(counts):
            if t1 - t >= 1.0:
                t0, c0 = t, c
                break
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


class Health(KeepsRefusals):
    """Counters the broker moves as things happen, and the figures ``sample`` takes from
    it once every HEALTH_INTERVAL into ``snapshot`` (a new dict each time)."""

    def __init__(self, shards: int, version: str) -> None:
        self.version = version
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.heartbeat = 0
        self.puts = 0
        self.creations = 0
        self.deletions = 0
        #: Monitor events merged into a later one of their PV (see TurnPosts).
        self.events_merged = 0
        self.refusals = dict.fromkeys(REFUSAL_KINDS, 0)
        #: What of them is logged and kept (refused names and access denials aside).
        self.put_refusals = RefusedPuts(log)
        self.put_callback = Histogram(PUT_BUCKETS)
        self.errors = ErrorLog()
        self.shards = [ShardFigures() for _ in range(shards)]
        self.restarts = [collections.deque(maxlen=SHARD_FAILING_RESTARTS) for _ in range(shards)]
        #: New processes of each shard seen since this broker started.
        self.restart_counts = [0] * shards
        self._put_rate, self._create_rate, self._refuse_rate = RateMeter(), RateMeter(), RateMeter()
        self._cpu = CpuMeter()
        #: The supervisor (``carelay up``) if this broker has one.
        self._parent = [os.getppid()] if _is_carelay(os.getppid()) else []
        self.peers = None  # the relay's CA brokers (PeerBrokers), set by ``carelay broker``
        #: The PVA front-end process whose refusals were taken (``_pva``: its pid and
        #: start), the newest of its ERRORS lines taken, and its counts then.
        self._pva_process: tuple | None = None
        self._pva_seen = 0
        self._pva_counts: dict[str, int] = {}
        self.snapshot: dict = {}

    def shard_restarted(self, k: int) -> None:
        """A new process of shard ``k`` is in sync."""
        self.restarts[k].append(time.monotonic())
        self.restart_counts[k] += 1

    def count_refusal(self, kind: str, n: int = 1) -> None:
        """A refusal counted only: one over its log budget."""
        self.refusals[kind if kind in self.refusals else "shard_refused"] += n

    def _pva(self, pva: dict | None) -> dict | None:
        """The PVA front-end's state for the snapshot; its refusals and failures since the
        last sample (its status file) join this broker's: ERRORS and the counts show
        every front door's (a new PVA process starts its counts again)."""
        if pva is None:
            return None
        process = (pva.get("pid"), pva.get("started"))
        counts = pva.get("refusals")
        counts = counts if isinstance(counts, dict) else {}
        if pva.get("up") and process[0] is not None:
            if process != self._pva_process:
                first = self._pva_process is None
                self._pva_process, self._pva_seen, self._pva_counts = process, 0, {}
                if first:
                    # What it counted before this broker looked (a broker restarted, say)
                    # is no refusal of the last second: its counts are where this starts.
                    self._pva_counts = {k: n for k, n in counts.items() if type(n) is int}
            for entry in pva.get("errors") or ():
                if not (isinstance(entry, list) and len(entry) == 3):
                    continue
                seq, line, own = entry
                if type(seq) is int and seq > self._pva_seen and isinstance(line, str):
                    self.errors.add(fit_line(line), own=own is True)
                    self._pva_seen = seq
            for kind, n in counts.items():
                if type(n) is int and n > self._pva_counts.get(kind, 0):
                    self.count_refusal(kind, n - self._pva_counts.get(kind, 0))
                    self._pva_counts[kind] = n
        return {"known": pva.get("known"), "up": pva.get("up")}

    def sample(self, broker, now: float) -> dict:
        """Take every figure from ``broker`` (its PV table, links, processes)."""
        self.heartbeat += 1
        wall = time.time()
        refusals = sum(self.refusals.values())
        put_rate = self._put_rate.sample(now, self.puts)
        create_rate = self._create_rate.sample(now, self.creations)
        refuse_rate = self._refuse_rate.sample(now, refusals)
        # The processes of this host only: a pid from a shard on another host names
        # some other process here.
        pids = [os.getpid(), *self._parent, *(self.peers.pids if self.peers else ())]
        for link, figs in zip(broker.links, self.shards, strict=True):
            if figs.pid and (link.local or is_loopback_endpoint(link.endpoint)):
                pids.append(figs.pid)
        cpu, mem = self._cpu.sample(pids, now)
        watched = broker.circuits
        if watched is not None:  # it walked the descriptors at its last scan, within 1 s
            nfds, circuits = watched.descriptors, watched.circuits
        else:
            nfds, circuits = descriptors(broker.ca_ports)
        young = now - self.started_mono < broker.startup_grace
        shards = []
        clocks = broker.requests.clocks
        # Only a shard not in sync can be failing: no file read while all are.
        down = not all(link.live for link in broker.links)
        failing = self.peers.failing_shards() if self.peers and down else set()
        for k, link in enumerate(broker.links):
            figs = self.shards[k]
            error = broker.store_errors[k]
            view = ShardView(link.live, link.ever_synced, error, self.restarts[k], k in failing)
            state = shard_state(view, now, young)
            saved = figs.saved_at
            shards.append(
                {
                    "index": k,
                    "state": state,
                    "pvs": link.pvs,
                    "store_bytes": figs.store_bytes or 0.0,
                    "flush_age": max(0.0, wall - clocks[k].from_shard(saved)) if saved else 0.0,
                    # Known once the shard has said its count (its first PONG): before, a
                    # restarted broker's 0 would make its lifetime's puts a rate.
                    "put_rate": figs.put_rate(now),
                    "puts": figs.puts,
                    "flush": figs.flush,
                    "clock_offset": clocks[k].offset,
                    "restarts": self.restart_counts[k],
                }
            )
        limit = broker.byte_limit
        brokers = self.peers.sample(broker.ready, circuits, put_rate[0]) if self.peers else []
        # max_bytes counts the large CA buffers PCAS holds too (see broker/cabuffers.py), in
        # every CA broker of the relay.
        pinned = watched.buffers.pinned_bytes if watched is not None else 0
        used = broker.n_bytes + pinned + (self.peers.others_buffer_bytes if self.peers else 0)
        self.snapshot = snap = {
            "heartbeat": self.heartbeat,
            # On the monotonic clock: a step of the wall clock moves no uptime.
            "uptime": max(0.0, now - self.started_mono),
            "started": self.started,
            "version": self.version,
            "pvs": broker.n_real,
            "provisional": len(broker.pvs) - broker.n_real,
            "circuits": circuits,
            "channels": broker.attached_count(),
            "put_rate": put_rate,
            "create_rate": create_rate,
            "refuse_rate": refuse_rate,
            "mem_used": float(mem),
            "max_bytes_used": 100.0 * used / limit if limit else 0.0,
            "bytes_used": float(used),
            "cpu_load": cpu,
            "fd_free": fd_limit() - nfds,
            "puts": self.puts,
            "creations": self.creations,
            "deletions": self.deletions,
            "events_merged": self.events_merged,
            "refusals": dict(self.refusals),
            "put_callback": self.put_callback,
            "shards": shards,
            "ca_buffer_bytes": pinned,
            "brokers": brokers,
            "pva": self._pva(self.peers.pva() if self.peers else None),
        }
        # The histograms are copied: the loop goes on moving its own.
        snap["put_callback"] = Histogram.from_dict(self.put_callback.as_dict())
        for s in shards:
            s["flush"] = Histogram.from_dict(s["flush"].as_dict())
        return snap
