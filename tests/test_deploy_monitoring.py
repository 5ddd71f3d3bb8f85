"""The monitoring files in deploy/: the broker's metrics Service and pod annotations, the
Prometheus operator's ServiceMonitor (a CRD, which the Kubernetes schemas do not
cover: its YAML and the fields that tie it to the Service are checked here), and the
Grafana dashboard, whose queries must name metrics that /metrics serves."""

from __future__ import annotations

import json
import re
import tomllib

import yaml
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from carelay.broker.health import Health
from carelay.broker.metrics import HealthCollector
from tests.test_deploy import DEPLOY, K8S, _configmap_text, _container, _one, _resources
from tests.unit.test_health import _Broker

SERVICE_MONITOR = K8S / "monitoring" / "40-servicemonitor.yaml"
DASHBOARD = DEPLOY / "grafana" / "carelay-dashboard.json"
#: The fields of a ServiceMonitor (monitoring.coreos.com/v1) these files may use.
_SPEC_FIELDS = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}


def _metrics_port() -> int:
    return tomllib.loads(_configmap_text())["metrics_port"]


def _metrics_service() -> dict:
    return _resources()[("Service", "carelay-broker-metrics")]


def test_the_broker_serves_metrics_on_the_configured_port():
    broker = _one("Deployment")
    container = _container(broker)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == _metrics_port()
    assert "--metrics-address" in container["args"]
    notes = broker["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(_metrics_port())


def test_the_broker_is_scraped_once_by_annotation():
    """The pod carries the scrape annotations; the Service must not as well, or a
    Prometheus that discovers pods and services by annotation scrapes it twice."""
    notes = _metrics_service()["metadata"].get("annotations") or {}
    assert not any(key.startswith("prometheus.io/") for key in notes), notes


def test_the_metrics_service_selects_the_broker_only():
    svc = _metrics_service()
    broker_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    shard_labels = _one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= broker_labels.items()
    assert not svc["spec"]["selector"].items() <= shard_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == _metrics_port() and port["targetPort"] == "metrics"


def test_the_service_monitor_scrapes_the_metrics_service():
    (doc,) = [d for d in yaml.safe_load_all(SERVICE_MONITOR.read_text()) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "ServiceMonitor"
    namespace = _one("Namespace")["metadata"]["name"]
    assert doc["metadata"]["namespace"] == namespace
    spec = doc["spec"]
    assert set(spec) <= _SPEC_FIELDS
    svc = _metrics_service()
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [namespace]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= _ENDPOINT_FIELDS
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])


def _served_metrics() -> set[str]:
    """The names of every sample /metrics serves (two shards)."""
    health = Health(2, "0")
    health.sample(_Broker(), 1.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(health))
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] != "#"}


def test_the_dashboard_queries_metrics_that_exist():
    dash = json.loads(DASHBOARD.read_text())
    served = _served_metrics()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    used = {name for e in exprs for name in re.findall(r"\bcarelay_[a-z_]+", e)}
    missing = sorted(used - served)
    assert not missing, f"the dashboard queries metrics /metrics does not serve: {missing}"
    # Rates, states, memory and flush age, as the dashboard promises.
    for name in (
        "carelay_puts_total",
        "carelay_shard_state",
        "carelay_memory_bytes",
        "carelay_shard_flush_age_seconds",
    ):
        assert name in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


#: The Grafana unit each metric suffix is shown in (the Prometheus base units).
_UNITS = {"_bytes": "bytes", "_percent": "percent", "_seconds": "s"}


def test_each_dashboard_query_is_shown_in_the_unit_of_its_metric():
    """A metric's value read as another unit misleads: max_bytes' percentage on a panel
    of bytes read as "85 B", flat at zero beside GiB."""
    dash = json.loads(DASHBOARD.read_text())
    wrong = []
    for panel in dash["panels"]:
        config = panel.get("fieldConfig", {})
        default = config.get("defaults", {}).get("unit")
        by_ref = {
            o["matcher"]["options"]: p["value"]
            for o in config.get("overrides", [])
            if o["matcher"]["id"] == "byFrameRefID"
            for p in o["properties"]
            if p["id"] == "unit"
        }
        for target in panel["targets"]:
            if "rate(" in target["expr"]:
                continue  # per second, whatever the metric counts
            names = re.findall(r"\bcarelay_[a-z_]+", target["expr"])
            units = {u for n in names for s, u in _UNITS.items() if n.endswith(s)}
            if len(units) == 1:
                (unit,) = units
                shown = by_ref.get(target["refId"], default)
                if shown != unit:
                    wrong.append((panel["title"], target["expr"], shown, unit))
    assert not wrong, wrong
