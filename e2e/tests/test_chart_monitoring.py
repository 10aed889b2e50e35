"""The chart's monitoring objects, rendered by the real helm: off by default, refused without their
CRDs, and every metric their alerts and dashboard query is one the relays or the operator serve."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from derpcluster import binaries
from derpcluster.bundle import CHART
from derpoperator.metrics import OperatorMetrics
from derprelay import certreload, certs
from derprelay import metrics as relay_metrics
from prometheus_client import generate_latest

MONITORING_CRDS = ("PodMonitor", "ServiceMonitor", "PrometheusRule")
ALL_ON = [
    "--set",
    "monitoring.podMonitor.enabled=true,monitoring.serviceMonitor.enabled=true,"
    "monitoring.prometheusRules.enabled=true,monitoring.grafanaDashboard.enabled=true",
    "--set",
    "monitoring.relayDebugAllow={10.244.0.0/16,10.96.0.0/12}",
]
WITH_CRDS = [
    arg for kind in MONITORING_CRDS for arg in ("--api-versions", f"monitoring.coreos.com/v1/{kind}")
]


@pytest.fixture(scope="module")
def helm() -> Path:
    return binaries.ensure().helm


def template(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", "df", str(CHART), "-n", "derpfleet-system", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # failing renders are tested too
    )


def rendered(helm: Path, *args: str) -> dict[str, dict[str, Any]]:
    answer = template(helm, *args)
    assert answer.returncode == 0, answer.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(answer.stdout) if d}


def operator_args(docs: dict[str, dict[str, Any]]) -> list[str]:
    return list(docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])


def served_metric_names() -> set[str]:
    """Names Prometheus sees: the relays' /debug/varz (derper's names) and the operator's /metrics."""
    gauges = relay_metrics.Gauges(0, 0, 0, 0, 0, 0, 0, 0, 0)
    peer = [relay_metrics.MeshPeerState("b", True, 0)]
    families = relay_metrics.relay_families(
        relay_metrics.RelayStats(), gauges, peer, relay_metrics.Identity("0")
    ) + certreload.cert_families(certreload.ServedCertificate(certs.generate_self_signed("derp.test"), b""))
    varz = relay_metrics.RelayMetrics(lambda: families).varz().decode()
    operator = OperatorMetrics()
    text = varz + generate_latest(operator.registry).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def queried_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:derp|derpfleet|stun|process)_[a-z_]+)\b", expr))


def test_monitoring_is_off_by_default(helm: Path) -> None:
    docs = rendered(helm)
    assert not set(docs) & {*MONITORING_CRDS, "ConfigMap"}
    assert not any(arg.startswith("--relay-debug-allow") for arg in operator_args(docs))


@pytest.mark.parametrize("kind", MONITORING_CRDS)
def test_monitoring_objects_need_their_crds(helm: Path, kind: str) -> None:
    others = [
        arg
        for other in MONITORING_CRDS
        if other != kind
        for arg in ("--api-versions", f"monitoring.coreos.com/v1/{other}")
    ]
    answer = template(helm, *ALL_ON, *others)
    assert answer.returncode != 0
    assert f"the cluster has no {kind} CRD (monitoring.coreos.com/v1)" in answer.stderr


def test_monitoring_objects_with_their_crds(helm: Path) -> None:
    docs = rendered(helm, *ALL_ON, *WITH_CRDS, "--set", "monitoring.podMonitor.labels.release=prometheus")
    assert "--relay-debug-allow=10.244.0.0/16,10.96.0.0/12" in operator_args(docs)

    pod_monitor = docs["PodMonitor"]
    assert pod_monitor["metadata"]["labels"]["release"] == "prometheus"
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "derp-relay",
        "app.kubernetes.io/managed-by": "derpfleet",
    }
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("derp", "/debug/varz", "https")

    [service_endpoint] = docs["ServiceMonitor"]["spec"]["endpoints"]
    assert (service_endpoint["port"], service_endpoint["path"]) == ("http", "/metrics")

    served = served_metric_names()
    [group] = docs["PrometheusRule"]["spec"]["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert set(alerts) == {
        "DerpRegionNotReady",
        "DerpRelayUnhealthy",
        "DerpPacketDropsRising",
        "DerpMeshPeerDown",
        "DerpRelayCertificateExpiring",
        "DerpRelayCertificateRefused",
    }
    for name, rule in alerts.items():
        assert queried_names(rule["expr"]) <= served, (name, rule["expr"])
        assert "{{ $labels." in rule["annotations"]["summary"]  # Prometheus' template, not helm's
    assert alerts["DerpPacketDropsRising"]["expr"].endswith("> 10")

    dashboard_map = docs["ConfigMap"]
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["derpfleet.json"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert queried_names(expr) and queried_names(expr) <= served, expr


def test_pod_monitor_follows_the_watched_namespaces(helm: Path) -> None:
    docs = rendered(helm, *ALL_ON, *WITH_CRDS, "--set", "watchNamespaces={derp,edge}")
    assert docs["PodMonitor"]["spec"]["namespaceSelector"] == {"matchNames": ["derp", "edge"]}


def test_schema_refuses_bad_monitoring_values(helm: Path) -> None:
    answer = template(helm, "--set", "monitoring.podMonitor.interval=soon")
    assert answer.returncode != 0 and "interval" in answer.stderr
