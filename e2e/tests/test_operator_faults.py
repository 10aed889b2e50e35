"""Operator faults on a real control plane: the published map stays whole while things break.

One region (920, two relays, later three) under one operator process, then
two, through four faults in file order:

1. etcd and the API server stop and come back on the same ports and data;
2. the leading operator is SIGKILLed right after a spec change adds a relay;
3. a node's kubelet goes silent, so the node lifecycle controller marks the
   node NotReady and its pods not ready;
4. a relay is SIGKILLed, as the kernel's OOM killer does, and restarts.

A :class:`MapWatch` polls every operator's ``/derpmap.json`` and the
ConfigMap all along and records any sample that lacks a relay that was
serving.  Each test prints how long its fault took to converge, and how long
the map was stale, as ``FAULT <name>: ...`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import (
    NAMESPACE,
    OPERATOR_NAMESPACE,
    Kubectl,
    OperatorProcess,
    condition,
    region_doc,
    region_nodes,
    relay_pids,
    wait_until,
)
from derpcluster.controlplane import start_component, stop_component

REGION = "faults"
REGION_ID = 920
DOWN_FOR = 10.0
"""Seconds etcd and the API server stay down: several probe rounds of the operator."""
CONVERGE = 120.0
pytestmark = pytest.mark.timeout(900)


@dataclass
class Sample:
    at: float
    source: str
    nodes: frozenset[str] | None
    """The region's DERP node names in that map; None when the source did not answer."""


@dataclass
class MapWatch:
    """Polls the served and the stored map in a thread; ``required`` is what must be in every answer."""

    kubectl: Kubectl
    operators: list[OperatorProcess]
    required: frozenset[str] = frozenset()
    samples: list[Sample] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def expect(self, required: frozenset[str]) -> None:
        """From now on every answer must hold ``required``; earlier findings belong to an earlier case."""
        self.required = required
        self.violations.clear()

    def _record(self, source: str, nodes: frozenset[str] | None) -> None:
        now = time.monotonic()
        self.samples.append(Sample(now, source, nodes))
        if nodes is not None and not self.required <= nodes:
            self.violations.append(
                f"{time.strftime('%H:%M:%S')} {source} lacked {sorted(self.required - nodes)} "
                f"(had {sorted(nodes)})"
            )

    def _poll(self) -> None:
        last_configmap = 0.0
        while not self._stop.is_set():
            for operator in list(self.operators):
                status, body = operator.http("/derpmap.json")
                if status == 200:
                    self._record(
                        f"operator {operator.identity}", frozenset(region_nodes(json.loads(body), REGION_ID))
                    )
            if time.monotonic() - last_configmap > 0.5:
                last_configmap = time.monotonic()
                stored = self.kubectl(
                    "-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map", "-o", "json", check=False
                )
                nodes = None
                if stored.returncode == 0:
                    nodes = frozenset(
                        region_nodes(json.loads(json.loads(stored.stdout)["data"]["derpmap.json"]), REGION_ID)
                    )
                self._record("ConfigMap", nodes)
            time.sleep(0.2)

    @classmethod
    def running(cls, kubectl: Kubectl, operators: list[OperatorProcess]) -> Iterator[MapWatch]:
        watch = cls(kubectl, operators)
        thread = threading.Thread(target=watch._poll, name="map watch", daemon=True)
        thread.start()
        try:
            yield watch
        finally:
            watch._stop.set()
            thread.join(30)

    def assert_whole(self) -> None:
        assert not self.violations, "the map lost serving relays:\n" + "\n".join(self.violations[:20])

    def longest_gap(self, source: str, since: float) -> float:
        """Longest time without an answer from ``source`` since ``since``."""
        times = [s.at for s in self.samples if s.source == source and s.nodes is not None and s.at >= since]
        times = [since, *times, time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(times))

    def seen_without(self, node: str, since: float) -> float | None:
        """When a served map first lacked ``node`` after ``since``."""
        for sample in self.samples:
            served = sample.source.startswith("operator") and sample.nodes is not None
            if served and sample.at >= since and node not in (sample.nodes or ()):
                return sample.at
        return None


def report(fault: str, **figures: float) -> None:
    print(f"FAULT {fault}: " + ", ".join(f"{k}={v:.1f}s" for k, v in figures.items()), flush=True)


@pytest.fixture(scope="module")
def watch(kubectl: Kubectl, operators: list[OperatorProcess]) -> Iterator[MapWatch]:
    kubectl("apply", "-f", "-", input=region_doc(REGION, regionID=REGION_ID, regionCode="flt"))
    wait_until(
        "region faults Ready with both relays published", lambda: ready_with(kubectl, 2), timeout=CONVERGE
    )
    yield from MapWatch.running(kubectl, operators)


def region(kubectl: Kubectl) -> dict[str, Any]:
    return kubectl.region(REGION)


def ready_with(kubectl: Kubectl, relays: int) -> bool:
    r = region(kubectl)
    return (
        condition(r, "Ready").get("status") == "True"
        and (r.get("status") or {}).get("readyNodes") == relays
        and len(region_nodes(kubectl.derp_map(), REGION_ID)) == relays
    )


def relay_names(count: int) -> frozenset[str]:
    return frozenset(f"{REGION_ID}{chr(ord('a') + i)}" for i in range(count))


def owned(kubectl: Kubectl) -> list[dict[str, Any]]:
    """Every object labelled for the region, of the kinds the operator writes."""
    kinds = "statefulsets,services,configmaps,secrets,poddisruptionbudgets"
    return list(kubectl.json("-n", NAMESPACE, "get", kinds, "-l", f"derpfleet.io/region={REGION}")["items"])


def versions(kubectl: Kubectl) -> dict[str, str]:
    found = {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in owned(kubectl)}
    stored = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map")
    found["ConfigMap/derp-map"] = stored["metadata"]["resourceVersion"]
    return found


def probed_since(kubectl: Kubectl, moment: float) -> bool:
    nodes = (region(kubectl).get("status") or {}).get("nodes") or []
    stamps = [
        time.mktime(time.strptime(n["lastProbe"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        for n in nodes
        if "lastProbe" in n
    ]
    return bool(stamps) and len(stamps) == len(nodes) and min(stamps) > moment


def api_ready(kubectl: Kubectl) -> bool:
    return kubectl("get", "--raw", "/readyz", check=False).returncode == 0


def test_etcd_and_api_server_restart(cluster: Any, kubectl: Kubectl, watch: MapWatch) -> None:
    watch.expect(relay_names(2))
    before = versions(kubectl)
    started = time.monotonic()
    wall_start = time.time()
    stop_component(cluster, "kube-apiserver")
    stop_component(cluster, "etcd")
    time.sleep(DOWN_FOR)
    start_component(cluster, "etcd")
    start_component(cluster, "kube-apiserver")
    wait_until("the API server ready again", lambda: api_ready(kubectl), timeout=CONVERGE)
    api_back = time.monotonic()
    wait_until(
        "a probe round written by the operator after the restart (it reconnects by itself)",
        lambda: probed_since(kubectl, wall_start + DOWN_FOR),
        timeout=CONVERGE,
    )
    wait_until("region faults Ready with both relays", lambda: ready_with(kubectl, 2), timeout=CONVERGE)
    converged = time.monotonic()
    time.sleep(6)
    watch.assert_whole()
    after = versions(kubectl)
    changed = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    assert not changed, f"objects rewritten although nothing changed: {changed}"
    report(
        "api-restart",
        converge_after_api_back=converged - api_back,
        total=converged - started,
        configmap_unreadable=watch.longest_gap("ConfigMap", started),
    )


def test_leader_killed_mid_reconcile(
    cluster: Any, kubectl: Kubectl, operators: list[OperatorProcess], watch: MapWatch
) -> None:
    leader = operators[0]
    standby = OperatorProcess(cluster, leader.kubeconfig, leader.log_path.with_name("b.log"), "b")
    operators.append(standby)
    standby.start()
    assert standby.http("/healthz") == (200, "ok: standby\n")
    watch.expect(relay_names(2))
    kubectl.patch_region({"replicas": 3}, name=REGION)
    started = time.monotonic()

    def statefulset_scaled() -> bool:
        sts = kubectl.json("-n", NAMESPACE, "get", "statefulset", f"derp-{REGION}")
        return bool(sts["spec"]["replicas"] == 3)

    # Mid-reconcile: the StatefulSet is applied, status and map are not yet; or at most 5 s in.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not statefulset_scaled():
        time.sleep(0.1)
    assert leader.process is not None
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait(10)
    killed = time.monotonic()
    wait_until("b to lead", lambda: standby.http("/healthz") == (200, "ok: leading\n"), timeout=60)
    took_over = time.monotonic()
    wait_until("region faults Ready with three relays", lambda: ready_with(kubectl, 3), timeout=CONVERGE)
    converged = time.monotonic()
    watch.assert_whole()
    lease = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "lease", "derpfleet-operator")
    assert lease["spec"]["holderIdentity"] == "b"
    uid = region(kubectl)["metadata"]["uid"]
    orphans = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in owned(kubectl)
        if uid not in {ref["uid"] for ref in o["metadata"].get("ownerReferences") or []}
    ]
    assert not orphans, f"objects of the region not owned by it: {orphans}"
    report("leader-killed", takeover=took_over - killed, converge=converged - started)


def node_of_relay(kubectl: Kubectl, ordinal: int) -> tuple[str, str]:
    pod = kubectl.json("-n", NAMESPACE, "get", "pod", f"derp-{REGION}-{ordinal}")
    return pod["spec"]["nodeName"], pod["status"]["hostIP"]


def node_ready(kubectl: Kubectl, node: str) -> str:
    found = kubectl.json("get", "node", node)
    return next(c["status"] for c in found["status"]["conditions"] if c["type"] == "Ready")


def test_a_node_going_not_ready(cluster: Any, kubectl: Kubectl, watch: MapWatch) -> None:
    watch.expect(relay_names(3))
    victim = f"{REGION_ID}b"
    node, address = node_of_relay(kubectl, 1)
    # Every relay probed healthy, the mesh included, before its node goes: a dead kubelet no
    # longer updates the relay's mounted peer list, so a relay that had not yet meshed with
    # the newest one would rightly fail the probes on its own.
    since = time.time()
    wait_until(
        "a whole probe round with every relay healthy",
        lambda: probed_since(kubectl, since + 1) and ready_with(kubectl, 3),
        timeout=CONVERGE,
    )
    started = time.monotonic()
    cluster.silence_node(node)
    try:
        wait_until(f"node {node} NotReady", lambda: node_ready(kubectl, node) != "True", timeout=CONVERGE)
        not_ready = time.monotonic()
        degraded = wait_until(
            f"the region Degraded naming {node}",
            lambda: (
                (c := condition(region(kubectl), "Degraded")).get("status") == "True"
                and node in c["message"]
                and c
            ),
            timeout=CONVERGE,
        )
        # Its relay still serves: the probes say so, and it stays in the map.
        time.sleep(8)
        assert victim in region_nodes(kubectl.derp_map(), REGION_ID), (
            f"{victim} left the map although its probes pass; Degraded: {degraded}"
        )
        watch.assert_whole()
        # Now the node really dies: its relay stops answering, and only then leaves the map.
        watch.required = relay_names(3) - {victim}
        killed_at = time.monotonic()
        for pid in relay_pids(address):
            os.kill(pid, signal.SIGKILL)
        wait_until(
            f"{victim} out of the map",
            lambda: victim not in region_nodes(kubectl.derp_map(), REGION_ID),
            timeout=CONVERGE,
        )
        dropped = time.monotonic()
        assert condition(region(kubectl), "Ready")["status"] == "True"
    finally:
        cluster.silence_node(node, silent=False)
    revived = time.monotonic()
    wait_until("the relay back and the region whole", lambda: ready_with(kubectl, 3), timeout=CONVERGE)
    back = time.monotonic()
    wait_until(
        "Degraded cleared",
        lambda: condition(region(kubectl), "Degraded").get("status") == "False",
        timeout=CONVERGE,
    )
    watch.assert_whole()
    report(
        "node-not-ready",
        not_ready_after=not_ready - started,
        dead_relay_in_map=dropped - killed_at,
        converge_after_revival=back - revived,
    )


def test_a_relay_oom_killed(kubectl: Kubectl, watch: MapWatch) -> None:
    watch.expect(relay_names(3) - {f"{REGION_ID}a"})
    _, address = node_of_relay(kubectl, 0)
    # A container's OOM kill takes every process in it (the relay and its workers).
    pids = relay_pids(address)
    killed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until("the relay restarted", lambda: set(relay_pids(address)).isdisjoint(pids), timeout=CONVERGE)
    wait_until("the region whole again", lambda: ready_with(kubectl, 3), timeout=CONVERGE)
    back = time.monotonic()
    left = watch.seen_without(f"{REGION_ID}a", killed)
    assert left is not None, "the killed relay never left the served map"
    watch.assert_whole()
    pod = kubectl.json("-n", NAMESPACE, "get", "pod", f"derp-{REGION}-0")
    assert pod["status"]["containerStatuses"][0]["restartCount"] >= 1, pod["status"]
    report("relay-oom-killed", dead_relay_in_map=left - killed, converge=back - killed)


def test_deleting_the_region_leaves_nothing_behind(kubectl: Kubectl, watch: MapWatch) -> None:
    watch.expect(frozenset())
    kubectl("-n", NAMESPACE, "delete", "derpregion", REGION, "--wait=true", "--timeout=60s")
    wait_until("920 out of the map", lambda: str(REGION_ID) not in kubectl.derp_map()["Regions"])
    wait_until("every object of the region collected", lambda: owned(kubectl) == [], timeout=CONVERGE)
    wait_until(
        "the region's pods gone",
        lambda: (
            not kubectl.json("-n", NAMESPACE, "get", "pods", "-l", f"derpfleet.io/region={REGION}")["items"]
        ),
        timeout=CONVERGE,
    )
