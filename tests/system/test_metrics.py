"""``/metrics``: parsed with prometheus_client's own parser, against a real relay."""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import free_port
from tests.system.conftest import CA_PORT, Relay, using_shared, wait_for
from tests.system.test_status_truth import shard_pid

pytestmark = pytest.mark.system

METRICS_PORT = free_port({CA_PORT})


@pytest.fixture(scope="module")
def metrics_relay(tmp_path_factory):
    relay = Relay(
        tmp_path_factory.mktemp("metrics"), shards=2, extra=["--metrics-port", str(METRICS_PORT)]
    )
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture
def relay(metrics_relay, request):
    yield from using_shared(metrics_relay, request)


def scrape(port: int = METRICS_PORT) -> dict:
    """{(sample name, sorted labels): value} of one scrape of /metrics on ``port``."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _put_ok(pv, v) -> bool:
    try:
        return pv.write(v, wait=True, timeout=10).status.success
    except Exception:
        return False


def test_every_figure_is_there(relay):
    def both_ok():
        samples = scrape()
        ok = all(
            value(samples, "carelay_shard_state", shard=k, carelay_shard_state="OK") == 1
            for k in ("0", "1")
        )
        return samples if ok else None

    samples = wait_for(both_ok, what="both shards OK in /metrics")
    names = {name for name, _ in samples}
    for name in (
        "carelay_heartbeat",
        "carelay_pvs",
        "carelay_provisional_pvs",
        "carelay_ca_circuits",
        "carelay_memory_bytes",
        "carelay_cpu_load_percent",
        "carelay_fd_free",
        "carelay_max_bytes_used_percent",
        "carelay_put_rate_hertz",
        "carelay_puts_total",
        "carelay_creations_total",
        "carelay_deletions_total",
        "carelay_refusals_total",
        "carelay_put_callback_seconds_bucket",
        "carelay_shard_state",
        "carelay_shard_pvs",
        "carelay_shard_store_bytes",
        "carelay_shard_flush_age_seconds",
        "carelay_shard_flush_seconds_bucket",
        "carelay_shard_put_rate_hertz",
        "carelay_shard_clock_offset_seconds",
    ):
        assert name in names, f"{name} missing from /metrics"
    assert value(samples, "carelay_memory_bytes") > 0


def test_counters_move_with_real_puts(relay, ca):
    before = scrape()
    names = [relay.name("m", "f1") for _ in range(4)]
    pvs = ca.get_pvs(*names, timeout=5)
    for pv in pvs:
        assert _put_ok(pv, 2.5)
    for pv in pvs:
        assert _put_ok(pv, 3.5)
    (bad,) = ca.get_pvs(f"{relay.prefix}bad{os.getpid()}_q1", timeout=2)
    with pytest.raises(TimeoutError):
        bad.wait_for_connection(timeout=1)
    # A DESC of 45 characters as DBR_STRING, which the client cuts to 40 bytes: a field
    # value refused, as one sent as a char array is.
    (desc,) = ca.get_pvs(names[0] + ".DESC", timeout=5)
    assert not _put_ok(desc, "x" * 45)

    def moved():
        now = scrape()

        def grew(name, by, **labels):
            return (value(now, name, **labels) or 0) >= (value(before, name, **labels) or 0) + by

        ok = (
            grew("carelay_puts_total", 8)
            and grew("carelay_creations_total", 4)
            and grew("carelay_put_callback_seconds_count", 8)
            and grew("carelay_refusals_total", 1, reason="name")
            and grew("carelay_refusals_total", 1, reason="field")
            and not grew("carelay_refusals_total", 1, reason="convert")
            and grew("carelay_pvs", 4)
            and sum(value(now, "carelay_shard_puts_total", shard=k) for k in ("0", "1"))
            >= sum(value(before, "carelay_shard_puts_total", shard=k) for k in ("0", "1")) + 8
        )
        return now if ok else None

    now = wait_for(moved, what="the counters to move with 8 puts")
    assert value(now, "carelay_put_rate_hertz", window="10s") > 0


@pytest.mark.slow
def test_a_stopped_shard_shows(relay):
    def state(k: str, name: str) -> bool:
        return value(scrape(), "carelay_shard_state", shard=k, carelay_shard_state=name) == 1

    wait_for(lambda: state("1", "OK"), timeout=30, interval=0.2, what="shard 1 OK")
    pid = shard_pid(relay, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: state("1", "NOT_ANSWERING"), timeout=30, interval=0.2, what="NOT_ANSWERING"
        )
        assert state("0", "OK")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: state("1", "OK"), timeout=30, interval=0.2, what="shard 1 OK again")
