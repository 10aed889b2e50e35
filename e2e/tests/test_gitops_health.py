"""GitOps health: what Flux (kstatus) and Argo CD (deploy/argocd-health.lua) read from a DerpRegion.

The statuses come from the operator's own status code, one for each situation
a region can be in; the verdicts come from the tools' own code, run by the Go
program in e2e/gitops (kstatus's Compute, which Flux's health checks call, and
the Lua script in gopher-lua with the libraries Argo CD opens).
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from derpcluster.binaries import cache_dir, go_env
from derpoperator.model import parse_region_spec
from derpoperator.observed import NodeAddress, ObservedNode, ObservedRegion, ProbeResult
from derpoperator.status import Problem, Rollout, compute_status, invalid_spec_status

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
GENERATION = 4
ADDRESS = (NodeAddress("InternalIP", "127.0.0.11"),)
DONE = Rollout(True, "all 2 relays run the current spec")
ROLLING = Rollout(False, "1/2 relays ready")


def serving(ordinal: int) -> ObservedNode:
    return ObservedNode(ordinal, pod_name=f"derp-lab-{ordinal}", pod_ready=True, addresses=ADDRESS)


def starting(ordinal: int) -> ObservedNode:
    return ObservedNode(ordinal, pod_name=f"derp-lab-{ordinal}", pod_message="ContainerCreating")


def failing_probes(ordinal: int) -> ObservedNode:
    probe = ProbeResult(False, NOW, None, "EOF")
    return ObservedNode(
        ordinal, pod_name=f"derp-lab-{ordinal}", pod_ready=True, addresses=ADDRESS, probe=probe
    )


def region(name: str, status: dict[str, Any], generation: int = GENERATION) -> dict[str, Any]:
    return {
        "apiVersion": "derpfleet.io/v1alpha1",
        "kind": "DerpRegion",
        "metadata": {"name": name, "namespace": "default", "generation": generation},
        "spec": {"regionID": 901, "regionCode": "lab"},
        "status": status,
    }


def observed(*nodes: ObservedNode, rollout: Rollout, problems: tuple[Problem, ...] = ()) -> dict[str, Any]:
    spec = parse_region_spec({"regionID": 901, "regionCode": "lab"})
    return compute_status(
        ObservedRegion("lab", "default", NOW, spec, nodes=nodes),
        generation=GENERATION,
        rollout=rollout,
        problems=problems,
        previous_status=None,
        now=NOW,
    )


CONFLICT = Problem("RegionIDConflict", "regionID 901 is already used by DerpRegion default/old")
SITUATIONS: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (the DerpRegion, what kstatus says, what Argo CD says)
    "serving": (region("serving", observed(serving(0), serving(1), rollout=DONE)), "Current", "Healthy"),
    "rolling-out": (
        region("rolling-out", observed(serving(0), starting(1), rollout=ROLLING)),
        "InProgress",
        "Progressing",
    ),
    "first-start": (
        region("first-start", observed(rollout=Rollout(False, "the StatefulSet does not exist yet"))),
        "InProgress",
        "Progressing",
    ),
    "probes-failing": (
        region("probes-failing", observed(serving(0), failing_probes(1), rollout=DONE)),
        "Failed",
        "Degraded",
    ),
    "id-conflict": (
        region("id-conflict", observed(serving(0), serving(1), rollout=DONE, problems=(CONFLICT,))),
        "Failed",
        "Degraded",
    ),
    "invalid-spec": (
        region("invalid-spec", invalid_spec_status({}, "spec.replicas: must be at most 26", GENERATION, NOW)),
        "Failed",
        "Degraded",
    ),
    "spec-not-seen-yet": (
        region(
            "spec-not-seen-yet", observed(serving(0), serving(1), rollout=DONE), generation=GENERATION + 1
        ),
        "InProgress",
        "Progressing",
    ),
}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, dict[str, str]]:
    objects = [obj for obj, _, _ in SITUATIONS.values()]
    done = subprocess.run(
        ["go", "run", ".", "-argo-health", str(ROOT / "deploy" / "argocd-health.lua")],
        cwd=ROOT / "e2e" / "gitops",
        env=go_env(cache_dir()),
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=600,  # a cold module cache downloads and compiles kstatus's dependencies
        check=False,
    )
    assert done.returncode == 0, f"e2e/gitops failed:\n{done.stderr}"
    return {v["name"]: v for v in json.loads(done.stdout)}


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_flux_and_argo_cd_read_the_region_as_intended(name: str, verdicts: dict[str, dict[str, str]]) -> None:
    _, kstatus, argo = SITUATIONS[name]
    verdict = verdicts[name]
    assert (verdict["kstatus"], verdict["argo"]) == (kstatus, argo), verdict


def test_the_tools_show_the_operators_words(verdicts: dict[str, dict[str, str]]) -> None:
    conflict = verdicts["id-conflict"]
    assert conflict["kstatusMessage"] == conflict["argoMessage"] == CONFLICT.message
    assert "1/2 relays ready" in verdicts["rolling-out"]["argoMessage"]
