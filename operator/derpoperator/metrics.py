"""The operator's Prometheus metrics: probe verdicts and latencies, region health, reconciles.

One registry per operator (not the global default), so tests can run
several operators in one process and the ``/metrics`` page shows only ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from .observed import NodeView

RegionLabels = tuple[str, str]
"""(namespace, name) of a DerpRegion."""


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "derpfleet_reconciles",
            "Reconciles of DerpRegions by result (ok, problem, error)",
            ["result"],
            registry=self.registry,
        )
        self.probes = Counter(
            "derpfleet_probes",
            "Relay probes by result (ok, failed)",
            ["namespace", "region", "node", "result"],
            registry=self.registry,
        )
        self.probe_rtt = Gauge(
            "derpfleet_probe_rtt_seconds",
            "Round trip of the last successful DERP ping through each relay",
            ["namespace", "region", "node"],
            registry=self.registry,
        )
        self.node_healthy = Gauge(
            "derpfleet_node_healthy",
            "1 when a relay is healthy (and published), else 0",
            ["namespace", "region", "node"],
            registry=self.registry,
        )
        self.region_ready = Gauge(
            "derpfleet_region_ready",
            "1 when a region's Ready condition is True",
            ["namespace", "region"],
            registry=self.registry,
        )
        self.published_regions = Gauge(
            "derpfleet_published_regions", "Regions in the published DERP map", registry=self.registry
        )
        self._nodes: dict[RegionLabels, set[str]] = {}

    def record_views(self, region: RegionLabels, views: Sequence[NodeView], ready: bool) -> None:
        namespace, name = region
        self.region_ready.labels(namespace, name).set(int(ready))
        for view in views:
            self._nodes.setdefault(region, set()).add(view.name)
            self.node_healthy.labels(namespace, name, view.name).set(int(view.healthy))
            probe = view.observed.probe
            if probe is not None and probe.ok and probe.rtt_ms is not None:
                self.probe_rtt.labels(namespace, name, view.name).set(probe.rtt_ms / 1000)

    def record_probe(self, region: RegionLabels, node: str, ok: bool) -> None:
        self._nodes.setdefault(region, set()).add(node)
        self.probes.labels(*region, node, "ok" if ok else "failed").inc()

    def forget(self, region: RegionLabels) -> None:
        """Drop a deleted region's series, so dashboards don't show it forever."""
        with contextlib.suppress(KeyError):
            self.region_ready.remove(*region)
        for node in self._nodes.pop(region, set()):
            for gauge in (self.probe_rtt, self.node_healthy):
                with contextlib.suppress(KeyError):
                    gauge.remove(*region, node)
            for result in ("ok", "failed"):
                with contextlib.suppress(KeyError):
                    self.probes.remove(*region, node, result)
