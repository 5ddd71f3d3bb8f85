"""The CA brokers of this relay (``[[ca]]``), as their status files say.

Each broker writes its door (index, interfaces, CA circuits, put rate, the large CA
buffers its PCAS holds) into its own status file; once every HEALTH_INTERVAL a broker
reads the others' files in the same data directory to say how many brokers serve
(``relay:BROKER_UP_CNT``), to count their CA buffers against ``max_bytes`` with its own,
and, on broker 0, to carry their figures in /metrics.  The PVA front-end, which holds no
CA buffers, counts every broker's (``ca_buffer_bytes``); its own status file carries its
refusals and failures, which every broker shows with its own (``pva``).  A broker
serves while its status file is fresh (written or touched within STATUS_STALE_AFTER),
its pid is alive and it has said ready: one that is alive but silent does not count.
No pcaspy.
"""

from __future__ import annotations

import time
from pathlib import Path

from carelay.common.config import STATUS_STALE_AFTER as STALE_AFTER
from carelay.common.config import ca_interfaces
from carelay.common.lifecycle import broker_role, pid_alive, read_status, status_path


def _buffer_bytes(own: dict) -> int:
    """The CA buffers a broker's status ``own`` says its PCAS holds (0 if it says none)."""
    door = own.get("door") or {}
    held = door.get("ca_buffer_bytes") if isinstance(door, dict) else None
    return held if type(held) is int and held > 0 else 0


def ca_buffer_bytes(run_dir: Path, count: int, now: float | None = None) -> int:
    """The large CA buffers that the relay's serving CA brokers (``count`` of them) say
    their PCAS holds, for ``max_bytes``: at most HEALTH_INTERVAL old."""
    now = time.time() if now is None else now
    held = 0
    for k in range(count):
        path = status_path(run_dir, broker_role(k))
        own = read_status(path)
        if _serving(path, own, now):
            held += _buffer_bytes(own)
    return held


def _serving(path: Path, own: dict | None, now: float) -> bool:
    """Whether the status ``own`` read from ``path`` is a live, fresh, ready broker's."""
    if not own or own.get("ready") is not True or "exit" in own:
        return False
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return False
    return age <= STALE_AFTER and pid_alive(own.get("pid"))


class PeerBrokers:
    """Broker ``index`` of ``count``, and what the others' status files in ``run_dir`` say.

    ``all_here``: every broker runs on this host with this data directory (under
    ``carelay up``), so one without a serving status file is down.  A broker started
    alone knows only those whose status files it finds: the others may serve from
    another host, and are neither counted nor judged (``known`` False)."""

    def __init__(
        self, run_dir: Path, count: int, index: int, all_here: bool = True, pva: bool = False
    ) -> None:
        self.run_dir = run_dir
        self.count = count
        self.index = index
        self.all_here = all_here
        #: The relay has a PVA front-end (``pva = true``).
        self.pva_configured = pva
        #: The pids of the other brokers found serving at the last sample (for CPU_LOAD
        #: and MEM_USED, which cover every relay process of this host).
        self.pids: list[int] = []
        #: The large CA buffers the other brokers serving at the last sample hold: they
        #: count against max_bytes here too.
        self.others_buffer_bytes = 0

    def door(self, snapshot: dict) -> dict:
        """This broker's part of its own status file, from its last health ``snapshot``."""
        rate = snapshot.get("put_rate", (0.0, 0.0))[0]
        return {
            "index": self.index,
            "interfaces": ca_interfaces(),
            "clients": snapshot.get("circuits"),
            "put_rate": round(rate, 1),
            "ca_buffer_bytes": snapshot.get("ca_buffer_bytes", 0),
        }

    def sample(self, ready: bool, circuits: int, put_rate: float) -> list[dict]:
        """Every broker: ``index``, ``self``, ``known`` (its state can be told from here),
        ``up`` (serving), CA ``circuits`` and ``put_rate`` (None where not told); this one
        from its own figures."""
        now = time.time()
        out, pids = [], []
        buffers = 0
        for k in range(self.count):
            if k == self.index:
                known, up, calls, rate = True, ready, circuits, put_rate
            else:
                own, known, up = self._look(broker_role(k), now, pids)
                door = own.get("door") or {}
                calls, rate = (door.get("clients"), door.get("put_rate")) if up else (None, None)
                buffers += _buffer_bytes(own) if up else 0
            out.append(
                {
                    "index": k,
                    "self": k == self.index,
                    "known": known,
                    "up": up,
                    "circuits": calls,
                    "put_rate": rate,
                }  # fmt: skip
            )
        self.pids = pids
        self.others_buffer_bytes = buffers
        return out

    def failing_shards(self) -> set[int]:
        """The shards that the supervisor of ``carelay up`` says are failing (dying again
        and again), waiting to be started again or started again since: one that dies
        before it ever answers a broker shows nowhere else, and the broker sees a restart
        only once the new process is in sync.  Empty for a broker started alone, which
        has no supervisor here."""
        if not self.all_here:
            return set()
        sup = read_status(self.run_dir / "supervisor.json")
        if not sup or not pid_alive(sup.get("pid")):
            return set()
        out = set()
        for p in sup.get("processes") or ():
            if not isinstance(p, dict) or not (p.get("state") == "failing" or p.get("failing")):
                continue
            role, _, k = str(p.get("name", "")).partition(" ")
            if role == "shard" and k.isdigit():
                out.add(int(k))
        return out

    def pva(self) -> dict | None:
        """The PVA front-end, as its status file says: ``known`` (its state can be told
        from here: ``all_here``, or its file is here) and ``up`` (serving); None without
        one.  After ``sample``: a PVA front-end serving adds its pid to ``pids``."""
        if not self.pva_configured:
            return None
        own, known, up = self._look("pva", time.time(), self.pids)
        out = {"known": known, "up": up}
        if up:
            # Its refusals and failures, for this broker's ERRORS and refusal counts.
            for key in ("pid", "started", "errors", "refusals"):
                out[key] = own.get(key)
        return out

    def _look(self, role: str, now: float, pids: list[int]) -> tuple[dict, bool, bool]:
        """What the status file of ``role`` says ({} without one), whether its state can
        be told from here (``known``) and whether it serves (``up``: its pid goes to
        ``pids``)."""
        path = status_path(self.run_dir, role)
        own = read_status(path)
        up = _serving(path, own, now)
        if up:
            pids.append(own["pid"])
        return own or {}, self.all_here or own is not None, up
