"""``python -m derpcluster up|down|status``: the cluster for ``make cluster-up`` / ``make cluster-down``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import images
from .binaries import BuildError, cache_dir, ensure, ensure_kubelet, ensure_node_programs
from .cluster import down, up
from .controlplane import PROCESSES_FILE, ClusterError


def main() -> int:
    parser = argparse.ArgumentParser(prog="derpcluster", description="A local Kubernetes on loopback.")
    parser.add_argument("command", choices=["build", "up", "down"], help="build: only the cached binaries")
    parser.add_argument(
        "--real-node", action="store_true", help="up: add a real kubelet node (root; containerd, runc, CNI)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=cache_dir() / "cluster", help="default: $CACHE/cluster"
    )
    args = parser.parse_args()
    state: Path = args.state_dir
    if args.command == "build":
        try:
            built = ensure()
            ensure_kubelet()
            ensure_node_programs()
            for image in (images.RELAY, images.OPERATOR):
                images.build(image)
        except BuildError as exc:
            print(f"derpcluster: {exc}", file=sys.stderr)
            return 1
        print(
            f">> Kubernetes {built.k8s_version} (and its kubelet), etcd {built.etcd_version}, "
            f"helm {built.helm_version}, the relay and operator images ready"
        )
        return 0
    if args.command == "down":
        if not down_recorded(state):
            print(f"no cluster recorded in {state}")
        return 0
    if (state / PROCESSES_FILE).exists():
        down(state)  # a cluster left from before: never two on one state directory
    try:
        cluster = up(state, real_node=args.real_node)
    except (BuildError, ClusterError) as exc:
        print(f"derpcluster: {exc}", file=sys.stderr)
        return 1
    print(f"\nexport KUBECONFIG={cluster.kubeconfig}")
    print(f"export PATH={cluster.binaries.k8s_dir}:{cluster.helm.parent}:$PATH")
    print("stop it with: make cluster-down")
    return 0


def down_recorded(state: Path) -> bool:
    if not (state / PROCESSES_FILE).exists():
        return False
    down(state)
    print(f"stopped the cluster in {state}")
    return True


if __name__ == "__main__":
    sys.exit(main())
