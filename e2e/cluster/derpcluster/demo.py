"""``make demo``: a DERP fleet on a local Kubernetes, from nothing to a published, probed map.

It starts the local cluster (building it once), installs the derpfleet chart
(CRD, RBAC; the operator itself runs here as a process, since the cluster
has no images), starts ``derpfleet operator``, applies the example region,
waits until its relays are probed and Ready, and prints the DERP map with a
probe summary.  Then it keeps the fleet running until Ctrl-C (``--once``:
stop right away), and tears everything down.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .binaries import BuildError, cache_dir
from .cluster import LocalCluster, down, up
from .controlplane import ClusterError, free_port

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "region-minimal.yaml"
OPERATOR_NAMESPACE = "derpfleet-system"
READY_TIMEOUT = 180.0


def _condition(region: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (region.get("status") or {}).get("conditions") or []:
        if condition["type"] == kind:
            return dict(condition)
    return {}


def _region(cluster: LocalCluster) -> dict[str, Any]:
    found = cluster.kubectl("get", "derpregion", "lab", "-n", "default", "-o", "json", check=False)
    return dict(json.loads(found.stdout)) if found.returncode == 0 else {}


def wait_for_ready(cluster: LocalCluster) -> dict[str, Any]:
    """Follow the region's conditions until it is Ready with every relay probed; print each change."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        region = _region(cluster)
        ready, progressing = _condition(region, "Ready"), _condition(region, "Progressing")
        line = f"   Ready={ready.get('status', '?')} ({ready.get('message', 'waiting for the operator')})"
        if progressing.get("status") == "True":
            line += f"; {progressing.get('message')}"
        if line != last:
            print(line, flush=True)
            last = line
        nodes = (region.get("status") or {}).get("nodes") or []
        if ready.get("status") == "True" and nodes and all("rttMs" in n for n in nodes):
            return region
        time.sleep(1)
    raise ClusterError(f"the region was not Ready after {READY_TIMEOUT:.0f}s; last: {last.strip()}")


def summary(region: dict[str, Any]) -> str:
    rows = [("NODE", "HOST", "POD", "K8S NODE", "READY", "RTT", "LAST PROBE")]
    for node in region["status"]["nodes"]:
        rows.append(
            (
                node["name"],
                node.get("hostName", ""),
                node.get("podName", ""),
                node.get("nodeName", ""),
                "yes" if node["ready"] else f"no: {node.get('message', '')}",
                f"{node['rttMs']:.2f} ms" if "rttMs" in node else "-",
                node.get("lastProbe", "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def run(state: Path, once: bool) -> None:
    cluster = up(state)
    operator: subprocess.Popen[bytes] | None = None
    try:
        env = cluster.env()
        print(">> helm install derpfleet (CRD and RBAC; the operator runs as a local process)", flush=True)
        cluster.install_chart_without_operator(REPO / "charts" / "derpfleet", OPERATOR_NAMESPACE)
        port = free_port()
        log_path = state / "operator.log"
        print(f">> derpfleet operator (log: {log_path})", flush=True)
        with log_path.open("ab") as log:
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "derpoperator.cli",
                    "operator",
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "--map-namespace",
                    OPERATOR_NAMESPACE,
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--probe-interval",
                    "5",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        print(f">> kubectl apply -f {EXAMPLE.relative_to(REPO)}", flush=True)
        cluster.kubectl("apply", "-f", str(EXAMPLE))
        region = wait_for_ready(cluster)
        derp_map = cluster.kubectl(
            "get", "configmap", "derp-map", "-n", OPERATOR_NAMESPACE, "-o", "jsonpath={.data.derpmap\\.json}"
        ).stdout
        print("\n$ kubectl get derpregions -A")
        print(cluster.kubectl("get", "derpregions", "-A").stdout)
        print(
            f"Published DERP map (ConfigMap {OPERATOR_NAMESPACE}/derp-map, and http://127.0.0.1:{port}/derpmap.json):"
        )
        print(derp_map)
        print("Probes (STUN, a DERP packet and ping through each relay, and the mesh between them):")
        print(summary(region))
        if once:
            return
        print(
            f"\nThe fleet is running. Try:\n  export KUBECONFIG={cluster.kubeconfig}\n"
            f"  export PATH={cluster.binaries.k8s_dir}:$PATH\n"
            '  kubectl patch derpregion lab --type=merge -p \'{"spec": {"replicas": 3}}\'\n'
            f"  curl -s http://127.0.0.1:{port}/derpmap.json\nCtrl-C stops everything.",
            flush=True,
        )
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        print(">> stopping the operator and the cluster", flush=True)
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        down(cluster)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="derpfleet-demo", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument(
        "--once", action="store_true", help="print the map and stop instead of running until Ctrl-C"
    )
    parser.add_argument("--state-dir", type=Path, default=cache_dir() / "demo", help="default: $CACHE/demo")
    args = parser.parse_args()
    state: Path = args.state_dir
    if state.exists():
        down(state)  # whatever an interrupted demo left behind
        shutil.rmtree(state)
    try:
        run(state, args.once)
    except (BuildError, ClusterError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or ""
        print(
            f"demo failed: {exc}\n{detail.decode() if isinstance(detail, bytes) else detail}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
