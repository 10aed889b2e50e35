"""What the operator sees of a region (pods, Kubernetes Nodes, probe results) and what it makes of it.

The handlers and the prober gather raw objects; the functions here turn them
into one :class:`NodeView` per desired relay: its DERP node name, the
addresses and hostname clients should use, and whether it is healthy.  The
DERP map and the status are both built from these views, so they never
disagree about a node.

A pod's readiness is its kubelet's word.  When the pod's Kubernetes Node is
NotReady nobody is giving that word any more: the node lifecycle controller
has marked the pod not ready because the kubelet went silent, while the relay
itself may well still serve its clients (a dead kubelet leaves containers
running; a network split may hide the node from the API server only).  So on
a NotReady node the operator's own probes decide: the relay stays published
while it passes them and leaves when it fails them, and the region is
Degraded meanwhile, naming the node.  The same holds for a pod whose Ready
condition is False while its ContainersReady is True (and it has no
readiness gates): a kubelet never writes that, the node lifecycle controller
does when it marks a NotReady node's pods, and the mark outlives the node's
return until the kubelet posts again (after an API server outage longer
than the node grace period, every pod can carry it for a moment).  A
terminating pod is out either way.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .model import DerpRegionSpec, node_name, render_hostname
from .naming import CONTAINER_NAME

ADDRESS_PREFERENCE = ("ExternalIP", "InternalIP")
"""Node address types clients may reach, best first: an ExternalIP is the one meant for the outside."""


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One entry of a Kubernetes Node's ``status.addresses``."""

    type: str
    address: str


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The prober's last verdict on one relay."""

    ok: bool
    at: datetime.datetime
    rtt_ms: float | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class ObservedNode:
    """One ordinal of a region as last seen; the defaults describe an ordinal with no pod."""

    ordinal: int
    pod_name: str = ""
    pod_ready: bool = False
    pod_failing: bool = False
    """The pod is stuck (unschedulable, crash loop, image or config error), not just starting."""
    pod_message: str = ""
    pod_terminating: bool = False
    node_name: str = ""
    addresses: tuple[NodeAddress, ...] = ()
    probe: ProbeResult | None = None
    node_not_ready: str = ""
    """Why the pod's Kubernetes Node is not Ready ("" when it is, or unknown): its pod's readiness is stale."""
    readiness_overruled: bool = False
    """Ready False while ContainersReady is True: not the kubelet's word but the node lifecycle controller's."""

    @property
    def judged_by_probes(self) -> bool:
        """A pod whose readiness is stale (see the module docstring): only the probes tell whether it serves."""
        stale = self.node_not_ready or self.readiness_overruled
        return bool(stale and self.pod_name and not self.pod_terminating)

    @property
    def probe_wanted(self) -> bool:
        """Whether the prober should try it: a ready pod, or one only the probes can judge."""
        return self.pod_ready or self.judged_by_probes


@dataclass(frozen=True, slots=True)
class ObservedRegion:
    """A DerpRegion with what was observed of it; the input of the DERP map and of the status."""

    name: str
    namespace: str
    created: datetime.datetime
    spec: DerpRegionSpec
    cert_pin: str = ""
    """The CertName pin of the region's self-signed certificate (selfSigned mode only)."""
    nodes: tuple[ObservedNode, ...] = ()

    @property
    def region_id(self) -> int:
        return self.spec.region_id

    def node(self, ordinal: int) -> ObservedNode:
        for node in self.nodes:
            if node.ordinal == ordinal:
                return node
        return ObservedNode(ordinal)


def choose_addresses(addresses: Iterable[NodeAddress]) -> tuple[str, str]:
    """The (IPv4, IPv6) to publish for a Kubernetes Node: ExternalIP else InternalIP, per family.

    Families are chosen separately, so a node with an external IPv4 and only
    an internal IPv6 publishes both.  Link-local and unparsable addresses are
    skipped: no client can use them.  Either result may be empty.
    """
    best: dict[int, tuple[int, str]] = {}
    for entry in addresses:
        if entry.type not in ADDRESS_PREFERENCE:
            continue
        try:
            ip = ipaddress.ip_address(entry.address)
        except ValueError:
            continue
        if ip.is_link_local:
            continue
        rank = ADDRESS_PREFERENCE.index(entry.type)
        if ip.version not in best or rank < best[ip.version][0]:
            best[ip.version] = (rank, ip.compressed)
    return best.get(4, (0, ""))[1], best.get(6, (0, ""))[1]


def node_addresses(node: Mapping[str, Any] | None) -> tuple[NodeAddress, ...]:
    """``status.addresses`` of a Kubernetes Node object."""
    entries = ((node or {}).get("status") or {}).get("addresses") or []
    return tuple(NodeAddress(str(e.get("type", "")), str(e.get("address", ""))) for e in entries)


def _condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


FAILING_WAIT_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
"""Container states that will not fix themselves (as opposed to e.g. ContainerCreating)."""


def _container_problem(pod: Mapping[str, Any]) -> tuple[bool, str]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != CONTAINER_NAME:
            continue
        state = status.get("state") or {}
        if waiting := state.get("waiting"):
            reason = str(waiting.get("reason", "Waiting"))
            return reason in FAILING_WAIT_REASONS, f"{reason}: {waiting.get('message', '')}".rstrip(": ")
        if terminated := state.get("terminated"):
            return True, f"exited with code {terminated.get('exitCode')} ({terminated.get('reason', '')})"
    return False, ""


def pod_readiness(pod: Mapping[str, Any]) -> tuple[bool, bool, str]:
    """(ready, failing, why): a pod is failing when it is stuck in a state that needs a human."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False, False, "terminating"
    ready = _condition(pod, "Ready")
    if ready.get("status") == "True":
        return True, False, ""
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        return False, True, f"not scheduled: {scheduled.get('message') or scheduled.get('reason', '')}"
    failing, problem = _container_problem(pod)
    return False, failing, problem or str(ready.get("message") or "not ready yet")


def readiness_overruled(pod: Mapping[str, Any]) -> bool:
    """Ready False but ContainersReady True, without readiness gates: a mark by the node lifecycle controller."""
    if (pod.get("spec") or {}).get("readinessGates"):
        return False
    return (
        _condition(pod, "Ready").get("status") == "False"
        and _condition(pod, "ContainersReady").get("status") == "True"
    )


def node_not_ready(node: Mapping[str, Any] | None) -> str:
    """Why a Kubernetes Node is not Ready, as its Ready condition says; "" when it is Ready or unknown."""
    for condition in ((node or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return ""
            detail = condition.get("message") or condition.get("reason") or ""
            return f"Kubernetes node {(node or {}).get('metadata', {}).get('name', '?')} is NotReady" + (
                f" ({detail})" if detail else ""
            )
    return ""


def observe_node(
    ordinal: int,
    pod: Mapping[str, Any] | None,
    node: Mapping[str, Any] | None,
    probe: ProbeResult | None = None,
) -> ObservedNode:
    """Combine the raw Pod and Kubernetes Node of one ordinal (either may be missing)."""
    if pod is None:
        return ObservedNode(ordinal, probe=probe)
    ready, failing, message = pod_readiness(pod)
    return ObservedNode(
        ordinal,
        pod_name=str((pod.get("metadata") or {}).get("name", "")),
        pod_ready=ready,
        pod_failing=failing,
        pod_message=message,
        pod_terminating=bool((pod.get("metadata") or {}).get("deletionTimestamp")),
        node_name=str((pod.get("spec") or {}).get("nodeName") or ""),
        addresses=node_addresses(node),
        probe=probe,
        node_not_ready=node_not_ready(node),
        readiness_overruled=not ready and readiness_overruled(pod),
    )


class NodeHealth(StrEnum):
    HEALTHY = "Healthy"
    NO_POD = "NoPod"
    POD_NOT_READY = "PodNotReady"
    POD_FAILING = "PodFailing"
    PROBE_FAILED = "ProbeFailed"
    NO_ADDRESS = "NoAddress"


@dataclass(frozen=True, slots=True)
class NodeView:
    """One desired relay as clients would see it, and whether it deserves to be seen."""

    observed: ObservedNode
    name: str
    host_name: str
    ipv4: str
    ipv6: str
    health: NodeHealth
    message: str

    @property
    def healthy(self) -> bool:
        return self.health is NodeHealth.HEALTHY


def _health(node: ObservedNode) -> tuple[NodeHealth, str]:
    if not node.pod_name:
        return NodeHealth.NO_POD, "no pod yet"
    if node.judged_by_probes:
        if node.probe is None:
            return NodeHealth.POD_NOT_READY, f"{node.node_not_ready}; waiting for a probe"
        if not node.probe.ok:
            return (
                NodeHealth.PROBE_FAILED,
                f"{node.node_not_ready}; probe failed: {node.probe.message or 'no detail'}",
            )
        return NodeHealth.HEALTHY, f"{node.node_not_ready}; published while it passes probes"
    if not node.pod_ready:
        kind = NodeHealth.POD_FAILING if node.pod_failing else NodeHealth.POD_NOT_READY
        return kind, f"pod {node.pod_name} {node.pod_message or 'not ready'}"
    if node.probe is not None and not node.probe.ok:
        return NodeHealth.PROBE_FAILED, f"probe failed: {node.probe.message or 'no detail'}"
    return NodeHealth.HEALTHY, ""


def view_node(spec: DerpRegionSpec, node: ObservedNode) -> NodeView:
    """Name, addresses and health of one ordinal.

    HostName is the templated name when there is a template (clients resolve
    it), else the chosen IPv4, else the IPv6: the DERP map needs a HostName.
    A ready pod that has not been probed yet counts as healthy, since its
    readiness probe already hit the same endpoint.
    """
    ipv4, ipv6 = choose_addresses(node.addresses)
    if spec.hostname_template:
        host_name = render_hostname(spec.hostname_template, node.ordinal)
    else:
        host_name = ipv4 or ipv6
    health, message = _health(node)
    if health is NodeHealth.HEALTHY and not host_name:
        message = f"Kubernetes node {node.node_name or '?'} has no ExternalIP or InternalIP to publish"
        health = NodeHealth.NO_ADDRESS
    return NodeView(node, node_name(spec.region_id, node.ordinal), host_name, ipv4, ipv6, health, message)


def view_region(region: ObservedRegion) -> list[NodeView]:
    """Views of the desired ordinals only: pods above ``replicas`` are on their way out."""
    return [view_node(region.spec, region.node(i)) for i in range(region.spec.replicas)]
