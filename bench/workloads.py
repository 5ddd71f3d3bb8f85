"""The workloads W1-W4 and W6, each run against one server kind on a fresh server.

Every workload starts its own server (its own free port, prefix and data
directory), runs one or more phases of client processes against it, and
stops it in a ``finally``.  Each returns a flat dict of figures.  W5 is in
bench.creation, W9 in bench.doors, W10 in bench.burstload.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.phase import run_phase
from bench.servers import CarelayServer, ControlServer, Server, SoftiocServer


@dataclass(frozen=True)
class Params:
    """Counts of the workloads.  FULL is the default run, QUICK the smoke run."""

    w1_puts: int = 20_000
    w1_every: int = 100
    w1_clients: tuple[int, ...] = (2, 4)
    w2_puts: int = 5_000
    w2_rate: float = 1000.0
    w2_monitors: int = 10
    w3_count: int = 1_000_000
    w3_chunk: int = 1000
    w3_duration: float = 10.0
    w3_max_appends: int = 100_000
    #: The supplementary W3 phase without a monitor.
    w3_solo_duration: float = 5.0
    w4_size: int = 1_000_000
    w4_readers: int = 5
    w4_duration: float = 10.0
    w4_max_puts: int = 10_000
    w5_pvs: int = 20_000
    w5_clients: int = 2
    w5_batch: int = 1000
    #: Seconds of quiet after W5's creations, clients connected, for the idle CPU.
    w5_idle: float = 5.0
    w6_buffers: int = 4
    w6_shards: tuple[int, ...] = (1, 2, 4)
    w6_duration: float = 8.0
    #: W10: channels per shape (1000 channels of one PV, or one each of as many PVs); a
    #: burst is one op per channel.
    w10_channels: int = 1000
    w10_bursts: int = 30
    w10_monitors: tuple[int, ...] = (0, 1, 10)
    carelay_shards: int = 2

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Params()
QUICK = Params(
    w1_puts=500,
    w1_clients=(2,),
    w3_duration=1.0,
    w3_max_appends=50,
    w3_solo_duration=0.5,
    w2_puts=500,
    w4_duration=1.0,
    w4_readers=2,
    w5_pvs=400,
    w5_batch=200,
    w5_idle=0.5,
    w6_shards=(1, 2),
    w6_duration=1.0,
    w10_channels=20,
    w10_bursts=3,
    w10_monitors=(0, 2),
)


@dataclass
class Bench:
    """What every workload needs: the spawn context, the counts, the port book."""

    mp: object
    params: Params
    profiler: object = None
    ports: set[int] = field(default_factory=set)
    #: Data for the plots that is not a table figure (W2 latency samples).
    extra: dict = field(default_factory=dict)
    log: object = print
    #: Every server made, to show afterwards that none of its processes survived.
    started: list = field(default_factory=list)

    # -- servers ---------------------------------------------------------------------

    def server(self, kind: str, shards: int | None = None) -> Server:
        if kind == "carelay":
            srv = CarelayServer(self.ports, shards or self.params.carelay_shards)
        elif kind == "control":
            srv = ControlServer(self.ports)
        elif kind == "softioc":
            srv = SoftiocServer(self.ports)
        else:
            raise ValueError(f"unknown server {kind!r}")
        self.started.append(srv)
        return srv

    def phase(self, server, clients, drivers, tag, **kw):
        r = run_phase(
            self.mp,
            server,
            clients,
            drivers,
            profiler=self.profiler,
            tag=f"{tag}-{server.kind}",
            **kw,
        )
        split = self.extra.setdefault("cpu_seconds_by_process", {}).setdefault(server.kind, {})
        split[tag] = {k: round(v, 3) for k, v in sorted(r.cpu_roles.items())}
        return r

    # -- W1 --------------------------------------------------------------------------

    def w1(self, kind: str) -> dict:
        """Scalar puts: n clients, each ``w1_puts`` puts to its own f1 PV, one with callback
        every ``w1_every``; timed to the last completion and a read of the last value."""
        p = self.params
        srv = self.server(kind)
        # Spread over carelay's shards as many PVs would be (the same names on every server).
        names = {
            n: spread_names(srv.prefix, f"w1n{n}c", "f1", n, [p.carelay_shards])
            for n in p.w1_clients
        }
        srv.records = [(name, "f", 1) for ns in names.values() for name in ns]
        out = {}
        with srv:
            for n in p.w1_clients:
                clients = [
                    (
                        "scalar_writer",
                        {"name": name, "n": p.w1_puts, "every": p.w1_every, "base": 1e6 * (i + 1)},
                    )
                    for i, name in enumerate(names[n])
                ]
                r = self.phase(srv, clients, list(range(n)), f"W1-{n}c")
                puts = n * p.w1_puts
                out[f"puts_per_s_{n}c"] = puts / r.driver_span(range(n))
                out[f"cpu_us_per_put_{n}c"] = r.cpu_s / puts * 1e6
        return out

    # -- W2 --------------------------------------------------------------------------

    def w2(self, kind: str) -> dict:
        """Latency: one writer at w2_rate Hz stamping time.time(); w2_monitors monitors."""
        p = self.params
        srv = self.server(kind)
        name = f"{srv.prefix}w2lat_f1"
        srv.records = [(name, "f", 1)]
        clients = [("latency_writer", {"name": name, "n": p.w2_puts, "rate": p.w2_rate})]
        clients += [("latency_monitor", {"name": name})] * p.w2_monitors
        with srv:
            r = self.phase(srv, clients, [0], "W2")
        lat = np.concatenate([np.asarray(r.results[i]["latency"]) for i in range(1, len(clients))])
        expected = p.w2_puts * p.w2_monitors
        if lat.size == 0:
            raise RuntimeError("no monitor event received")
        self.extra.setdefault("w2_latency_ms", {})[kind] = np.sort(lat * 1e3)
        return {
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "max_ms": float(lat.max() * 1e3),
            "events_received_pct": 100.0 * lat.size / expected,
            "writer_late_puts": float(r.results[0]["late"]),
        }

    # -- W3 / W6 -------------------------------------------------------------------------

    def _buffers(
        self, srv: Server, names: list[str], duration: float, tag: str, monitors: bool = True
    ) -> dict:
        """Append phase on the running ``srv``: a writer per buffer, and a monitor each."""
        p = self.params
        whole = srv.kind == "softioc"  # an IOC waveform is no ring: the client writes it whole
        clients = [
            (
                "buffer_writer",
                {
                    "name": name,
                    "count": p.w3_count,
                    "chunk": p.w3_chunk,
                    "duration": duration,
                    "max_appends": p.w3_max_appends,
                    "whole": whole,
                },
            )
            for name in names
        ]
        if monitors:
            clients += [("buffer_monitor", {"name": name}) for name in names]
        drivers = list(range(len(names)))
        r = self.phase(srv, clients, drivers, tag)
        appends = sum(r.done[i]["appends"] for i in drivers)
        out = {
            "appends_per_s": appends / r.driver_span(drivers),
            "cpu_ms_per_append": r.cpu_s / appends * 1e3,
        }
        if monitors:
            events = sum(r.results[i]["events"] for i in range(len(names), len(clients)))
            out["monitor_events_per_append"] = events / appends
        return out

    def w3(self, kind: str) -> dict:
        """Buffer: an F<count> filled, then appends of w3_chunk with callback, one monitor.
        Then the same on a second buffer without any monitor (supplementary figure)."""
        p = self.params
        srv = self.server(kind)
        name = f"{srv.prefix}w3buf_F{p.w3_count}"
        solo = f"{srv.prefix}w3solo_F{p.w3_count}"
        srv.records = [(name, "F", p.w3_count), (solo, "F", p.w3_count)]
        with srv:
            out = self._buffers(srv, [name], p.w3_duration, "W3")
            bare = self._buffers(srv, [solo], p.w3_solo_duration, "W3-nomon", monitors=False)
        out["appends_per_s_no_monitor"] = bare["appends_per_s"]
        out["cpu_ms_per_append_no_monitor"] = bare["cpu_ms_per_append"]
        return out

    def w6(self, kind: str) -> dict:
        """Scaling: W3 on w6_buffers independent buffers; carelay with each shard count."""
        p = self.params
        out = {}
        for shards in p.w6_shards if kind == "carelay" else (None,):
            srv = self.server(kind, shards)
            names = spread_names(srv.prefix, "w6buf", f"F{p.w3_count}", p.w6_buffers, p.w6_shards)
            srv.records = [(name, "F", p.w3_count) for name in names]
            with srv:
                r = self._buffers(srv, names, p.w6_duration, f"W6-{shards}sh" if shards else "W6")
            suffix = f"_{shards}_shards" if shards else ""
            out[f"appends_per_s{suffix}"] = r["appends_per_s"]
            out[f"cpu_ms_per_append{suffix}"] = r["cpu_ms_per_append"]
            out[f"monitor_events_per_append{suffix}"] = r["monitor_events_per_append"]
        return out

    # -- W4 ---------------------------------------------------------------------------

    def w4(self, kind: str) -> dict:
        """Text: puts of w4_size bytes to a c<size> PV with callback, w4_readers readers."""
        p = self.params
        srv = self.server(kind)
        name = f"{srv.prefix}w4text_c{p.w4_size}"
        srv.records = [(name, "c", p.w4_size)]
        clients = [
            (
                "text_writer",
                {
                    "name": name,
                    "size": p.w4_size,
                    "duration": p.w4_duration,
                    "max_puts": p.w4_max_puts,
                },
            )
        ]
        clients += [("text_reader", {"name": name, "size": p.w4_size})] * p.w4_readers
        with srv:
            r = self.phase(srv, clients, [0], "W4")
        span = r.driver_span([0])
        w = r.done[0]
        reads = [r.results[i] for i in range(1, len(clients))]
        return {
            "put_mb_per_s": w["bytes"] / span / 1e6,
            "read_mb_per_s": sum(x["bytes"] / x["elapsed"] for x in reads) / 1e6,
            "cpu_ms_per_put": r.cpu_s / w["puts"] * 1e3,
        }


def spread_names(prefix: str, stem: str, type_count: str, n: int, shard_counts) -> list[str]:
    """n names ``<prefix><stem>K_<type_count>`` that carelay's rendezvous hashing spreads
    evenly over the shards, for each of ``shard_counts``: the average case of many PVs,
    not the luck of a few random names."""
    from carelay.common.sharding import shard_for

    counts = [s for s in shard_counts if s > 1]
    # Candidates by signature (their shard under each count); n of each is plenty.
    by_sig: dict[tuple[int, ...], list[str]] = {}
    for k in range(2000):
        name = f"{prefix}{stem}{k}_{type_count}"
        sig = tuple(shard_for(name, s) for s in counts)
        if len(by_sig.setdefault(sig, [])) < n:
            by_sig[sig].append(name)
    cands = [(name, sig) for sig, names in by_sig.items() for name in names]

    def fits(chosen) -> bool:
        return all(
            max(collections.Counter(sig[i] for _, sig in chosen).values()) <= -(-n // s)
            for i, s in enumerate(counts)
        )

    def search(chosen, start):
        if len(chosen) == n:
            return chosen
        for j in range(start, len(cands)):
            trial = [*chosen, cands[j]]
            if fits(trial) and (found := search(trial, j + 1)):
                return found
        return None

    found = search([], 0) if counts else [(f"{prefix}{stem}{k}_{type_count}", ()) for k in range(n)]
    if not found:
        raise RuntimeError("cannot spread the names over the shards")
    return [name for name, _ in found]
