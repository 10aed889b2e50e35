"""A DerpRegion's status from what was observed: per-node lines and Ready/Progressing/Degraded.

Conditions follow ``metav1.Condition``.  Their meaning:

* **Ready** — the region serves clients: no blocking problem and at least one
  relay healthy and published in the DERP map.
* **Progressing** — the StatefulSet has not yet rolled the current spec out
  to every relay (the message names who it waits for).
* **Degraded** — something needs a human: a blocking problem (ID conflict,
  missing Secret…), a relay failing probes or stuck (unschedulable, crash
  loop), or, once the rollout is done, any relay not healthy; or a relay's
  Kubernetes node NotReady (``NodeNotReady``), even while that relay still
  passes its probes and stays published (see :mod:`observed`).

Unready pods during a rollout are expected, so they make the region
Progressing, not Degraded; that keeps Degraded from flapping on every update.

Two more conditions say the same for GitOps tools, in kstatus's
"abnormal-true" form that Flux's health checks (cli-utils' kstatus) read from
any custom resource. Without them kstatus falls back to Ready alone: a region
serving from one relay of two while the other fails probes reads as Current,
and a region that needs a human (an ID conflict) as InProgress for ever.

* **Stalled** — Degraded is True: a human is needed (kstatus: Failed).
* **Reconciling** — not Stalled, and still rolling out or not Ready yet
  (kstatus: InProgress).

Neither True means Ready, rolled out and not Degraded (kstatus: Current).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .observed import NodeHealth, NodeView, ObservedRegion, view_region

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
RECONCILING = "Reconciling"
STALLED = "Stalled"
MAX_MESSAGE_NODES = 5
"""Messages list this many troubled relays, then say how many more: conditions stay readable."""

_NEEDS_HUMAN = frozenset({NodeHealth.PROBE_FAILED, NodeHealth.POD_FAILING, NodeHealth.NO_ADDRESS})


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the handlers found that keeps the whole region from being served.

    ``reason`` is a CamelCase condition reason (e.g. ``RegionIDConflict``,
    ``TLSSecretMissing``, ``InvalidSpec``); ``message`` says what to do.
    """

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Rollout:
    complete: bool
    message: str


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def format_time(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as ``metav1.Time`` serialises."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rollout_from_statefulset(sts: Mapping[str, Any] | None, replicas: int) -> Rollout:
    """Whether the region's StatefulSet runs the current spec on every ordinal, all ready."""
    if sts is None:
        return Rollout(False, "the StatefulSet does not exist yet")
    name = (sts.get("metadata") or {}).get("name", "the StatefulSet")
    generation = (sts.get("metadata") or {}).get("generation", 0)
    status = sts.get("status") or {}
    if status.get("observedGeneration", 0) < generation:
        return Rollout(False, f"waiting for the StatefulSet controller to see {name}'s new spec")
    updated = status.get("updatedReplicas", 0)
    if updated < replicas:
        return Rollout(False, f"{updated}/{replicas} relays run the current spec")
    ready = status.get("readyReplicas", 0)
    if ready < replicas:
        return Rollout(False, f"{ready}/{replicas} relays ready")
    if status.get("currentRevision") != status.get("updateRevision"):
        return Rollout(False, f"{name} is finishing its rolling update")
    return Rollout(True, f"all {replicas} relays run the current spec")


def _node_list(views: Sequence[NodeView]) -> str:
    shown = "; ".join(f"{v.name}: {v.message}" for v in views[:MAX_MESSAGE_NODES])
    more = len(views) - MAX_MESSAGE_NODES
    return f"{shown}; and {more} more" if more > 0 else shown


def compute_conditions(
    views: Sequence[NodeView], rollout: Rollout, problems: Sequence[Problem]
) -> list[Condition]:
    """The three conditions, without times; :func:`merge_conditions` adds those."""
    healthy = [v for v in views if v.healthy]
    unhealthy = [v for v in views if not v.healthy]
    counts = f"{len(healthy)}/{len(views)} relays healthy"
    blocking = "; ".join(p.message for p in problems)
    if problems:
        ready = Condition(READY, False, problems[0].reason, blocking)
    elif healthy:
        ready = Condition(READY, True, "RelaysServing", f"{counts} and published in the DERP map")
    else:
        ready = Condition(READY, False, "NoHealthyRelays", f"{counts}: {_node_list(unhealthy)}")

    if rollout.complete:
        progressing = Condition(PROGRESSING, False, "RolloutComplete", rollout.message)
    else:
        waiting = f" (waiting for {_node_list(unhealthy)})" if unhealthy else ""
        progressing = Condition(PROGRESSING, True, "RollingOut", rollout.message + waiting)

    troubled = [v for v in unhealthy if rollout.complete or v.health in _NEEDS_HUMAN]
    on_lost_nodes = [v for v in views if v.observed.node_not_ready]
    if problems:
        degraded = Condition(DEGRADED, True, problems[0].reason, blocking)
    elif troubled:
        degraded = Condition(DEGRADED, True, "RelaysUnhealthy", f"{counts}: {_node_list(troubled)}")
    elif on_lost_nodes:
        degraded = Condition(DEGRADED, True, "NodeNotReady", f"{counts}: {_node_list(on_lost_nodes)}")
    else:
        degraded = Condition(DEGRADED, False, "AsExpected", counts)
    return [ready, progressing, degraded, *kstatus_conditions(ready, progressing, degraded)]


def kstatus_conditions(ready: Condition, progressing: Condition, degraded: Condition) -> list[Condition]:
    """Reconciling and Stalled, derived from the three conditions (see the module docstring).

    Each carries the reason and message of the condition that decided it, so a
    GitOps tool shows the same words as ``kubectl describe``.
    """
    if degraded.status:
        decided, working = degraded, False
    elif progressing.status:
        decided, working = progressing, True
    else:
        decided, working = ready, not ready.status
    reconciling = Condition(RECONCILING, working, decided.reason, decided.message)
    stalled = Condition(STALLED, degraded.status, degraded.reason, degraded.message)
    return [reconciling, stalled]


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[Condition],
    generation: int,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """Condition JSON; ``lastTransitionTime`` only moves when a condition's status changes."""
    before = {c.get("type"): c for c in previous}
    merged = []
    for condition in current:
        status = "True" if condition.status else "False"
        old = before.get(condition.type)
        if old is not None and old.get("status") == status and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
        else:
            since = format_time(now)
        merged.append(
            {
                "type": condition.type,
                "status": status,
                "reason": condition.reason,
                "message": condition.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return merged


def node_status(view: NodeView) -> dict[str, Any]:
    """One ``status.nodes`` entry; fields with nothing to say are left out."""
    node = view.observed
    entry: dict[str, Any] = {"name": view.name, "ready": view.healthy}
    optional: dict[str, Any] = {
        "hostName": view.host_name,
        "ipv4": view.ipv4,
        "ipv6": view.ipv6,
        "podName": node.pod_name,
        "nodeName": node.node_name,
        "message": view.message,
    }
    entry.update((k, v) for k, v in optional.items() if v)
    if node.probe is not None:
        entry["lastProbe"] = format_time(node.probe.at)
        if node.probe.rtt_ms is not None:
            entry["rttMs"] = round(node.probe.rtt_ms, 3)
    return entry


def compute_status(
    region: ObservedRegion,
    *,
    generation: int,
    rollout: Rollout,
    problems: Sequence[Problem],
    previous_status: Mapping[str, Any] | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The whole ``status`` to patch onto the DerpRegion."""
    views = view_region(region)
    previous = (previous_status or {}).get("conditions") or []
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(
            previous, compute_conditions(views, rollout, problems), generation, now
        ),
        "nodes": [node_status(v) for v in views],
        "readyNodes": sum(v.healthy for v in views),
        "desiredNodes": region.spec.replicas,
    }


def condition_of(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """One condition of a status by type, or None."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return None


def condition_events(
    previous: Mapping[str, Any], status: Mapping[str, Any]
) -> list[tuple[Mapping[str, Any], str]]:
    """Events worth a user's attention, as (condition, event type): Ready gained (Normal),
    Ready lost or Degraded entered or changing its reason (Warning).

    A region that is not Ready yet while it starts is Progressing, not news.
    """
    events: list[tuple[Mapping[str, Any], str]] = []
    was_ready, ready = condition_of(previous, READY) or {}, condition_of(status, READY) or {}
    if ready.get("status") == "True" and was_ready.get("status") != "True":
        events.append((ready, "Normal"))
    elif ready.get("status") == "False" and was_ready.get("status") == "True":
        events.append((ready, "Warning"))
    was_degraded, degraded = condition_of(previous, DEGRADED) or {}, condition_of(status, DEGRADED) or {}
    if degraded.get("status") == "True" and (
        was_degraded.get("status") != "True" or was_degraded.get("reason") != degraded.get("reason")
    ):
        events.append((degraded, "Warning"))
    return events


def invalid_spec_status(
    previous_status: Mapping[str, Any], message: str, generation: int, now: datetime.datetime
) -> dict[str, Any]:
    """A spec the operator cannot run: not Ready, not progressing anywhere, Degraded until fixed."""
    ready = Condition(READY, False, "InvalidSpec", message)
    progressing = Condition(PROGRESSING, False, "InvalidSpec", message)
    degraded = Condition(DEGRADED, True, "InvalidSpec", message)
    conditions = [ready, progressing, degraded, *kstatus_conditions(ready, progressing, degraded)]
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous_status.get("conditions") or [], conditions, generation, now),
    }
