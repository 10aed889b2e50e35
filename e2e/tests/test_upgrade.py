"""``helm upgrade`` from the previous release keeps a region serving; ``helm uninstall`` leaves it.

The previous release (chart 0.1.0 and its operator) is taken from this
repository's history, installed in a virtualenv of its own (cached by commit),
and runs a region of two relays on the fake nodes.  Then the documented
upgrade: the CRD applied first (``helm upgrade`` never touches a chart's
``crds/``), ``helm upgrade`` to this checkout's chart, and the operator replaced
by this checkout's.  A watcher polls the map throughout; the relays must not
be restarted, since neither the region's spec nor the relays' rendering
changed.  Last, ``helm uninstall`` removes the operator's own objects only: the
CRD, the region, its relays and the published map stay, as the README says.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    REPO,
    WAIT,
    Kubectl,
    OperatorProcess,
    condition,
    region_nodes,
    token_kubeconfig,
    wait_until,
)

PREVIOUS_CHART_VERSION = "0.1.0"
PREVIOUS_COMMIT = "b1a3280f37493f10253f98066b37a85bf4ac0ac9"
"""The last commit whose chart is 0.1.0: the release users upgrade from."""
RELEASE = "prev"
OPERATOR_NAMESPACE = "upgrade-system"
REGIONS_NAMESPACE = "upgrade-regions"
REGION_NAME = "upgraded"
REGION_ID = 930
pytestmark = pytest.mark.timeout(900)


def previous_release() -> Path:
    """The previous release's tree, with its operator installed in ``<tree>/venv``; cached by commit."""
    cache = Path(os.environ.get("CACHE", Path.home() / ".cache" / "derpfleet"))
    tree = cache / f"release-{PREVIOUS_CHART_VERSION}-{PREVIOUS_COMMIT[:12]}"
    installed = tree / "venv" / ".installed"
    if installed.exists():
        return tree
    if subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_COMMIT}^{{commit}}"], check=False
    ).returncode:
        raise RuntimeError(
            f"commit {PREVIOUS_COMMIT} (chart {PREVIOUS_CHART_VERSION}) is not in {REPO}: "
            "the upgrade test needs the repository's history (a full clone, not a shallow one)"
        )
    print(f">> installing the previous release (chart {PREVIOUS_CHART_VERSION}) in {tree}", flush=True)
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS_COMMIT], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(tree / "venv")], check=True)
    subprocess.run(
        [str(tree / "venv" / "bin" / "pip"), "install", "--quiet", str(tree)], check=True, timeout=600
    )
    installed.touch()
    return tree


def helm(kubectl: Kubectl, *args: str) -> None:
    subprocess.run(
        [str(kubectl.cluster.helm), *args],
        env=kubectl.cluster.env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    )


def chart_values() -> list[str]:
    """No operator replicas (the operator runs as a local process), watching one namespace."""
    return ["--set", "replicaCount=0", "--set", f"watchNamespaces={{{REGIONS_NAMESPACE}}}"]


def stored_map(kubectl: Kubectl) -> dict[str, Any] | None:
    found = kubectl("-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map", "-o", "json", check=False)
    if found.returncode:
        return None
    return dict(json.loads(json.loads(found.stdout)["data"]["derpmap.json"]))


def relays(kubectl: Kubectl) -> dict[str, tuple[str, int]]:
    """Relay pod name -> (uid, restarts)."""
    pods = kubectl.json("-n", REGIONS_NAMESPACE, "get", "pods", "-l", f"derpfleet.io/region={REGION_NAME}")
    return {
        p["metadata"]["name"]: (
            p["metadata"]["uid"],
            sum(c.get("restartCount", 0) for c in (p.get("status") or {}).get("containerStatuses") or []),
        )
        for p in pods["items"]
    }


class StoredMapWatch:
    """Polls the stored map in a thread and records every sample that lacks one of ``required``."""

    def __init__(self, kubectl: Kubectl, required: set[str]) -> None:
        self.kubectl, self.required = kubectl, required
        self.samples = 0
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="stored map watch", daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            derp_map = stored_map(self.kubectl)
            nodes = set(region_nodes(derp_map, REGION_ID)) if derp_map is not None else set()
            self.samples += 1
            if not self.required <= nodes:
                self.violations.append(f"{time.strftime('%H:%M:%S')} the map had {sorted(nodes)}")
            time.sleep(0.3)

    def __enter__(self) -> StoredMapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module")
def previous_tree() -> Path:
    return previous_release()


@pytest.fixture(scope="module")
def namespaces(kubectl: Kubectl) -> Iterator[None]:
    for namespace in (OPERATOR_NAMESPACE, REGIONS_NAMESPACE):
        kubectl("create", "namespace", namespace)
    yield
    helm(kubectl, "uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--ignore-not-found")
    # With no operator left to remove it, the region's finalizer is dropped by hand, as the README says.
    for name in kubectl(
        "-n", REGIONS_NAMESPACE, "get", "derpregion", "-o", "name", check=False
    ).stdout.split():
        kubectl(
            "-n", REGIONS_NAMESPACE, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
        )
    for namespace in (REGIONS_NAMESPACE, OPERATOR_NAMESPACE):
        kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)


def operator(kubectl: Kubectl, workdir: Path, identity: str, python: str) -> OperatorProcess:
    kubeconfig = token_kubeconfig(
        kubectl.cluster,
        kubectl,
        workdir / f"{identity}.kubeconfig",
        f"{RELEASE}-operator",
        OPERATOR_NAMESPACE,
    )
    return OperatorProcess(
        kubectl.cluster,
        kubeconfig,
        workdir / f"{identity}.log",
        identity,
        python=python,
        map_namespace=OPERATOR_NAMESPACE,
        watch=(REGIONS_NAMESPACE,),
    )


def test_helm_upgrade_from_the_previous_release_keeps_the_relays_serving(
    kubectl: Kubectl, namespaces: None, previous_tree: Path, tmp_path: Path
) -> None:
    helm(
        kubectl,
        "install",
        RELEASE,
        str(previous_tree / "charts" / "derpfleet"),
        "-n",
        OPERATOR_NAMESPACE,
        *chart_values(),
        "--wait",
    )
    installed = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "serviceaccount", f"{RELEASE}-operator")
    assert installed["metadata"]["labels"]["helm.sh/chart"] == f"derpfleet-{PREVIOUS_CHART_VERSION}"

    old = operator(kubectl, tmp_path, "old", str(previous_tree / "venv" / "bin" / "python"))
    new = operator(kubectl, tmp_path, "new", sys.executable)
    region = yaml.safe_load((REPO / "examples" / "region-minimal.yaml").read_text())
    region["metadata"] = {"name": REGION_NAME, "namespace": REGIONS_NAMESPACE}
    region["spec"].update(regionID=REGION_ID, regionCode="upg")
    try:
        old.start()
        kubectl("apply", "-f", "-", input=yaml.safe_dump(region))
        wait_until(
            "the previous release's region Ready with two relays in the map",
            lambda: (
                condition(
                    kubectl.json("-n", REGIONS_NAMESPACE, "get", "derpregion", REGION_NAME), "Ready"
                ).get("status")
                == "True"
                and len(region_nodes(stored_map(kubectl) or {"Regions": {}}, REGION_ID)) == 2
            ),
            timeout=2 * WAIT,
        )
        before = relays(kubectl)
        serving = set(region_nodes(stored_map(kubectl) or {"Regions": {}}, REGION_ID))
        revision = kubectl.json("-n", REGIONS_NAMESPACE, "get", "statefulset", f"derp-{REGION_NAME}")[
            "status"
        ]["updateRevision"]

        with StoredMapWatch(kubectl, serving) as watch:
            old.stop()
            kubectl(
                "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "derpregion.yaml")
            )
            helm(
                kubectl,
                "upgrade",
                RELEASE,
                str(REPO / "charts" / "derpfleet"),
                "-n",
                OPERATOR_NAMESPACE,
                *chart_values(),
            )
            upgraded_at = datetime.datetime.now(datetime.UTC)
            new.start()

            def reconciled_by_the_new_operator() -> bool:
                status = (
                    kubectl.json("-n", REGIONS_NAMESPACE, "get", "derpregion", REGION_NAME).get("status")
                    or {}
                )
                probed = [n.get("lastProbe") for n in status.get("nodes") or []]
                return (
                    condition({"status": status}, "Ready").get("status") == "True"
                    and len(probed) == 2
                    and all(p and datetime.datetime.fromisoformat(p) > upgraded_at for p in probed)
                )

            wait_until(
                "the new operator to probe both relays", reconciled_by_the_new_operator, timeout=2 * WAIT
            )
            time.sleep(5)  # a few more reconciles of the new operator, watched
        assert watch.samples > 10, watch.samples
        assert not watch.violations, "the map lost serving relays during the upgrade:\n" + "\n".join(
            watch.violations
        )
        assert relays(kubectl) == before, "the upgrade restarted relays"
        sts = kubectl.json("-n", REGIONS_NAMESPACE, "get", "statefulset", f"derp-{REGION_NAME}")
        assert sts["status"]["updateRevision"] == revision, "the upgrade changed the relays' pod template"
        upgraded = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "serviceaccount", f"{RELEASE}-operator")
        assert (
            upgraded["metadata"]["labels"]["helm.sh/chart"]
            != installed["metadata"]["labels"]["helm.sh/chart"]
        )
    finally:
        new.stop()
        old.stop()
        for process in (old, new):
            sys.stderr.write(f"--- operator {process.identity} log (tail) ---\n")
            if process.log_path.exists():
                sys.stderr.write(process.log_path.read_text(errors="replace")[-4000:] + "\n")


def test_helm_uninstall_leaves_the_crd_the_region_its_relays_and_the_map(
    kubectl: Kubectl, namespaces: None
) -> None:
    before = relays(kubectl)
    assert before, "the upgrade test left no region to uninstall under"
    helm(kubectl, "uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait")
    assert kubectl(
        "-n", OPERATOR_NAMESPACE, "get", "serviceaccount", f"{RELEASE}-operator", check=False
    ).returncode
    assert kubectl("get", "crd", "derpregions.derpfleet.io", check=False).returncode == 0
    assert kubectl("-n", REGIONS_NAMESPACE, "get", "derpregion", REGION_NAME, check=False).returncode == 0
    assert relays(kubectl) == before
    derp_map = stored_map(kubectl)
    assert derp_map is not None and len(region_nodes(derp_map, REGION_ID)) == 2
