"""The whole local cluster as one object: control plane plus the node agent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import binaries as binaries_module
from . import realnode
from .agent import SILENCED_NODES_FILE
from .controlplane import Cluster, ClusterError, launch, start, stop, stop_state_dir
from .images import Image
from .images import build as build_image

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NODES = {"node-a": "127.0.0.11", "node-b": "127.0.0.12", "node-c": "127.0.0.13"}
NODE_READY_TIMEOUT = 60.0


@dataclass
class LocalCluster(Cluster):
    node_addresses: dict[str, str] | None = None

    @property
    def helm(self) -> Path:
        return self.binaries.helm

    def install_chart_without_operator(self, chart: Path, namespace: str) -> None:
        """``helm install`` a derpfleet chart with no operator replicas: its CRD, RBAC and Service.

        The cluster has no container images, so the operator itself runs as a
        local process next to it (tests and the demo start it).
        """
        self.kubectl("create", "namespace", namespace)
        subprocess.run(
            [
                str(self.helm),
                "install",
                "derpfleet",
                str(chart),
                "-n",
                namespace,
                "--set",
                "replicaCount=0",
                "--wait",
                "--timeout",
                "60s",
            ],
            env=self.env(),
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def silence_node(self, name: str, silent: bool = True) -> None:
        """Make a node's kubelet play dead (the agent stops posting for it), or bring it back."""
        path = self.state_dir / "agent" / SILENCED_NODES_FILE
        names = set(path.read_text().split()) if path.exists() else set()
        names = names | {name} if silent else names - {name}
        path.write_text("".join(f"{n}\n" for n in sorted(names)))

    @property
    def pods_dir(self) -> Path:
        """Where the agent keeps each runnable pod's files and ``container.log``."""
        return self.state_dir / "agent" / "pods"


def up(
    state_dir: Path,
    nodes: dict[str, str] | None = None,
    progress: bool = True,
    real_node: bool = False,
    images: Sequence[Image] = (),
) -> LocalCluster:
    """Build (if needed) and start everything; wait until every node is Ready.

    ``nodes`` are the node agent's (default :data:`DEFAULT_NODES`; ``{}``: no
    agent); ``real_node`` adds :mod:`realnode`'s kubelet node as well, with
    ``images`` (built from their Dockerfiles, cached) in its containerd.
    """
    nodes = DEFAULT_NODES if nodes is None else nodes
    built = binaries_module.ensure()
    started = time.monotonic()
    control = start(state_dir, built, progress)
    addresses = {**nodes, **({realnode.NODE_NAME: realnode.NODE_IP} if real_node else {})}
    cluster = LocalCluster(
        control.state_dir,
        control.server,
        control.kubeconfig,
        built,
        control.processes,
        control.commands,
        node_addresses=addresses,
    )
    try:
        if nodes:
            _start_agent(cluster, nodes)
        if real_node:
            realnode.start(cluster, progress, [build_image(image) for image in images])
    except BaseException:
        down(cluster)
        raise
    if progress:
        print(
            f">> {len(addresses)} nodes ready ({', '.join(f'{n}={ip}' for n, ip in addresses.items())}); "
            f"cluster up in {time.monotonic() - started:.1f}s"
        )
    return cluster


def _start_agent(cluster: LocalCluster, nodes: dict[str, str]) -> None:
    agent_state = cluster.state_dir / "agent"
    agent_state.mkdir(exist_ok=True)
    launch(
        cluster,
        "node-agent",
        [
            sys.executable,
            "-m",
            "derpcluster.agent",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--state-dir",
            str(agent_state),
            *(f"--node={name}={ip}" for name, ip in nodes.items()),
        ],
        # The agent imports this package; tests and make find it by path, not by install.
        env={
            **cluster.env(),
            "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    _wait_for_nodes(cluster, list(nodes))


def _wait_for_nodes(cluster: LocalCluster, names: list[str]) -> None:
    deadline = time.monotonic() + NODE_READY_TIMEOUT
    while time.monotonic() < deadline:
        result = cluster.kubectl(
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Ready')].status} {end}",
            check=False,
        )
        ready = {entry.split("=")[0] for entry in result.stdout.split() if entry.endswith("=True")}
        if set(names) <= ready:
            return
        time.sleep(0.5)
    raise ClusterError(
        f"nodes {names} not Ready after {NODE_READY_TIMEOUT:.0f}s; see {cluster.log_dir}/node-agent.log"
    )


def down(cluster: Cluster | Path) -> None:
    """Stop a cluster object, or the one recorded in a state directory; a real node's leftovers go too."""
    if isinstance(cluster, Path):
        state = cluster
        stop_state_dir(state, before=lambda processes: realnode.stop(state, processes))
    else:
        realnode.stop(cluster.state_dir, cluster.processes)
        stop(cluster)
