"""A real Kubernetes node: kubelet, containerd, runc and the CNI plugins, in a network namespace of its own.

Why a namespace of its own: a CNI ``portmap`` hostPort without a hostIP
captures that port on every local address, 127.0.0.1 included, which would
steal ports from other programs on this machine.  Here the node (containerd,
the CNI plugins it runs, the kubelet) lives in the network namespace
:data:`NETNS`, whose only local addresses are its loopback and
:data:`NODE_IP`; the host reaches it over one veth pair (:data:`HOST_IP` on
the host end).  The bridge, the pods' veths, every iptables chain (CNI-*,
KUBE-*) and ``ip_forward`` are the namespace's, and go away with it; the
host's are never touched.  Pods get addresses from :data:`POD_CIDR`, which
exists only inside the namespace.  The kubelet reaches the API server through
:mod:`tcpforward` on the host end of the link, and so do its pods: the node's namespace DNATs the
``kubernetes`` Service's ClusterIP to that forwarder, the one rule of
kube-proxy's job that pods here need (:func:`_route_kubernetes_service`).

What the node leaves outside the namespace, and :func:`stop` removes: its
processes (containerd's shims and containers included), the cgroups under
:data:`CGROUP_ROOT`, mounts under its directory, ``/run/netns/<NETNS>``, the
CNI result cache entries of its network in ``/var/lib/cni`` and
``/run/containerd`` and ``/run/netns`` (when it made them); the kernel settings the kubelet
changes at start (:data:`KERNEL_TUNABLES`) are put back.  Pod logs go to its own directory,
not ``/var/log/pods``.

The node is tainted (:data:`TAINT_KEY`): only pods that tolerate it run on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import binaries, oci, pki
from .controlplane import (
    KUBERNETES_SERVICE_IP,
    Cluster,
    ClusterError,
    free_port,
    launch,
    stop_processes,
    write_kubeconfig,
)

NODE_NAME = "node-real"
NETNS = "derpcluster-node"
HOST_LINK = "dcnode0"
"""The host end of the node's veth pair (the other end is ``eth0`` in :data:`NETNS`)."""
HOST_IP = "198.18.0.1"
NODE_IP = "198.18.0.2"
LINK_PREFIX = 30
POD_CIDR = "198.19.0.0/24"
"""198.18.0.0/15 is set aside for network tests (RFC 2544): not the Internet, not a LAN's."""
CGROUP_ROOT = "derpcluster-node"
TAINT_KEY = "derpcluster.io/real-node"
NODE_LABEL = "derpcluster.io/node"
CNI_NETWORK = "derpcluster-node"
SANDBOX_IMAGE = "derpcluster.local/pause:1"
ECHO_IMAGE = "derpcluster.local/echoserver:1"
RECORD = "realnode.json"
READY_TIMEOUT = 120.0
IMPORT_TIMEOUT = 300.0
"""Unpacking a few hundred megabytes of image on a busy 2-core machine."""
CNI_BIN_DIR = Path("/usr/lib/cni")
"""Where Debian's containernetworking-plugins puts bridge, portmap, host-local, loopback."""
RUN_CONTAINERD = Path("/run/containerd")
"""containerd 1.6 puts its shims' sockets here whatever its state directory."""
RUN_NETNS = Path("/run/netns")
"""``ip netns add`` makes it (a mount point of itself) when it is missing."""
VAR_LIB_CNI = Path("/var/lib/cni")
"""The CNI library's result cache; containerd 1.6 does not let it move."""
PROCESS_NAMES = ("node-apiserver-forward", "containerd", "kubelet")
"""What :func:`start` launches, in order; :func:`stop` ends them in reverse."""
KERNEL_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
"""Machine-wide sysctls the kubelet sets to its liking at start; :func:`stop` puts the machine's back."""
INSTALL_HINT = "make installs them (e2e/cluster/install-node-packages)"


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _in_netns(*argv: str) -> list[str]:
    """Enter only the node's network namespace: mounts stay shared with the host, as a node's are."""
    return ["nsenter", f"--net={RUN_NETNS / NETNS}", "--", *argv]


def node_dir(state_dir: Path) -> Path:
    return state_dir / "node"


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the real node needs root (network namespaces, cgroups, mounts)")
    missing = [p for p in ("containerd", "runc", "ctr", "iptables", "nsenter", "ip") if not shutil.which(p)]
    missing += [p for p in ("bridge", "portmap", "host-local", "loopback") if not (CNI_BIN_DIR / p).exists()]
    if missing:
        raise ClusterError(f"the real node needs {', '.join(missing)}; {INSTALL_HINT}")


# --- the network -----------------------------------------------------------------------------


def _create_network() -> None:
    _run("ip", "netns", "add", NETNS)
    _run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "eth0", "netns", NETNS)
    _run("ip", "addr", "add", f"{HOST_IP}/{LINK_PREFIX}", "dev", HOST_LINK)
    _run("ip", "link", "set", HOST_LINK, "up")
    for argv in (
        ("ip", "addr", "add", f"{NODE_IP}/{LINK_PREFIX}", "dev", "eth0"),
        ("ip", "link", "set", "eth0", "up"),
        ("ip", "link", "set", "lo", "up"),
        # The namespace's own forwarding switch: the host's stays as it is.
        ("sysctl", "-q", "-w", "net.ipv4.ip_forward=1"),
    ):
        _run(*_in_netns(*argv))
    # The host reaches pods at their own addresses, as a cluster's machines route each node's pod range.
    _run("ip", "route", "add", POD_CIDR, "via", NODE_IP, "dev", HOST_LINK)


def _cni_config(directory: Path) -> None:
    config = {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                # Pods reach the host's end of the link as the node's address, like a node's SNAT.
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(directory / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (directory / "net.d").mkdir(parents=True, exist_ok=True)
    (directory / "net.d" / "10-derpcluster.conflist").write_text(json.dumps(config, indent=2))


def _route_kubernetes_service(cluster: Cluster, forward_port: int) -> None:
    """Pods reach the API server at the ``kubernetes`` Service, as kube-proxy would let them.

    Pods find the API server the way every in-cluster client does: the
    kubelet gives them ``KUBERNETES_SERVICE_HOST``/``_PORT``, the Service's
    ClusterIP and port, and a projected ServiceAccount token.  No kube-proxy
    runs here, so one DNAT rule in the node's namespace sends that ClusterIP
    and port to the forwarder the kubelet uses (the API server's own address,
    127.0.0.1, is not reachable from the namespace); the bridge's masquerade
    makes the node's address the source.  TLS goes end to end: the API
    server's certificate names the ClusterIP.  The rule lives and dies with
    the namespace.
    """
    service = json.loads(
        cluster.kubectl("get", "service", "kubernetes", "-n", "default", "-o", "json").stdout
    )
    cluster_ip = service["spec"]["clusterIP"]
    if cluster_ip != KUBERNETES_SERVICE_IP:
        raise ClusterError(
            f"the kubernetes Service has ClusterIP {cluster_ip}, but the API server's certificate "
            f"names {KUBERNETES_SERVICE_IP}"
        )
    (port,) = (p["port"] for p in service["spec"]["ports"] if p["name"] == "https")
    rule = ["-d", f"{cluster_ip}/32", "-p", "tcp", "--dport", str(port)]
    rule += ["-m", "comment", "--comment", "default/kubernetes:https"]
    rule += ["-j", "DNAT", "--to-destination", f"{HOST_IP}:{forward_port}"]
    _run(*_in_netns("iptables", "-t", "nat", "-A", "PREROUTING", *rule))


# --- containerd and the kubelet ------------------------------------------------------------------


def containerd_socket(state_dir: Path) -> Path:
    return node_dir(state_dir) / "containerd.sock"


def _containerd_config(directory: Path, socket: Path) -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    text = f"""version = 2
root = "{directory / "root"}"
state = "{directory / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{directory / "opt"}"

[{cri}]
  sandbox_image = "{SANDBOX_IMAGE}"
  # root here cannot lower oom_score_adj: without this every sandbox fails to start
  # ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  # Pod network namespaces under the state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{directory / "cni" / "net.d"}"
  max_conf_num = 1

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{directory / "runc"}"
"""
    path = directory / "containerd.toml"
    path.write_text(text)
    return path


def _kubelet_config(directory: Path, socket: Path, pki_dir: Path) -> Path:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This machine has cgroup v1, which v1.37 refuses unless told otherwise.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "containerRuntimeEndpoint": f"unix://{socket}",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "tlsCertFile": str(pki_dir / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki_dir / "kubelet.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki_dir / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "failSwapOn": False,
        "cpuManagerPolicy": "none",
        "memoryManagerPolicy": "None",
        "podLogsDir": str(directory / "pod-logs"),
        "registerWithTaints": [{"key": TAINT_KEY, "effect": "NoSchedule"}],
        # The test machine's disk is shared: no evictions or image GC for a disk that is merely full-ish.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # Mounted Secrets and ConfigMaps follow their objects within seconds, not a minute.
        "syncFrequency": "5s",
        "serializeImagePulls": False,
    }
    path = directory / "kubelet.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def _node_pki(ca: pki.CertificateAuthority, directory: Path) -> Path:
    """The kubelet's serving certificate, and the CA it checks clients (the API server) against."""
    pki_dir = directory / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    (pki_dir / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue(NODE_NAME, dns_names=(NODE_NAME,), ips=(NODE_IP,), server=True).write(pki_dir, "kubelet")
    return pki_dir


def _images(directory: Path, programs: Path) -> list[Path]:
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    made = []
    for reference, program in ((SANDBOX_IMAGE, "pause"), (ECHO_IMAGE, "echoserver")):
        archive = images / f"{program}.tar"
        oci.write_image(archive, reference, {program: programs / program}, [f"/{program}"])
        made.append(archive)
    return made


def ctr(
    state_dir: Path, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``ctr`` against this node's containerd, in the namespace the CRI uses."""
    socket = str(containerd_socket(state_dir))
    return _run("ctr", "--address", socket, "-n", "k8s.io", *args, check=check, timeout=timeout)


def _wait_for(what: str, check: Any, cluster: Cluster, log: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for name in PROCESS_NAMES:
            pid = cluster.processes.get(name)
            if pid is not None and not Path(f"/proc/{pid}").exists():
                raise ClusterError(
                    f"{name} exited while waiting for {what}; see {cluster.log_dir}/{name}.log"
                )
        if check():
            return
        time.sleep(0.5)
    raise ClusterError(f"{what} not reached after {READY_TIMEOUT:.0f}s; see {cluster.log_dir}/{log}.log")


def start(cluster: Cluster, progress: bool = True, image_archives: Sequence[Path] = ()) -> None:
    """Bring the node up on the running control plane and wait until it is Ready.

    ``image_archives`` are imported into its containerd beside its own images.
    """
    say = print if progress else (lambda *_: None)
    check_prerequisites()
    sweep_leftovers()
    started = time.monotonic()
    directory = node_dir(cluster.state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "run_containerd_existed": RUN_CONTAINERD.exists(),
        "var_lib_cni_existed": VAR_LIB_CNI.exists(),
        "run_netns_existed": RUN_NETNS.exists(),
        "kernel_tunables": kernel_tunables(),
    }
    (cluster.state_dir / RECORD).write_text(json.dumps(record))
    kubelet = binaries.ensure_kubelet()
    programs = binaries.ensure_node_programs()
    _create_network()
    _create_cgroups()
    _cni_config(directory / "cni")
    ca = pki.CertificateAuthority.load(cluster.state_dir / "pki")
    pki_dir = _node_pki(ca, directory)
    socket = containerd_socket(cluster.state_dir)

    forward_port = free_port()
    api_port = cluster.server.rsplit(":", 1)[1]
    launch(
        cluster,
        "node-apiserver-forward",
        [
            sys.executable,
            "-m",
            "derpcluster.tcpforward",
            f"{HOST_IP}:{forward_port}",
            f"127.0.0.1:{api_port}",
            f"--cluster={cluster.state_dir}",
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    _route_kubernetes_service(cluster, forward_port)
    kubeconfig = write_kubeconfig(
        directory / "kubelet.kubeconfig",
        f"https://{HOST_IP}:{forward_port}",
        ca.cert_pem,
        ca.issue(f"system:node:{NODE_NAME}", groups=("system:nodes",)),
        NODE_NAME,
        tls_server_name="kubernetes",
    )
    say(f">> containerd {_version('containerd')} and runc in network namespace {NETNS} ({NODE_IP})")
    launch(
        cluster, "containerd", _in_netns("containerd", "--config", str(_containerd_config(directory, socket)))
    )
    _wait_for(
        "containerd's socket",
        lambda: ctr(cluster.state_dir, "version", check=False).returncode == 0,
        cluster,
        "containerd",
    )
    for archive in [*_images(directory, programs), *image_archives]:
        ctr(cluster.state_dir, "images", "import", str(archive), timeout=IMPORT_TIMEOUT)
    say(f">> kubelet {cluster.binaries.k8s_version} as {NODE_NAME}")
    launch(
        cluster,
        "kubelet",
        _in_netns(
            str(kubelet),
            "--config",
            str(_kubelet_config(directory, socket, pki_dir)),
            "--kubeconfig",
            str(kubeconfig),
            "--root-dir",
            str(directory / "kubelet"),
            "--hostname-override",
            NODE_NAME,
            "--node-ip",
            NODE_IP,
            "--node-labels",
            f"{NODE_LABEL}=real",
            "--v",
            "1",
        ),
    )

    def ready() -> bool:
        result = cluster.kubectl(
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False,
        )
        return result.stdout.strip() == "True"

    _wait_for(f"node {NODE_NAME} Ready", ready, cluster, "kubelet")
    say(f">> real node {NODE_NAME} Ready at {NODE_IP} in {time.monotonic() - started:.1f}s")


def _version(program: str) -> str:
    result = _run(program, "--version", check=False)
    words = result.stdout.split()
    return words[2] if len(words) > 2 else "?"


# --- stopping and cleaning up ----------------------------------------------------------------------


def stop(state_dir: Path, processes: dict[str, int]) -> None:
    """Stop the node's processes (popped from ``processes``) and remove everything it made.

    The kubelet goes first, so it restarts nothing; then every container is
    killed through containerd (the shims live outside containerd's process
    group); then containerd and the forwarder; then the sweep.
    """
    record_path = state_dir / RECORD
    if not record_path.exists():
        return
    record = json.loads(record_path.read_text())
    if "kubelet" in processes:
        stop_processes({"kubelet": processes.pop("kubelet")})
    if "containerd" in processes:
        with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
            for task in ctr(state_dir, "tasks", "list", "-q").stdout.split():
                ctr(state_dir, "tasks", "delete", "--force", task, check=False)
            for container in ctr(state_dir, "containers", "list", "-q").stdout.split():
                ctr(state_dir, "containers", "delete", container, check=False)
    stop_processes({name: processes.pop(name) for name in PROCESS_NAMES[::-1] if name in processes})
    _kill_shims(containerd_socket(state_dir))
    sweep_leftovers()
    _unmount_under(node_dir(state_dir))
    # Unpacked images and container state: hundreds of megabytes, of no use once the node is gone.
    for scratch in ("root", "state", "runc", "kubelet"):
        shutil.rmtree(node_dir(state_dir) / scratch, ignore_errors=True)
    _remove_cni_cache(record)
    if not record["run_containerd_existed"]:
        shutil.rmtree(RUN_CONTAINERD, ignore_errors=True)
    if not record["run_netns_existed"] and RUN_NETNS.is_dir() and not any(RUN_NETNS.iterdir()):
        # A mount of itself (same device): Path.is_mount cannot tell, the mount table can.
        while str(RUN_NETNS) in _mount_points():
            _run("umount", str(RUN_NETNS))
        RUN_NETNS.rmdir()
    for name, value in record["kernel_tunables"].items():
        Path("/proc/sys", name).write_text(value)
    record_path.unlink()


def kernel_tunables() -> dict[str, str]:
    return {name: Path("/proc/sys", name).read_text().strip() for name in KERNEL_TUNABLES}


def sweep_leftovers() -> None:
    """Whatever a node of ours left on the machine: its processes in its cgroups, the cgroups, the namespace.

    Only one cluster with a real node runs at a time on a machine (the tests
    take a lock), so anything under these names is ours.
    """
    for root in cgroup_roots():
        _remove_cgroup_tree(root)
    if (RUN_NETNS / NETNS).exists():
        _run("ip", "netns", "delete", NETNS, check=False)
    if Path(f"/sys/class/net/{HOST_LINK}").exists():
        _run("ip", "link", "delete", HOST_LINK, check=False)


def _cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, the named systemd one, a v2 ``unified``)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[4]))
    return mounts


def cgroup_roots() -> list[Path]:
    return [mount / CGROUP_ROOT for mount in _cgroup_mounts() if (mount / CGROUP_ROOT).is_dir()]


def _create_cgroups() -> None:
    """The kubelet wants its cgroup root to exist in every hierarchy; it makes kubepods below it."""
    for mount in _cgroup_mounts():
        with contextlib.suppress(OSError):
            (mount / CGROUP_ROOT).mkdir(exist_ok=True)


def _remove_cgroup_tree(root: Path) -> None:
    for _ in range(50):
        groups = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for group in [*groups, root]:
            with contextlib.suppress(OSError, ValueError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                group.rmdir()
        if not root.exists():
            return
        time.sleep(0.1)
    raise ClusterError(f"could not remove cgroup {root}")


def _kill_shims(socket: Path) -> None:
    """containerd's shims for this node, should any outlive their tasks."""
    needle = str(socket).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"containerd-shim" in cmdline and needle in cmdline:
                    os.kill(int(entry.name), signal.SIGKILL)


def _mount_points() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def _unmount_under(directory: Path) -> None:
    """Pod volumes (tmpfs), rootfs overlays, sandbox namespaces: every mount left under the node's directory."""
    prefix = str(directory.resolve()) + "/"
    for mount_point in sorted({m for m in _mount_points() if m.startswith(prefix)}, key=len, reverse=True):
        _run("umount", "--lazy", mount_point, check=False)


def _remove_cni_cache(record: dict[str, Any]) -> None:
    if not record["var_lib_cni_existed"]:
        shutil.rmtree(VAR_LIB_CNI, ignore_errors=True)
        return
    for cached in VAR_LIB_CNI.glob(f"results/{CNI_NETWORK}-*"):
        cached.unlink(missing_ok=True)
