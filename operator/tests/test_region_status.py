"""Status: rollout reading, condition logic and transitions, node lines, the whole status body."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from derpoperator.observed import NodeAddress, ObservedNode, ObservedRegion, ProbeResult, view_node
from derpoperator.status import (
    Condition,
    Problem,
    Rollout,
    compute_conditions,
    compute_status,
    condition_events,
    condition_of,
    format_time,
    invalid_spec_status,
    merge_conditions,
    node_status,
    rollout_from_statefulset,
)
from fleetfixtures import spec_of

T0 = datetime.datetime(2025, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)
DONE = Rollout(True, "all 2 relays run the current spec")
ROLLING = Rollout(False, "1/2 relays ready")
ADDR = (NodeAddress("InternalIP", "10.0.0.5"),)


def healthy(ordinal: int) -> ObservedNode:
    return ObservedNode(ordinal, pod_name=f"derp-fra-{ordinal}", pod_ready=True, addresses=ADDR)


def starting(ordinal: int) -> ObservedNode:
    return ObservedNode(ordinal, pod_name=f"derp-fra-{ordinal}", pod_message="ContainerCreating")


def probe_failing(ordinal: int) -> ObservedNode:
    return ObservedNode(
        ordinal,
        pod_name=f"derp-fra-{ordinal}",
        pod_ready=True,
        addresses=ADDR,
        probe=ProbeResult(False, T0, None, "EOF"),
    )


def conditions(
    *nodes: ObservedNode, rollout: Rollout = DONE, problems: tuple[Problem, ...] = ()
) -> dict[str, tuple[bool, str, str]]:
    views = [view_node(spec_of(), n) for n in nodes]
    return {c.type: (c.status, c.reason, c.message) for c in compute_conditions(views, rollout, problems)}


def sts(generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "derp-fra", "generation": generation}, "status": status}


COMPLETE = {
    "observedGeneration": 2,
    "replicas": 2,
    "updatedReplicas": 2,
    "readyReplicas": 2,
    "currentRevision": "r2",
    "updateRevision": "r2",
}


@pytest.mark.parametrize(
    ("statefulset", "expected"),
    [
        (None, Rollout(False, "the StatefulSet does not exist yet")),
        (
            sts(**{**COMPLETE, "observedGeneration": 1}),
            Rollout(False, "waiting for the StatefulSet controller to see derp-fra's new spec"),
        ),
        (sts(**{**COMPLETE, "updatedReplicas": 1}), Rollout(False, "1/2 relays run the current spec")),
        (sts(**{**COMPLETE, "readyReplicas": 1}), Rollout(False, "1/2 relays ready")),
        (
            sts(**{**COMPLETE, "currentRevision": "r1"}),
            Rollout(False, "derp-fra is finishing its rolling update"),
        ),
        (sts(**COMPLETE), Rollout(True, "all 2 relays run the current spec")),
        (sts(generation=1, observedGeneration=1), Rollout(False, "0/2 relays run the current spec")),
    ],
)
def test_rollout_from_statefulset(statefulset: dict[str, Any] | None, expected: Rollout) -> None:
    assert rollout_from_statefulset(statefulset, 2) == expected


def test_all_healthy() -> None:
    assert conditions(healthy(0), healthy(1)) == {
        "Ready": (True, "RelaysServing", "2/2 relays healthy and published in the DERP map"),
        "Progressing": (False, "RolloutComplete", "all 2 relays run the current spec"),
        "Degraded": (False, "AsExpected", "2/2 relays healthy"),
        "Reconciling": (False, "RelaysServing", "2/2 relays healthy and published in the DERP map"),
        "Stalled": (False, "AsExpected", "2/2 relays healthy"),
    }


def test_starting_relays_are_progress_not_degradation() -> None:
    assert conditions(healthy(0), starting(1), rollout=ROLLING) == {
        "Ready": (True, "RelaysServing", "1/2 relays healthy and published in the DERP map"),
        "Progressing": (
            True,
            "RollingOut",
            "1/2 relays ready (waiting for 900b: pod derp-fra-1 ContainerCreating)",
        ),
        "Degraded": (False, "AsExpected", "1/2 relays healthy"),
        "Reconciling": (
            True,
            "RollingOut",
            "1/2 relays ready (waiting for 900b: pod derp-fra-1 ContainerCreating)",
        ),
        "Stalled": (False, "AsExpected", "1/2 relays healthy"),
    }


def test_nothing_running_yet() -> None:
    got = conditions(
        ObservedNode(0), ObservedNode(1), rollout=Rollout(False, "the StatefulSet does not exist yet")
    )
    assert got["Ready"] == (
        False,
        "NoHealthyRelays",
        "0/2 relays healthy: 900a: no pod yet; 900b: no pod yet",
    )
    assert got["Degraded"][0] is False
    assert got["Reconciling"][:2] == (True, "RollingOut")


def test_failing_probes_degrade_even_mid_rollout() -> None:
    got = conditions(healthy(0), probe_failing(1), rollout=ROLLING)
    assert got["Degraded"] == (True, "RelaysUnhealthy", "1/2 relays healthy: 900b: probe failed: EOF")
    assert got["Ready"][0] is True
    # kstatus reads the first abnormal condition: Stalled must not hide behind Reconciling.
    assert got["Stalled"] == got["Degraded"]
    assert got["Reconciling"] == (False, *got["Degraded"][1:])


def test_stuck_pods_degrade() -> None:
    stuck = ObservedNode(1, pod_name="derp-fra-1", pod_failing=True, pod_message="not scheduled: 0/3 nodes")
    got = conditions(healthy(0), stuck, rollout=ROLLING)
    assert got["Degraded"] == (
        True,
        "RelaysUnhealthy",
        "1/2 relays healthy: 900b: pod derp-fra-1 not scheduled: 0/3 nodes",
    )


def test_after_the_rollout_any_unhealthy_relay_degrades() -> None:
    got = conditions(healthy(0), starting(1))
    assert got["Degraded"] == (
        True,
        "RelaysUnhealthy",
        "1/2 relays healthy: 900b: pod derp-fra-1 ContainerCreating",
    )


def test_blocking_problems_win() -> None:
    conflict = Problem("RegionIDConflict", "regionID 900 is already used by DerpRegion derp/old")
    missing = Problem("TLSSecretMissing", "Secret mine not found")
    got = conditions(healthy(0), healthy(1), problems=(conflict, missing))
    message = "regionID 900 is already used by DerpRegion derp/old; Secret mine not found"
    assert got["Ready"] == (False, "RegionIDConflict", message)
    assert got["Degraded"] == (True, "RegionIDConflict", message)
    assert got["Stalled"] == (True, "RegionIDConflict", message)


def test_long_node_lists_are_cut_short() -> None:
    views = [view_node(spec_of(replicas=8), ObservedNode(i)) for i in range(8)]
    ready = compute_conditions(views, DONE, ())[0]
    assert ready.message.endswith("900e: no pod yet; and 3 more")


def test_transition_time_moves_only_when_status_changes() -> None:
    first = merge_conditions([], [Condition("Ready", False, "NoHealthyRelays", "0/2")], 1, T0)
    assert first == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "NoHealthyRelays",
            "message": "0/2",
            "lastTransitionTime": "2025-01-01T12:00:00Z",
            "observedGeneration": 1,
        }
    ]
    same = merge_conditions(first, [Condition("Ready", False, "NoHealthyRelays", "0/3")], 2, T1)
    assert same[0]["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("0/3", 2)
    flipped = merge_conditions(same, [Condition("Ready", True, "RelaysServing", "1/2")], 2, T1)
    assert flipped[0]["lastTransitionTime"] == "2025-01-01T12:05:00Z"


def test_format_time_is_utc() -> None:
    cet = datetime.timezone(datetime.timedelta(hours=1))
    assert format_time(datetime.datetime(2025, 1, 1, 13, 0, 0, 123456, tzinfo=cet)) == "2025-01-01T12:00:00Z"


def test_node_status_lines() -> None:
    node = ObservedNode(
        0,
        pod_name="derp-fra-0",
        pod_ready=True,
        node_name="node-1",
        addresses=(NodeAddress("ExternalIP", "203.0.113.7"), NodeAddress("InternalIP", "fd00::7")),
        probe=ProbeResult(True, T0, 1.23456),
    )
    assert node_status(view_node(spec_of(), node)) == {
        "name": "900a",
        "ready": True,
        "hostName": "203.0.113.7",
        "ipv4": "203.0.113.7",
        "ipv6": "fd00::7",
        "podName": "derp-fra-0",
        "nodeName": "node-1",
        "lastProbe": "2025-01-01T12:00:00Z",
        "rttMs": 1.235,
    }
    assert node_status(view_node(spec_of(), ObservedNode(1))) == {
        "name": "900b",
        "ready": False,
        "message": "no pod yet",
    }


def test_compute_status() -> None:
    region = ObservedRegion("fra", "derp", T0, spec_of(), nodes=(healthy(0),))
    previous = {
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-12-31T00:00:00Z"}]
    }
    status = compute_status(
        region, generation=3, rollout=ROLLING, problems=(), previous_status=previous, now=T1
    )
    assert (status["observedGeneration"], status["readyNodes"], status["desiredNodes"]) == (3, 1, 2)
    assert [n["name"] for n in status["nodes"]] == ["900a", "900b"]
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"]["lastTransitionTime"] == "2024-12-31T00:00:00Z"
    assert by_type["Progressing"]["lastTransitionTime"] == "2025-01-01T12:05:00Z"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def status_with(**conditions: tuple[str, str]) -> dict[str, Any]:
    """A status holding conditions given as type=(status, reason)."""
    return {
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": f"{t} {r}"} for t, (s, r) in conditions.items()
        ]
    }


def test_events_are_for_gaining_or_losing_ready_and_for_degradation() -> None:
    starting = status_with(Ready=("False", "NoHealthyRelays"), Degraded=("False", "AsExpected"))
    serving = status_with(Ready=("True", "RelaysServing"), Degraded=("False", "AsExpected"))
    broken = status_with(Ready=("False", "NoHealthyRelays"), Degraded=("True", "RelaysUnhealthy"))
    conflict = status_with(Ready=("False", "RegionIDConflict"), Degraded=("True", "RegionIDConflict"))

    def kinds(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str]]:
        return [(c["reason"], kind) for c, kind in condition_events(before, after)]

    assert kinds({}, starting) == []  # starting up is not news
    assert kinds(starting, serving) == [("RelaysServing", "Normal")]
    assert kinds(serving, serving) == []
    assert kinds(serving, broken) == [("NoHealthyRelays", "Warning"), ("RelaysUnhealthy", "Warning")]
    assert kinds(broken, broken) == []
    assert kinds(broken, conflict) == [("RegionIDConflict", "Warning")]


def test_an_invalid_spec_is_degraded_and_neither_ready_nor_progressing() -> None:
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    status = invalid_spec_status({}, "spec.replicas: must be at most 26", 7, now)
    assert status["observedGeneration"] == 7
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Ready", "False", "InvalidSpec"),
        ("Progressing", "False", "InvalidSpec"),
        ("Degraded", "True", "InvalidSpec"),
        ("Reconciling", "False", "InvalidSpec"),
        ("Stalled", "True", "InvalidSpec"),
    ]
    assert {c["message"] for c in status["conditions"]} == {"spec.replicas: must be at most 26"}
    assert condition_of(status, "Degraded") == status["conditions"][2]
    assert condition_of(status, "Nope") is None


def test_a_relay_on_a_not_ready_node_degrades_the_region_while_it_still_serves() -> None:
    lost = ObservedNode(
        1,
        pod_name="derp-fra-1",
        addresses=ADDR,
        node_name="node-b",
        probe=ProbeResult(True, T0, 0.5),
        node_not_ready="Kubernetes node node-b is NotReady (Kubelet stopped posting node status.)",
    )
    found = conditions(healthy(0), lost, rollout=ROLLING)
    assert found["Ready"][:2] == (True, "RelaysServing")
    assert found["Degraded"][:2] == (True, "NodeNotReady")
    assert "900b: Kubernetes node node-b is NotReady" in found["Degraded"][2]
    assert "2/2 relays healthy" in found["Degraded"][2]
