"""The session's local cluster: built once (cached), started fresh in a temporary directory.

Tests get a :class:`derpcluster.LocalCluster`: ``kubectl(...)``, ``env()``,
``kubeconfig``, ``node_addresses``, ``helm``, ``pods_dir``.  At the end the
fixture stops it and checks that nothing it started is left running.

The operator's tests share more: the ``kubectl`` fixture installs the chart
once (CRD, RBAC, Service; no operator replicas), :class:`OperatorProcess`
runs a real ``derpfleet operator`` with the chart's RBAC, its own HTTP port
and log, and :class:`Kubectl` reads and writes DerpRegions and the map.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from derpcluster import LocalCluster, binaries, down, realnode, up


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("cluster")
    started = up(state, progress=False)
    try:
        yield started
    finally:
        down(started)


WAIT = 90.0
"""Seconds for any one thing to converge: pods start, probes run, controllers catch up."""


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (subprocess.CalledProcessError, LookupError, ValueError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def crd_manifest(group: str, kind: str, plural: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A namespaced, single-version (v1) CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
            ],
        },
    }


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a state directory is unique to one cluster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "derp"
OPERATOR_NAMESPACE = "derpfleet-system"
REGION = "lab"
PROBE_INTERVAL = "2"
SERVICE_ACCOUNT = "derpfleet-operator"
T = TypeVar("T")


ON_THE_REAL_NODE: dict[str, Any] = {
    "nodeSelector": {realnode.NODE_LABEL: "real"},
    "tolerations": [{"key": realnode.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
}
"""What a pod spec (or a DerpRegion's spec, or the chart's values) says to run on the real node, which is tainted."""
REAL_NODE_REGION: dict[str, Any] = {
    "apiVersion": "derpfleet.io/v1alpha1",
    "kind": "DerpRegion",
    "metadata": {"name": "real", "namespace": NAMESPACE},
    "spec": {"regionID": 950, "regionCode": "real", "replicas": 1, **ON_THE_REAL_NODE},
}
"""A one-relay region on the real node (the only one there is)."""


def wait_for(what: str, fetch: Callable[[], T], accept: Callable[[T], bool], timeout: float = WAIT) -> T:
    """Fetch until ``accept`` likes the value, and return that value."""
    found: list[T] = []

    def check() -> bool:
        value = fetch()
        if accept(value):
            found.append(value)
            return True
        return False

    wait_until(what, check, timeout)
    return found[0]


class Kubectl:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def region(self, name: str = REGION) -> dict[str, Any]:
        return dict(self.json("-n", NAMESPACE, "get", "derpregion", name))

    def patch_region(
        self, spec: dict[str, Any], check: bool = True, name: str = REGION
    ) -> subprocess.CompletedProcess[str]:
        return self(
            "-n",
            NAMESPACE,
            "patch",
            "derpregion",
            name,
            "--type=merge",
            "-p",
            json.dumps({"spec": spec}),
            check=check,
        )

    def derp_map(self) -> dict[str, Any]:
        cm = self.json("-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map")
        return dict(json.loads(cm["data"]["derpmap.json"]))


def condition(region: dict[str, Any], kind: str) -> dict[str, Any]:
    for c in (region.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}


def region_doc(name: str = REGION, **spec: Any) -> str:
    base = yaml.safe_load((REPO / "examples" / "region-minimal.yaml").read_text())
    base["metadata"] = {"name": name, "namespace": NAMESPACE}
    base["spec"].update(spec)
    return yaml.safe_dump(base)


def region_nodes(derp_map: dict[str, Any], region_id: int) -> dict[str, str]:
    """Node name -> IPv4 of one region in a DERP map ({} when the region is absent)."""
    region = derp_map["Regions"].get(str(region_id)) or {}
    return {n["Name"]: n.get("IPv4", "") for n in region.get("Nodes") or []}


def relay_pids(node_ip: str, port: int = 443) -> list[int]:
    """The pod runner's relay processes serving ``node_ip:port``: the parent and its workers (same command line)."""
    wanted = f"{node_ip}:{port}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"derp-relay") for a in argv[:2]) and wanted in argv:
            found.append(int(entry.name))
    if not found:
        raise LookupError(f"no derp-relay process listens on {node_ip}:{port}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_kubeconfig(
    cluster: Any,
    kubectl: Kubectl,
    path: Path,
    service_account: str = SERVICE_ACCOUNT,
    namespace: str = OPERATOR_NAMESPACE,
) -> Path:
    """A kubeconfig that acts as the chart's ServiceAccount: the operator then runs with the chart's RBAC."""
    token = kubectl("-n", namespace, "create", "token", service_account, "--duration", "2h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [
            {
                "name": "operator",
                "context": {"cluster": admin["clusters"][0]["name"], "user": service_account},
            }
        ],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def kubectl(cluster: Any) -> Kubectl:
    """The chart installed without operator replicas (its CRD, RBAC and Service), and the region namespace."""
    k = Kubectl(cluster)
    k("create", "namespace", NAMESPACE)
    cluster.install_chart_without_operator(REPO / "charts" / "derpfleet", OPERATOR_NAMESPACE)
    wait_until("the CRD to be served", lambda: k("get", "derpregions", "-A", check=False).returncode == 0)
    return k


class OperatorProcess:
    """``derpfleet operator`` as a real process with its own log and HTTP port.

    ``python`` is the interpreter whose ``derpoperator`` runs (another
    release's virtualenv, say); ``watch`` limits it to those namespaces and
    ``map_namespace`` is where it keeps the map and its Lease.
    """

    def __init__(
        self,
        cluster: Any,
        kubeconfig: Path,
        log_path: Path,
        identity: str,
        *,
        python: str = sys.executable,
        map_namespace: str = OPERATOR_NAMESPACE,
        watch: tuple[str, ...] = (),
    ) -> None:
        self.cluster, self.kubeconfig, self.log_path, self.identity = cluster, kubeconfig, log_path, identity
        self.python, self.map_namespace, self.watch = python, map_namespace, watch
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**self.cluster.env(), "POD_NAME": self.identity}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "derpoperator.cli",
                    "operator",
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--map-namespace",
                    self.map_namespace,
                    *(f"--namespace={namespace}" for namespace in self.watch),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--probe-interval",
                    PROBE_INTERVAL,
                    "--log-level",
                    "debug",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_until(f"operator {self.identity} to serve /healthz", lambda: self.http("/healthz")[0] == 200)

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def operators_running(cluster: Any, kubectl: Kubectl, workdir: Path) -> Iterator[list[OperatorProcess]]:
    """Operator "a" running (leading); the caller may add more.  All are stopped at the end, logs shown."""
    kubeconfig = token_kubeconfig(cluster, kubectl, workdir / "operator.kubeconfig")
    running = [OperatorProcess(cluster, kubeconfig, workdir / "a.log", "a")]
    try:
        running[0].start()
        yield running
    finally:
        for operator in running:
            operator.stop()
        for operator in running:
            sys.stderr.write(
                f"--- operator {operator.identity} log (tail) ---\n{operator.log_path.read_text(errors='replace')[-6000:]}\n"
            )


@pytest.fixture(scope="module")
def operators(
    cluster: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[OperatorProcess]]:
    """Per test module: operator "a" running (leading); tests may add more.  All stopped at the end, logs shown."""
    with operators_running(cluster, kubectl, tmp_path_factory.mktemp("operators")) as running:
        yield running


@pytest.fixture(scope="session")
def derpprobe() -> Path:
    """Tailscale's derpprobe from the module e2e/interop pins, where e2e/interop/run caches it."""
    interop = REPO / "e2e" / "interop"
    version = binaries.pinned_version(interop, "tailscale.com")
    path = binaries.cache_dir() / f"tailscale-{version}" / "derpprobe"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name("derpprobe.partial")
        subprocess.run(
            ["go", "build", "-o", str(partial), "tailscale.com/cmd/derpprobe"],
            cwd=interop,
            env=binaries.go_env(binaries.cache_dir()),
            check=True,
            timeout=600,
        )
        partial.rename(path)
    return path
