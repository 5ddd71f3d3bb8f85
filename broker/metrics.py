"""``/metrics``: the health figures in the Prometheus text format (prometheus_client).

prometheus_client serves it from a thread of its own; ``HealthCollector`` reads
only ``Health.snapshot``, the dict the broker's loop replaces whole once every
HEALTH_INTERVAL, and never touches pcaspy or the broker's tables.
"""

from __future__ import annotations

import logging
import sys
import threading

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from carelay.broker.health import SHARD_STATES, Health

log = logging.getLogger(__name__)

#: (metric name, snapshot key, help) of the relay-wide gauges.
_GAUGES = (
    ("carelay_heartbeat", "heartbeat", "Counts up once a second while the broker's loop runs"),
    ("carelay_uptime_seconds", "uptime", "Seconds since the broker started"),
    ("carelay_start_time_seconds", "started", "When the broker started (Unix time)"),
    ("carelay_pvs", "pvs", "Real PVs"),
    ("carelay_provisional_pvs", "provisional", "Provisional PVs (attached, no put yet)"),
    ("carelay_ca_circuits", "circuits", "CA circuits (TCP connections) to the broker"),
    ("carelay_ca_channels", "channels", "PVs with CA channels"),
    ("carelay_memory_bytes", "mem_used", "Resident memory of all relay processes"),
    ("carelay_max_bytes_used_percent", "max_bytes_used", "Share of max_bytes in use"),
    ("carelay_cpu_load_percent", "cpu_load", "CPU of all relay processes, percent of the host"),
    ("carelay_fd_free", "fd_free", "File descriptors the broker can still open for CA"),
)
_RATES = (
    ("carelay_put_rate_hertz", "put_rate", "Accepted puts per second"),
    ("carelay_create_rate_hertz", "create_rate", "Creations per second"),
    ("carelay_refuse_rate_hertz", "refuse_rate", "Refusals per second"),
)


class HealthCollector(Collector):
    """Yields the metrics of ``health.snapshot`` at each scrape."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self):
        snap = self.health.snapshot
        if not snap:
            return
        version = {"version": snap["version"]}
        yield InfoMetricFamily("carelay_build", "carelay version", value=version)
        for name, key, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=snap[key])
        for name, key, doc in _RATES:
            g = GaugeMetricFamily(name, doc, labels=["window"])
            one, ten = snap[key]
            g.add_metric(["1s"], one)
            g.add_metric(["10s"], ten)
            yield g
        yield CounterMetricFamily("carelay_puts", "Accepted puts", value=snap["puts"])
        yield CounterMetricFamily("carelay_creations", "PVs created", value=snap["creations"])
        yield CounterMetricFamily("carelay_deletions", "PVs deleted", value=snap["deletions"])
        yield CounterMetricFamily(
            "carelay_events_merged",
            "Monitor events merged into a later event of their PV within one loop turn",
            value=snap["events_merged"],
        )
        refusals = CounterMetricFamily(
            "carelay_refusals", "Refused names and puts, and failed requests", labels=["reason"]
        )
        for reason, n in snap["refusals"].items():
            refusals.add_metric([reason], n)
        yield refusals
        hist = snap["put_callback"]
        yield HistogramMetricFamily(
            "carelay_put_callback_seconds",
            "Time from a put with callback to its completion",
            buckets=hist.cumulative(),
            sum_value=hist.total,
        )
        yield from self._shards(snap["shards"])
        yield from self._brokers(snap.get("brokers") or [])
        pva = snap.get("pva")
        if pva is not None and pva["known"]:
            yield GaugeMetricFamily(
                "carelay_pva_up", "1 while the PVA front-end serves", value=int(pva["up"])
            )

    def _shards(self, shards: list[dict]):
        state = StateSetMetricFamily("carelay_shard_state", "State of each shard", labels=["shard"])
        pvs = GaugeMetricFamily("carelay_shard_pvs", "PVs on each shard", labels=["shard"])
        size = GaugeMetricFamily(
            "carelay_shard_store_bytes", "Store size of each shard", labels=["shard"]
        )
        age = GaugeMetricFamily(
            "carelay_shard_flush_age_seconds",
            "Seconds since each shard last had every value saved",
            labels=["shard"],
        )
        shard = ["shard"]
        rate = GaugeMetricFamily(
            "carelay_shard_put_rate_hertz", "Puts applied by each shard per second", labels=shard
        )
        puts = CounterMetricFamily("carelay_shard_puts", "Puts applied by each shard", labels=shard)
        restarts = CounterMetricFamily(
            "carelay_shard_restarts",
            "New processes of each shard in sync since this broker started",
            labels=shard,
        )
        flush = HistogramMetricFamily(
            "carelay_shard_flush_seconds", "Duration of each shard's value flushes", labels=shard
        )
        clock = GaugeMetricFamily(
            "carelay_shard_clock_offset_seconds",
            "How far each shard's clock is ahead of this broker's",
            labels=shard,
        )
        for s in shards:
            k = [str(s["index"])]
            state.add_metric(k, {name: s["state"] == name for name in SHARD_STATES})
            pvs.add_metric(k, s["pvs"])
            size.add_metric(k, s["store_bytes"])
            age.add_metric(k, s["flush_age"])
            rate.add_metric(k, s["put_rate"])
            puts.add_metric(k, s["puts"])
            restarts.add_metric(k, s["restarts"])
            flush.add_metric(k, s["flush"].cumulative(), s["flush"].total)
            clock.add_metric(k, s["clock_offset"])
        yield from (state, pvs, size, age, rate, puts, restarts, flush, clock)

    def _brokers(self, brokers: list[dict]):
        """The relay's CA brokers, each as its status file says (broker 0 serves /metrics)."""
        if not brokers:
            return
        yield GaugeMetricFamily("carelay_brokers", "CA brokers of the relay", value=len(brokers))
        label = ["broker"]
        up = GaugeMetricFamily("carelay_broker_up", "1 while each CA broker serves", labels=label)
        circuits = GaugeMetricFamily(
            "carelay_broker_ca_circuits", "CA circuits to each broker", labels=label
        )
        rate = GaugeMetricFamily(
            "carelay_broker_put_rate_hertz", "Puts each broker accepted, last 1 s", labels=label
        )
        for b in brokers:
            if not b["known"]:  # on another host: this broker cannot tell
                continue
            k = [str(b["index"])]
            up.add_metric(k, 1.0 if b["up"] else 0.0)
            if b["circuits"] is not None:
                circuits.add_metric(k, b["circuits"])
            if b["put_rate"] is not None:
                rate.add_metric(k, b["put_rate"])
        yield from (up, circuits, rate)


#: Connections served at once; one past them is closed as soon as it is accepted.  A
#: scraper takes one at a time: a client that holds sockets open (each a thread and a
#: descriptor of the broker) must not take the descriptors CA needs, nor stall the loop.
METRICS_CONNECTIONS = 8
#: A connection that sends nothing for this long is closed (s).
METRICS_TIMEOUT = 5.0


def _bounded_server(address: str, port: int, app):
    """A WSGI server of ``app`` (thread per connection, as prometheus_client's) that
    serves METRICS_CONNECTIONS at once, each with METRICS_TIMEOUT."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class Handler(WSGIRequestHandler):
        timeout = METRICS_TIMEOUT  # StreamRequestHandler.setup: the socket's timeout

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base's name
            pass  # a line per scrape is not the broker's log

    class Server(ThreadingWSGIServer):
        slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        # Connections past the bound are closed as fast as they come: a longer queue
        # than socketserver's 5 keeps a burst of them from holding up a scrape.
        request_queue_size = 64

        def process_request(self, request, client_address) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # closed: it takes nothing
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address) -> None:
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)
            # else a client that stalled past the timeout, or went: not the broker's news

    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    Server.address_family = family
    return make_server(sockaddr[0], port, app, Server, handler_class=Handler)


def serve_metrics(health: Health, address: str, port: int):
    """Serve ``/metrics`` on ``address:port`` from a thread; returns the server."""
    from prometheus_client import make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(health))
    server = _bounded_server(address, port, make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("serving Prometheus metrics on http://%s:%d/metrics", address, port)
    return server
