"""The operator as users run it: the chart's Deployment, its own image, on the real node.

A cluster of its own with the real node and both images, and ``helm
install`` of the chart, pinned to the real node by its ``nodeSelector`` and
``tolerations`` values.  Then, on that kubelet: both replicas Running and
Ready by the kubelet's probes of ``/healthz``, as uid 65532 with a read-only
root and no capabilities, under the chart's ServiceAccount (which reaches
the API server at the ``kubernetes`` Service); the PodDisruptionBudget; a
DerpRegion on the node Ready by probes the operator sends from the pod
network to the node's hostPorts, its map in the ConfigMap and at the
leader's ``/derpmap.json`` (asked from the host at the pod's IP); the
leader evicted, the budget refusing the second eviction, and the standby
taking the Lease and publishing; and ``helm test`` passing.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from conftest import (
    NAMESPACE,
    ON_THE_REAL_NODE,
    OPERATOR_NAMESPACE,
    REAL_NODE_REGION,
    SERVICE_ACCOUNT,
    Kubectl,
    condition,
    wait_for,
    wait_until,
)
from derpcluster import LocalCluster, down, images, realnode, up
from derpcluster.bundle import CHART

pytestmark = pytest.mark.timeout(300)
RELEASE = "derpfleet"
SELECTOR = f"app.kubernetes.io/name=derpfleet-operator,app.kubernetes.io/instance={RELEASE}"
LEASE = "derpfleet-operator"
OPERATOR_PORT = 8080
REGION_ID = 950


def helm(cluster: LocalCluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.helm), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=cluster.env(),
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Kubectl]]:
    """The chart installed by helm, its operator pinned to the real node; torn down at the end."""
    cluster = up(
        tmp_path_factory.mktemp("incluster"),
        nodes={},
        progress=False,
        real_node=True,
        images=(images.RELAY, images.OPERATOR),
    )
    kubectl = Kubectl(cluster)
    try:
        kubectl("create", "namespace", NAMESPACE)
        started = time.monotonic()
        installing = helm(
            cluster,
            *("install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace"),
            *("--set-json", f"nodeSelector={json.dumps(ON_THE_REAL_NODE['nodeSelector'])}"),
            *("--set-json", f"tolerations={json.dumps(ON_THE_REAL_NODE['tolerations'])}"),
            *("--set", "derpMap.probeInterval=2", "--set-json", f"tests.expectRegions=[{REGION_ID}]"),
            *("--wait", "--timeout", "180s"),
        )
        assert installing.returncode == 0, installing.stdout + installing.stderr
        print(f"INCLUSTER helm install --wait: {time.monotonic() - started:.1f}s")
        yield cluster, kubectl
    finally:
        # The operator removes its finalizer: delete the region while it runs.
        kubectl("delete", "-f", "-", "--timeout=60s", input=yaml.safe_dump(REAL_NODE_REGION), check=False)
        helm(cluster, "uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait", "--timeout", "60s")
        down(cluster)


def operator_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    pods = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "pods", "-l", SELECTOR)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def ask(pod: dict[str, Any], path: str) -> tuple[int, str]:
    """The operator's HTTP endpoint, from the host, at the pod's own IP (routed to the node)."""
    try:
        url = f"http://{pod['status']['podIP']}:{OPERATOR_PORT}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def lease_holder(kubectl: Kubectl) -> str:
    lease = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "lease", LEASE)
    return str(lease["spec"].get("holderIdentity") or "")


def two_ready_replicas(kubectl: Kubectl) -> list[dict[str, Any]]:
    return wait_for(
        "two operator replicas Ready",
        lambda: operator_pods(kubectl),
        lambda pods: len(pods) == 2 and all(is_ready(p) for p in pods),
        timeout=150,
    )


def exec_in(kubectl: Kubectl, pod: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return kubectl("-n", OPERATOR_NAMESPACE, "exec", pod, "--", *argv, check=False)


def test_both_replicas_run_locked_down_on_the_real_node(installed: tuple[LocalCluster, Kubectl]) -> None:
    _, kubectl = installed
    for pod in two_ready_replicas(kubectl):
        name = pod["metadata"]["name"]
        assert pod["spec"]["nodeName"] == realnode.NODE_NAME
        assert pod["spec"]["serviceAccountName"] == SERVICE_ACCOUNT
        (container,) = pod["spec"]["containers"]
        assert container["image"] == images.OPERATOR.reference
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz"
        (status,) = pod["status"]["containerStatuses"]
        assert (status["ready"], status["restartCount"], "running" in status["state"]) == (True, 0, True)

        assert exec_in(kubectl, name, "id", "-u").stdout.strip() == "65532"
        written = exec_in(kubectl, name, "touch", "/written")
        assert written.returncode != 0 and "Read-only file system" in written.stderr
        capabilities = dict(
            line.split(":\t")
            for line in exec_in(kubectl, name, "cat", "/proc/self/status").stdout.splitlines()
            if line.startswith("Cap")
        )
        for kind in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(capabilities[kind], 16) == 0, capabilities
    # The Lease is the ServiceAccount's API access at work: one replica holds it.
    holder = wait_until("a replica to hold the Lease", lambda: lease_holder(kubectl))
    assert holder in {p["metadata"]["name"] for p in operator_pods(kubectl)}


def test_the_disruption_budget_lets_one_replica_go_at_a_time(installed: tuple[LocalCluster, Kubectl]) -> None:
    _, kubectl = installed
    two_ready_replicas(kubectl)
    budget = wait_for(
        "the PodDisruptionBudget to count both replicas",
        lambda: kubectl.json("-n", OPERATOR_NAMESPACE, "get", "pdb", "derpfleet-operator"),
        lambda pdb: pdb.get("status", {}).get("currentHealthy") == 2,
    )
    assert budget["spec"]["maxUnavailable"] == 1
    assert (budget["status"]["expectedPods"], budget["status"]["disruptionsAllowed"]) == (2, 1)


def test_a_region_on_the_real_node_is_published_by_the_operator_in_the_cluster(
    installed: tuple[LocalCluster, Kubectl],
) -> None:
    """The operator's probes leave its pod for the node's hostPorts: Ready means they came back."""
    _, kubectl = installed
    started = time.monotonic()
    kubectl("apply", "-f", "-", input=yaml.safe_dump(REAL_NODE_REGION))
    region = wait_for(
        "the region Ready by the in-cluster operator's probes",
        lambda: kubectl.region("real"),
        lambda r: (
            condition(r, "Ready").get("status") == "True"
            and all("rttMs" in n for n in r["status"].get("nodes") or [{}])
        ),
        timeout=180,
    )
    print(f"INCLUSTER region Ready and probed {time.monotonic() - started:.1f}s after apply")
    (node,) = region["status"]["nodes"]
    assert (node["ipv4"], node["nodeName"], node["ready"]) == (realnode.NODE_IP, realnode.NODE_NAME, True)
    assert node["rttMs"] > 0
    published = kubectl.derp_map()
    (relay,) = published["Regions"][str(REGION_ID)]["Nodes"]
    assert relay["IPv4"] == realnode.NODE_IP
    leader = next(p for p in operator_pods(kubectl) if p["metadata"]["name"] == lease_holder(kubectl))
    _, body = wait_for(
        "the leader's /derpmap.json to serve the published map",
        lambda: ask(leader, "/derpmap.json"),
        lambda answer: answer[0] == 200 and json.loads(answer[1]) == kubectl.derp_map(),
    )
    assert str(REGION_ID) in json.loads(body)["Regions"]


def evict(kubectl: Kubectl, name: str) -> subprocess.CompletedProcess[str]:
    """Ask the Eviction API, as a node drain does: the PodDisruptionBudget may refuse."""
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE},
    }
    return kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/pods/{name}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
        check=False,
    )


def test_the_standby_takes_over_when_the_leader_is_evicted(installed: tuple[LocalCluster, Kubectl]) -> None:
    _, kubectl = installed
    pods = {p["metadata"]["name"]: p for p in two_ready_replicas(kubectl)}
    leader_name = lease_holder(kubectl)
    (standby_name,) = set(pods) - {leader_name}
    leader, standby = pods[leader_name], pods[standby_name]
    assert ask(leader, "/healthz") == (200, "ok: leading\n")
    assert ask(standby, "/healthz") == (200, "ok: standby\n")
    assert ask(standby, "/derpmap.json")[0] == 503  # a standby publishes nothing

    evicted_at = time.monotonic()
    first = evict(kubectl, leader_name)
    assert first.returncode == 0, first.stderr
    second = evict(kubectl, standby_name)
    assert second.returncode != 0 and "disruption budget" in second.stderr, second.stderr

    # The standby, or the leader's replacement if it starts first: either way not the evicted pod.
    new_leader_name = wait_until(
        "another replica to take the Lease",
        lambda: (holder := lease_holder(kubectl)) not in ("", leader_name) and holder,
        timeout=150,
    )
    took_over = time.monotonic() - evicted_at
    standby = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "pod", new_leader_name)
    wait_until("the new leader to say so", lambda: ask(standby, "/healthz") == (200, "ok: leading\n"))
    # A new leader writes the region's status before its first probe, without the old one's lastProbe.
    before = kubectl.region("real")["status"]["nodes"][0].get("lastProbe")
    wait_until(
        "the new leader to probe the region and serve its map",
        lambda: (
            kubectl.region("real")["status"]["nodes"][0].get("lastProbe") not in (None, before)
            and (answer := ask(standby, "/derpmap.json"))[0] == 200
            and str(REGION_ID) in json.loads(answer[1])["Regions"]
        ),
    )
    print(f"INCLUSTER {new_leader_name} held the Lease {took_over:.1f}s after the leader's eviction")
    assert condition(kubectl.region("real"), "Ready").get("status") == "True"
    replaced = two_ready_replicas(kubectl)
    assert leader_name not in {p["metadata"]["name"] for p in replaced}


def test_helm_test_passes(installed: tuple[LocalCluster, Kubectl]) -> None:
    """The chart's own test pod: every replica's /healthz, one leader, the published map served."""
    cluster, kubectl = installed
    two_ready_replicas(kubectl)
    started = time.monotonic()
    tested = helm(cluster, "test", RELEASE, "-n", OPERATOR_NAMESPACE, "--logs", "--timeout", "180s")
    print(f"INCLUSTER helm test: {time.monotonic() - started:.1f}s")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert re.search(r"^Phase:\s+Succeeded$", tested.stdout, re.MULTILINE), tested.stdout
    assert f"regions [{REGION_ID}]" in tested.stdout, tested.stdout
    assert "\nok\n" in tested.stdout, tested.stdout
