"""From raw Pods and Nodes to node views: address choice, pod readiness, health and host names."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from derpoperator.observed import (
    NodeAddress,
    NodeHealth,
    ObservedNode,
    ObservedRegion,
    ProbeResult,
    choose_addresses,
    node_addresses,
    node_not_ready,
    observe_node,
    pod_readiness,
    view_node,
    view_region,
)
from fleetfixtures import spec_of

NOW = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def addrs(*pairs: tuple[str, str]) -> list[NodeAddress]:
    return [NodeAddress(kind, address) for kind, address in pairs]


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        ([], ("", "")),
        ([("InternalIP", "10.0.0.5")], ("10.0.0.5", "")),
        ([("InternalIP", "10.0.0.5"), ("ExternalIP", "203.0.113.7")], ("203.0.113.7", "")),
        ([("ExternalIP", "203.0.113.7"), ("InternalIP", "10.0.0.5")], ("203.0.113.7", "")),
        ([("InternalIP", "fd00::5"), ("InternalIP", "10.0.0.5")], ("10.0.0.5", "fd00::5")),
        ([("ExternalIP", "2001:db8:0::7"), ("InternalIP", "fd00::5")], ("", "2001:db8::7")),
        ([("ExternalIP", "203.0.113.7"), ("InternalIP", "fd00::5")], ("203.0.113.7", "fd00::5")),
        ([("InternalIP", "10.0.0.5"), ("InternalIP", "10.0.0.6")], ("10.0.0.5", "")),
        ([("Hostname", "node-1"), ("InternalDNS", "node-1.internal")], ("", "")),
        (
            [("ExternalIP", "fe80::1"), ("ExternalIP", "not-an-ip"), ("InternalIP", "10.0.0.5")],
            ("10.0.0.5", ""),
        ),
    ],
)
def test_choose_addresses(addresses: list[tuple[str, str]], expected: tuple[str, str]) -> None:
    assert choose_addresses(addrs(*addresses)) == expected


def test_node_addresses_read_a_node_object() -> None:
    node = {"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}}
    assert node_addresses(node) == (NodeAddress("InternalIP", "10.0.0.5"),)
    assert node_addresses(None) == ()
    assert node_addresses({"status": {}}) == ()


def pod(
    ready: str | None = None,
    scheduled: dict[str, str] | None = None,
    state: dict[str, Any] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    conditions = []
    if ready is not None:
        conditions.append(
            {"type": "Ready", "status": ready, "message": "containers with unready status: [relay]"}
        )
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", **scheduled})
    statuses = [{"name": "relay", "state": state}] if state else []
    return {
        "metadata": {"name": "derp-fra-0", **meta},
        "spec": {"nodeName": "node-1"},
        "status": {"conditions": conditions, "containerStatuses": statuses},
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (pod(ready="True"), (True, False, "")),
        (pod(ready="True", deletionTimestamp="2025-01-01T00:00:00Z"), (False, False, "terminating")),
        (pod(), (False, False, "not ready yet")),
        (pod(ready="False"), (False, False, "containers with unready status: [relay]")),
        (
            pod(
                scheduled={"status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}
            ),
            (False, True, "not scheduled: 0/3 nodes are available"),
        ),
        (
            pod(ready="False", state={"waiting": {"reason": "ContainerCreating"}}),
            (False, False, "ContainerCreating"),
        ),
        (
            pod(ready="False", state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}),
            (False, True, "CrashLoopBackOff: back-off 10s"),
        ),
        (
            pod(
                ready="False",
                state={"waiting": {"reason": "CreateContainerConfigError", "message": "secret x"}},
            ),
            (False, True, "CreateContainerConfigError: secret x"),
        ),
        (
            pod(ready="False", state={"terminated": {"exitCode": 2, "reason": "Error"}}),
            (False, True, "exited with code 2 (Error)"),
        ),
    ],
)
def test_pod_readiness(raw: dict[str, Any], expected: tuple[bool, bool, str]) -> None:
    assert pod_readiness(raw) == expected


def test_observe_node() -> None:
    probe = ProbeResult(ok=True, at=NOW, rtt_ms=1.5)
    node = {"status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.7"}]}}
    assert observe_node(0, pod(ready="True"), node, probe) == ObservedNode(
        0,
        pod_name="derp-fra-0",
        pod_ready=True,
        node_name="node-1",
        addresses=(NodeAddress("ExternalIP", "203.0.113.7"),),
        probe=probe,
    )
    assert observe_node(1, None, None) == ObservedNode(1)


RUNNING = ObservedNode(
    0, pod_name="derp-fra-0", pod_ready=True, addresses=(NodeAddress("InternalIP", "10.0.0.5"),)
)


@pytest.mark.parametrize(
    ("node", "health", "message"),
    [
        (RUNNING, NodeHealth.HEALTHY, ""),
        (ObservedNode(0), NodeHealth.NO_POD, "no pod yet"),
        (
            ObservedNode(0, pod_name="derp-fra-0", pod_message="ContainerCreating"),
            NodeHealth.POD_NOT_READY,
            "pod derp-fra-0 ContainerCreating",
        ),
        (
            ObservedNode(0, pod_name="derp-fra-0", pod_failing=True, pod_message="CrashLoopBackOff"),
            NodeHealth.POD_FAILING,
            "pod derp-fra-0 CrashLoopBackOff",
        ),
        (
            ObservedNode(
                0, pod_name="derp-fra-0", pod_ready=True, probe=ProbeResult(False, NOW, message="timeout")
            ),
            NodeHealth.PROBE_FAILED,
            "probe failed: timeout",
        ),
        (
            ObservedNode(0, pod_name="derp-fra-0", pod_ready=True, node_name="node-1"),
            NodeHealth.NO_ADDRESS,
            "Kubernetes node node-1 has no ExternalIP or InternalIP to publish",
        ),
    ],
)
def test_node_health(node: ObservedNode, health: NodeHealth, message: str) -> None:
    view = view_node(spec_of(), node)
    assert (view.health, view.message, view.healthy) == (health, message, health is NodeHealth.HEALTHY)


def test_host_name_comes_from_the_template_else_an_address() -> None:
    assert view_node(spec_of(), RUNNING).host_name == "10.0.0.5"
    v6_only = ObservedNode(0, pod_name="p", pod_ready=True, addresses=(NodeAddress("InternalIP", "fd00::5"),))
    assert view_node(spec_of(), v6_only).host_name == "fd00::5"
    templated = view_node(spec_of(hostnameTemplate="derp{index}.example.com"), ObservedNode(1))
    assert (templated.name, templated.host_name, templated.health) == (
        "900b",
        "derp2.example.com",
        NodeHealth.NO_POD,
    )


def test_view_region_covers_exactly_the_desired_ordinals() -> None:
    region = ObservedRegion(
        "fra",
        "derp",
        NOW,
        spec_of(replicas=2),
        nodes=(ObservedNode(2, pod_name="derp-fra-2", pod_ready=True), RUNNING),
    )
    views = view_region(region)
    assert [(v.name, v.health) for v in views] == [("900a", NodeHealth.HEALTHY), ("900b", NodeHealth.NO_POD)]


LOST_NODE = {
    "metadata": {"name": "node-1"},
    "status": {
        "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
        "conditions": [
            {
                "type": "Ready",
                "status": "Unknown",
                "reason": "NodeStatusUnknown",
                "message": "Kubelet stopped posting node status.",
            }
        ],
    },
}


def test_a_node_not_ready_is_read_from_its_ready_condition() -> None:
    assert (
        node_not_ready(LOST_NODE)
        == "Kubernetes node node-1 is NotReady (Kubelet stopped posting node status.)"
    )
    ready = {"metadata": {"name": "n"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert node_not_ready(ready) == ""
    assert node_not_ready(None) == ""


def test_on_a_not_ready_node_the_probes_decide_what_the_stale_pod_readiness_cannot() -> None:
    """The node lifecycle controller marked the pod not ready; the relay may still serve."""
    stale = observe_node(0, pod(ready="False"), LOST_NODE)
    assert stale.judged_by_probes and stale.probe_wanted
    assert view_node(spec_of(), stale).health is NodeHealth.POD_NOT_READY
    passing = observe_node(0, pod(ready="False"), LOST_NODE, ProbeResult(True, NOW, 1.0))
    view = view_node(spec_of(), passing)
    assert view.healthy and "published while it passes probes" in view.message
    failing = observe_node(0, pod(ready="False"), LOST_NODE, ProbeResult(False, NOW, message="timed out"))
    view = view_node(spec_of(), failing)
    assert view.health is NodeHealth.PROBE_FAILED and "node-1 is NotReady" in view.message
    # On a Ready node a not-ready pod is not probed, and nothing overrules its readiness.
    ordinary = observe_node(0, pod(ready="False"), None, ProbeResult(True, NOW, 1.0))
    assert not ordinary.probe_wanted and not view_node(spec_of(), ordinary).healthy


def test_a_terminating_pod_on_a_not_ready_node_is_out() -> None:
    raw = pod(ready="False")
    raw["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    going = observe_node(0, raw, LOST_NODE, ProbeResult(True, NOW, 1.0))
    assert not going.probe_wanted and not view_node(spec_of(), going).healthy


def test_a_pod_marked_not_ready_by_the_node_controller_is_judged_by_probes_on_a_ready_node() -> None:
    """After the node is back, the controller's mark stays until the kubelet posts: probes decide meanwhile."""
    marked = pod(ready="False")
    marked["status"]["conditions"].append({"type": "ContainersReady", "status": "True"})
    back = {"metadata": {"name": "node-1"}, "status": {**LOST_NODE["status"], "conditions": []}}
    passing = observe_node(0, marked, back, ProbeResult(True, NOW, 1.0))
    assert passing.readiness_overruled and passing.probe_wanted
    assert view_node(spec_of(), passing).healthy
    # A kubelet's own verdict (both False) is believed; so is a pod with readiness gates.
    kubelet = pod(ready="False")
    kubelet["status"]["conditions"].append({"type": "ContainersReady", "status": "False"})
    assert not observe_node(0, kubelet, None, ProbeResult(True, NOW, 1.0)).probe_wanted
    gated = {**marked, "spec": {**marked["spec"], "readinessGates": [{"conditionType": "x"}]}}
    assert not observe_node(0, gated, None, ProbeResult(True, NOW, 1.0)).probe_wanted
