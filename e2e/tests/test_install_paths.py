"""Install paths: helm lint, the values schema, the chart against the real API server, the kubectl bundle."""

from __future__ import annotations

import subprocess

import pytest
from conftest import wait_until
from derpcluster import LocalCluster
from derpcluster.bundle import BUNDLE, CHART, NAMESPACE, render

DRY_RUN_NAMESPACE = "derpfleet-dry-run"
UNNEEDED = [
    ("list", "secrets", "default"),  # Secrets are read by name only
    ("watch", "secrets", "default"),
    ("delete", "statefulsets.apps", "default"),  # owner references delete what a region owned
    ("delete", "pods", "default"),
    ("update", "nodes", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("update", "leases.coordination.k8s.io", "default"),  # the Lease lives in the release namespace
]
"""Verbs the operator never uses, which its ServiceAccount must not have."""


def helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.helm), *args], capture_output=True, text=True, check=check, timeout=60, env=cluster.env()
    )


def assert_rights(
    cluster: LocalCluster,
    user: str,
    granted: list[tuple[str, str, str]],
    refused: list[tuple[str, str, str]],
) -> None:
    """Ask the API server (SubjectAccessReview, as ``kubectl auth can-i``) about each (verb, resource, namespace)."""

    def allowed(verb: str, resource: str, namespace: str) -> bool:
        resource, _, subresource = resource.partition("/")
        where = ["-n", namespace] if namespace else []
        if subresource:
            where.append(f"--subresource={subresource}")
        answer = cluster.kubectl("auth", "can-i", verb, resource, *where, f"--as={user}", check=False)
        return answer.stdout.strip() == "yes"

    wrong = [(v, r, n, "refused") for v, r, n in granted if not allowed(v, r, n)]
    wrong += [(v, r, n, "granted") for v, r, n in refused if allowed(v, r, n)]
    assert not wrong, f"{user}: {wrong}"


def test_helm_lint_is_clean(cluster: LocalCluster) -> None:
    linted = helm(cluster, "lint", "--strict", str(CHART), check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "[WARNING]" not in linted.stdout and "[ERROR]" not in linted.stdout, linted.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCount=9", "at '/replicaCount': maximum: got 9, want 5"),
        ("service.type=Ingress", "at '/service/type': value must be one of 'ClusterIP', 'NodePort'"),
        ("watchNamespaces[0]=Not_A_Namespace", "at '/watchNamespaces/0': 'Not_A_Namespace' does not match"),
        ("derpMap.probeInterval=0", "at '/derpMap/probeInterval': minimum: got 0, want 1"),
        ("imagee.tag=typo", "additional properties 'imagee' not allowed"),
    ],
)
def test_the_values_schema_rejects_bad_values_naming_them(
    cluster: LocalCluster, value: str, message: str
) -> None:
    rendered = helm(cluster, "template", "derpfleet", str(CHART), "--set", value, check=False)
    assert rendered.returncode != 0, f"--set {value} rendered"
    assert "values don't meet the specifications of the schema" in rendered.stderr, rendered.stderr
    assert message in rendered.stderr, rendered.stderr


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", f"watchNamespaces={{default,{DRY_RUN_NAMESPACE}}}", "--set", "service.type=NodePort"],
        ["--set", "replicaCount=1", "--set", "nodeSelector.kubernetes\\.io/os=linux"],
    ],
    ids=["defaults", "watch-namespaces", "one-replica"],
)
def test_the_api_server_accepts_what_the_chart_renders(cluster: LocalCluster, values: list[str]) -> None:
    """A server-side dry run: the real API server validates every object, admission included.

    The ``helm test`` pod stays out: admission refuses a pod whose
    ServiceAccount does not exist, and in a dry run none does (by the time
    ``helm test`` creates the pod, the install has made it).
    """
    cluster.kubectl("create", "namespace", DRY_RUN_NAMESPACE, check=False)
    try:
        rendered = helm(
            cluster,
            *("template", "derpfleet", str(CHART), "-n", DRY_RUN_NAMESPACE),
            *("--include-crds", "--skip-tests", *values),
        ).stdout
        applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
        assert applied.returncode == 0, applied.stderr
        kinds = {line.split("/")[0] for line in applied.stdout.splitlines()}
        assert {"deployment.apps", "service", "serviceaccount"} <= kinds, applied.stdout
        two_replicas = "replicaCount=1" not in values
        assert ("poddisruptionbudget.policy" in kinds) == two_replicas, applied.stdout
    finally:
        cluster.kubectl("delete", "namespace", DRY_RUN_NAMESPACE, "--wait=true", check=False)


def test_the_bundle_is_the_chart_rendered(cluster: LocalCluster) -> None:
    assert BUNDLE.read_text() == render(cluster.helm), (
        "deploy/derpfleet.yaml is out of date: run `make bundle`"
    )


def test_the_bundle_installs_and_uninstalls_with_kubectl(cluster: LocalCluster) -> None:
    bundle = str(BUNDLE)
    try:
        cluster.kubectl("apply", "--server-side", "-f", bundle)
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/derpregions.derpfleet.io", "--timeout=60s"
        )
        wait_until(
            "the operator Deployment's two replicas to be scheduled",
            lambda: (
                cluster.kubectl(
                    "-n",
                    NAMESPACE,
                    "get",
                    "deployment",
                    "derpfleet-operator",
                    "-o",
                    "jsonpath={.status.replicas}",
                ).stdout
                == "2"
            ),
        )
        assert_rights(
            cluster,
            f"system:serviceaccount:{NAMESPACE}:derpfleet-operator",
            granted=[
                ("patch", "derpregions.derpfleet.io/status", "default"),
                ("patch", "statefulsets.apps", "default"),
                ("get", "secrets", "default"),
                ("list", "nodes", ""),
                ("update", "leases.coordination.k8s.io", NAMESPACE),
            ],
            refused=UNNEEDED,
        )
    finally:
        cluster.kubectl("delete", "-f", bundle, "--wait=true", "--ignore-not-found", check=False)
    assert cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0
    assert cluster.kubectl("get", "crd", "derpregions.derpfleet.io", check=False).returncode != 0


def test_a_namespaced_install_grants_rights_in_the_watched_namespaces_only(cluster: LocalCluster) -> None:
    """watchNamespaces turns the namespaced rules into a Role per watched namespace (and the release's)."""
    release_namespace, watched, other = "derpfleet-ns", "team-a", "team-b"
    for namespace in (release_namespace, watched, other):
        cluster.kubectl("create", "namespace", namespace)
    rendered = helm(
        cluster,
        "template",
        "nsmode",
        str(CHART),
        "-n",
        release_namespace,
        "--include-crds",  # can-i finds derpregions through discovery
        "--skip-tests",  # applied as kubectl users do, like the bundle
        "--set",
        f"watchNamespaces={{{watched}}}",
    ).stdout
    try:
        cluster.kubectl("apply", "--server-side", "-f", "-", input=rendered)
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/derpregions.derpfleet.io", "--timeout=60s"
        )
        assert_rights(
            cluster,
            f"system:serviceaccount:{release_namespace}:nsmode-operator",
            granted=[
                ("patch", "derpregions.derpfleet.io/status", watched),
                ("patch", "statefulsets.apps", watched),
                ("get", "secrets", watched),
                ("patch", "configmaps", release_namespace),  # the fleet's DERP map
                ("update", "leases.coordination.k8s.io", release_namespace),
                ("list", "nodes", ""),
            ],
            refused=[
                ("patch", "statefulsets.apps", other),
                ("get", "secrets", other),
                ("list", "derpregions.derpfleet.io", other),
                ("list", "namespaces", ""),
                *[(verb, resource, watched if ns == "default" else ns) for verb, resource, ns in UNNEEDED],
            ],
        )
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)
        for namespace in (release_namespace, watched, other):
            cluster.kubectl("delete", "namespace", namespace, "--wait=true", check=False)
