"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

:func:`start` brings one up in a state directory (certificates, kubeconfigs,
etcd data, logs, and a ``processes.json`` listing what it started) and
returns a :class:`Cluster`; :func:`stop` ends exactly those processes, by
process group, whether called from the same process or from ``make
cluster-down`` later.  Ports are picked free on 127.0.0.1 at start.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import pki
from .binaries import Binaries

HOST = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
"""Service ClusterIPs.  No kube-proxy routes them; the real node DNATs only :data:`KUBERNETES_SERVICE_IP`."""
KUBERNETES_SERVICE_IP = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
"""The API server's own Service ``default/kubernetes`` gets the range's first address; pods dial it."""
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
PROCESSES_FILE = "processes.json"
NODE_MONITOR_GRACE_SECONDS = 30
"""How long a node may go without a heartbeat before the node lifecycle controller marks it NotReady."""


class ClusterError(RuntimeError):
    """The control plane failed to start or stop; the message names the component and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_kubeconfig(
    path: Path, server: str, ca_pem: bytes, user: pki.Issued, name: str, *, tls_server_name: str = ""
) -> Path:
    """``tls_server_name``: the name to check the server's certificate for, when ``server`` is not in it."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    cluster: dict[str, str] = {"server": server, "certificate-authority-data": b64(ca_pem)}
    if tls_server_name:
        cluster["tls-server-name"] = tls_server_name

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "derpcluster", "cluster": cluster}],
        "users": [
            {
                "name": name,
                "user": {"client-certificate-data": b64(user.cert_pem), "client-key-data": b64(user.key_pem)},
            }
        ],
        "contexts": [{"name": "derpcluster", "context": {"cluster": "derpcluster", "user": name}}],
        "current-context": "derpcluster",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


@dataclass
class Cluster:
    """A running control plane: where it is and how to reach it."""

    state_dir: Path
    server: str
    kubeconfig: Path
    binaries: Binaries
    processes: dict[str, int] = field(default_factory=dict)
    """Component name -> PID (each leads its own process group)."""
    commands: dict[str, tuple[list[str], dict[str, str] | None]] = field(default_factory=dict)
    """Component name -> how it was launched, so a fault test can start it again as it was."""

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def env(self) -> dict[str, str]:
        """Environment for kubectl, helm and the kubernetes client: this cluster's kubeconfig first."""
        path = os.pathsep.join(
            [str(self.binaries.k8s_dir), str(self.binaries.helm.parent), os.environ.get("PATH", "")]
        )
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binaries.kubectl), *args],
            check=False,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, ["kubectl", *args], result.stdout, result.stderr
            )
        return result

    def save(self) -> None:
        record = {"server": self.server, "kubeconfig": str(self.kubeconfig), "processes": self.processes}
        (self.state_dir / PROCESSES_FILE).write_text(json.dumps(record, indent=2))


def launch(cluster: Cluster, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Start a component in its own session (so it outlives ``make cluster-up``), logging to a file."""
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    cluster.commands[name] = (list(argv), dict(env) if env is not None else None)
    with (cluster.log_dir / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    cluster.processes[name] = process.pid
    cluster.save()


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        waited = 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
    return waited == 0


def _log_tail(cluster: Cluster, name: str, lines: int = 15) -> str:
    path = cluster.log_dir / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait(cluster: Cluster, name: str, check_url: str, context: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if not _alive(cluster.processes[name]):
            raise ClusterError(f"{name} exited during start; its log ends:\n{_log_tail(cluster, name)}")
        try:
            with urllib.request.urlopen(check_url, timeout=5, context=context) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise ClusterError(
        f"{name} not ready at {check_url} after {READY_TIMEOUT:.0f}s ({last}); log:\n{_log_tail(cluster, name)}"
    )


def start(state_dir: Path, binaries: Binaries, progress: bool = True) -> Cluster:
    """Start etcd, the API server, controller-manager and scheduler; wait until they serve."""
    say = print if progress else (lambda *_: None)
    state_dir.mkdir(parents=True, exist_ok=True)
    pki_dir = state_dir / "pki"
    pki_dir.mkdir(exist_ok=True)
    ca = pki.CertificateAuthority()
    (pki_dir / "ca.crt").write_bytes(ca.cert_pem)
    (pki_dir / "ca.key").write_bytes(ca.key_pem)
    serving_cert, serving_key = ca.issue(
        "kube-apiserver",
        dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        ips=(HOST, KUBERNETES_SERVICE_IP),
        server=True,
    ).write(pki_dir, "apiserver")
    sa_key, sa_pub = pki.service_account_keys(pki_dir)
    # How the API server authenticates to a real kubelet (logs, exec); fake nodes have no kubelet to reach.
    kubelet_client_cert, kubelet_client_key = ca.issue(
        "kube-apiserver-kubelet-client", groups=("system:masters",)
    ).write(pki_dir, "apiserver-kubelet-client")

    api_port, etcd_port, peer_port = free_port(), free_port(), free_port()
    server = f"https://{HOST}:{api_port}"
    admin = write_kubeconfig(
        state_dir / "admin.kubeconfig",
        server,
        ca.cert_pem,
        ca.issue("admin", groups=("system:masters",)),
        "admin",
    )
    cm_config = write_kubeconfig(
        state_dir / "controller-manager.kubeconfig",
        server,
        ca.cert_pem,
        ca.issue("system:kube-controller-manager"),
        "controller-manager",
    )
    sched_config = write_kubeconfig(
        state_dir / "scheduler.kubeconfig",
        server,
        ca.cert_pem,
        ca.issue("system:kube-scheduler"),
        "scheduler",
    )
    cluster = Cluster(state_dir, server, admin, binaries)
    try:
        t0 = time.monotonic()
        say(f">> etcd {binaries.etcd_version} on {HOST}:{etcd_port}")
        launch(
            cluster,
            "etcd",
            [
                str(binaries.etcd),
                "--data-dir",
                str(state_dir / "etcd"),
                "--listen-client-urls",
                f"http://{HOST}:{etcd_port}",
                "--advertise-client-urls",
                f"http://{HOST}:{etcd_port}",
                "--listen-peer-urls",
                f"http://{HOST}:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://{HOST}:{peer_port}",
                "--initial-cluster",
                f"default=http://{HOST}:{peer_port}",
                "--listen-metrics-urls",
                f"http://{HOST}:{free_port()}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        _wait(cluster, "etcd", f"http://{HOST}:{etcd_port}/health", None)
        say(f">> kube-apiserver {binaries.k8s_version} on {server}")
        launch(
            cluster,
            "kube-apiserver",
            [
                str(binaries.k8s_dir / "kube-apiserver"),
                "--etcd-servers",
                f"http://{HOST}:{etcd_port}",
                "--bind-address",
                HOST,
                "--advertise-address",
                HOST,
                "--secure-port",
                str(api_port),
                "--tls-cert-file",
                str(serving_cert),
                "--tls-private-key-file",
                str(serving_key),
                "--client-ca-file",
                str(pki_dir / "ca.crt"),
                "--kubelet-client-certificate",
                str(kubelet_client_cert),
                "--kubelet-client-key",
                str(kubelet_client_key),
                # By address: a node's Hostname (its name) resolves nowhere here.
                "--kubelet-preferred-address-types",
                "InternalIP,ExternalIP",
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                str(sa_pub),
                "--service-account-signing-key-file",
                str(sa_key),
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--authorization-mode",
                "Node,RBAC",
                "--allow-privileged",
                "--endpoint-reconciler-type",
                "none",
                "--profiling=false",
                "--v",
                "1",
            ],
        )
        context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        context.load_cert_chain(*ca.issue("readyz", groups=("system:masters",)).write(pki_dir, "readyz"))
        _wait(cluster, "kube-apiserver", f"{server}/readyz", context)
        say(">> kube-controller-manager and kube-scheduler")
        launch(
            cluster,
            "kube-controller-manager",
            [
                str(binaries.k8s_dir / "kube-controller-manager"),
                "--kubeconfig",
                str(cm_config),
                "--authentication-kubeconfig",
                str(cm_config),
                "--authorization-kubeconfig",
                str(cm_config),
                "--bind-address",
                HOST,
                "--secure-port",
                str(free_port()),
                "--service-account-private-key-file",
                str(sa_key),
                "--root-ca-file",
                str(pki_dir / "ca.crt"),
                "--use-service-account-credentials",
                "--cluster-signing-cert-file",
                str(pki_dir / "ca.crt"),
                "--cluster-signing-key-file",
                str(pki_dir / "ca.key"),
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--leader-elect=false",
                "--concurrent-statefulset-syncs",
                "5",
                # A node whose agent stops posting turns NotReady within a test's patience
                # (default 50 s); the node agent posts every 5 s.
                "--node-monitor-grace-period",
                f"{NODE_MONITOR_GRACE_SECONDS}s",
                "--v",
                "1",
            ],
        )
        launch(
            cluster,
            "kube-scheduler",
            [
                str(binaries.k8s_dir / "kube-scheduler"),
                "--kubeconfig",
                str(sched_config),
                "--authentication-kubeconfig",
                str(sched_config),
                "--authorization-kubeconfig",
                str(sched_config),
                "--bind-address",
                HOST,
                "--secure-port",
                str(free_port()),
                "--leader-elect=false",
                "--v",
                "1",
            ],
        )
        _wait_for_default_service_account(cluster)
        say(f">> control plane ready in {time.monotonic() - t0:.1f}s; KUBECONFIG={admin}")
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _wait_for_default_service_account(cluster: Cluster) -> None:
    """Pods can be created once the controller-manager made the default ServiceAccount."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for name in ("kube-controller-manager", "kube-scheduler"):
            if not _alive(cluster.processes[name]):
                raise ClusterError(f"{name} exited during start; its log ends:\n{_log_tail(cluster, name)}")
        if cluster.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise ClusterError("the default ServiceAccount never appeared; see kube-controller-manager.log")


def stop_processes(processes: dict[str, int]) -> None:
    """Newest first (the node agent before the API server it talks to): SIGTERM the group, wait, SIGKILL."""
    for pid in reversed(list(processes.values())):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def stop_component(cluster: Cluster, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """End one component (its process group) as a crash or an upgrade would; its data stays."""
    pid = cluster.processes.pop(name)
    cluster.save()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    stop_processes({name: pid})


def start_component(cluster: Cluster, name: str) -> None:
    """Start a stopped component again with the same command line: same ports, same data."""
    argv, env = cluster.commands[name]
    launch(cluster, name, argv, env)


def _names(pid: int, state_dir: Path) -> bool:
    try:
        return str(state_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(cluster: Cluster) -> None:
    stop_processes(cluster.processes)
    cluster.processes.clear()
    cluster.save()


def stop_state_dir(state_dir: Path, before: Callable[[dict[str, int]], None] | None = None) -> bool:
    """Stop a cluster started by another process (``make cluster-down``); False if none was recorded.

    ``before`` gets the processes first and may stop (and pop) some of them its own way.
    """
    record_path = state_dir / PROCESSES_FILE
    if not record_path.exists():
        return False
    record = json.loads(record_path.read_text())
    # A PID may have been reused since: only stop processes whose command line names this cluster.
    ours = {
        name: int(pid) for name, pid in record.get("processes", {}).items() if _names(int(pid), state_dir)
    }
    if before is not None:
        before(ours)
    stop_processes(ours)
    record["processes"] = {}
    record_path.write_text(json.dumps(record, indent=2))
    return True
