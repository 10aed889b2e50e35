"""A local Kubernetes for tests and the demo: real control plane, fake nodes, pods as processes.

    from derpcluster import up, down
    cluster = up(state_dir)            # builds binaries on first use (cached by version)
    cluster.kubectl("get", "nodes")    # CompletedProcess[str]; check=True by default
    cluster.env()                      # KUBECONFIG and PATH (kubectl, helm) for subprocesses
    cluster.node_addresses             # {"node-a": "127.0.0.11", ...}
    down(cluster)                      # stops every process it started

The pieces: :mod:`binaries` (pinned builds), :mod:`pki`,
:mod:`controlplane` (etcd, kube-apiserver, controller-manager, scheduler),
:mod:`agent` (Nodes and the kubelet's part) with :mod:`podrunner`.
"""

from .cluster import LocalCluster, down, up

__all__ = ["LocalCluster", "down", "up"]
