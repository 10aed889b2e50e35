"""The node agent: fake Nodes on loopback addresses, and a kubelet's part for their pods.

Why ours and not kwok: kwok writes pod status too, and would fight the pod
runner over it; one agent doing both is what a kubelet is.  It

* registers Nodes (``node-a``…) whose InternalIP and ExternalIP are the
  loopback addresses we choose (all of 127/8 reaches ``lo`` on Linux), with
  capacity, a Ready condition, and Lease heartbeats so the node lifecycle
  controller never taints them;
* for every pod bound to one of them: runs it (see :mod:`podrunner`) when
  its command is a local program, otherwise marks it running at once; keeps
  its status like a kubelet (phase, IPs = the node's address as with
  hostNetwork, conditions, container status, restarts);
* on deletion: SIGTERM, the grace period, SIGKILL, then removes the pod
  object (grace 0), as a kubelet finishes a graceful delete;
* for a node named in ``<state-dir>/silenced-nodes``, plays a dead kubelet:
  no heartbeat, no pod status, no restarts, no new pods, while the processes
  it already runs there go on (the node lifecycle controller then marks the
  node NotReady and its pods not ready, as for a real one).

Run it as ``python -m derpcluster.agent --kubeconfig … --state-dir … --node
node-a=127.0.0.11 …``; SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from .podrunner import Obj, RunningPod, runnable

log = logging.getLogger("derpcluster.agent")

HEARTBEAT_INTERVAL = 5.0
TICK = 0.5
VOLUME_SYNC_INTERVAL = 2.0
SILENCED_NODES_FILE = "silenced-nodes"
"""Names of nodes whose kubelet is to play dead, one a line; tests write it."""
NODE_CAPACITY = {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    """``metav1.MicroTime``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Agent:
    def __init__(self, api: k8s.ApiClient, nodes: Mapping[str, str], state_dir: Path) -> None:
        self.core = k8s.CoreV1Api(api)
        self.coordination = k8s.CoordinationV1Api(api)
        self.api = api
        self.nodes = dict(nodes)
        self.state_dir = state_dir
        self.pods: dict[str, Obj] = {}
        """uid -> the pod as last seen."""
        self.running: dict[str, RunningPod] = {}
        self.reported: dict[str, Any] = {}
        self.terminating: set[str] = set()
        self.pending: set[str] = set()
        """Pods waiting for a Secret or ConfigMap their volumes need."""
        self.events: queue.Queue[tuple[str, Obj]] = queue.Queue()
        self.stop = threading.Event()
        self._last_volume_sync = 0.0
        self._silenced: set[str] = set()
        self._repost: set[str] = set()
        """Pods whose status a revived node's kubelet posts again on its next tick."""

    # --- nodes --------------------------------------------------------------------------

    def silenced(self) -> set[str]:
        """Nodes whose kubelet plays dead now; pods of a node leaving the list have their status posted afresh."""
        try:
            names = set((self.state_dir / SILENCED_NODES_FILE).read_text().split())
        except FileNotFoundError:
            names = set()
        revived, self._silenced = self._silenced - names, names
        for uid, pod in self.pods.items():
            if pod["spec"].get("nodeName") in revived:
                self.reported.pop(uid, None)
                self._repost.add(uid)
        return names

    def _node_status(self, ip: str) -> Obj:
        now = _now()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "derpcluster agent is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        return {
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "ExternalIP", "address": ip},
                {"type": "Hostname", "address": ip},
            ],
            "capacity": NODE_CAPACITY,
            "allocatable": NODE_CAPACITY,
            "conditions": [ready],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v0.0.0-derpcluster",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "derpcluster://local-processes",
                "kernelVersion": "",
                "osImage": "derpcluster",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }

    def register_nodes(self) -> None:
        for name, ip in self.nodes.items():
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "derpcluster.io/agent": "true",
                    },
                },
            }
            with contextlib.suppress(k8s.ApiException):
                self.core.create_node(body)  # type: ignore[arg-type]  # the client accepts plain JSON
            self.core.patch_node_status(name, {"status": self._node_status(ip)})
            log.info("node %s registered at %s", name, ip)
        self.heartbeat()

    def heartbeat(self) -> None:
        """Renew each node's Lease and Ready condition, so the node lifecycle controller keeps them Ready."""
        silenced = self.silenced()
        for name, ip in self.nodes.items():
            if name in silenced:
                continue
            renew = {"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}}
            try:
                self.coordination.patch_namespaced_lease(name, "kube-node-lease", renew)
            except k8s.ApiException as exc:
                if exc.status != 404:
                    log.warning("lease of %s: %s", name, exc.reason)
                lease = {"metadata": {"name": name, "namespace": "kube-node-lease"}, **renew}
                with contextlib.suppress(k8s.ApiException):
                    self.coordination.create_namespaced_lease("kube-node-lease", lease)  # type: ignore[arg-type]
            try:
                self.core.patch_node_status(
                    name, {"status": {"conditions": self._node_status(ip)["conditions"]}}
                )
            except k8s.ApiException as exc:
                log.warning("status of node %s: %s", name, exc.reason)

    # --- watching ------------------------------------------------------------------------

    def watch_pods(self) -> None:
        """Feed pod events to the main loop, re-listing after any watch error."""
        while not self.stop.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces()
                for pod in self.api.sanitize_for_serialization(listing.items):
                    self.events.put(("SYNC", pod))
                watcher = k8s_watch.Watch()
                for event in watcher.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=listing.metadata.resource_version if listing.metadata else None,
                    timeout_seconds=60,
                ):
                    self.events.put((event["type"], self.api.sanitize_for_serialization(event["object"])))
                    if self.stop.is_set():
                        watcher.stop()
            except Exception as exc:
                if not self.stop.is_set():
                    log.info("pod watch restarts: %s", exc)
                    time.sleep(1)

    def _get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            found: k8s.V1Secret | k8s.V1ConfigMap
            if kind == "Secret":
                found = self.core.read_namespaced_secret(name, namespace)
            else:
                found = self.core.read_namespaced_config_map(name, namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api.sanitize_for_serialization(found))

    # --- pods --------------------------------------------------------------------------

    def _pod_dir(self, pod: Obj) -> Path:
        meta = pod["metadata"]
        return self.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def handle(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.nodes or node in self._silenced:
            return
        if kind == "DELETED":
            self.pods.pop(uid, None)
            self.pending.discard(uid)
            self.reported.pop(uid, None)
            if running := self.running.pop(uid, None):
                running.stop(0)
            return
        self.pods[uid] = pod
        if running := self.running.get(uid):
            running.pod = pod
            if uid in self.reported and _ready_condition(pod) != running.ready:
                # Someone else wrote our pod's readiness (the node lifecycle controller marks pods
                # not ready when their node went NotReady): as a kubelet, post ours again.
                self.reported.pop(uid)
                self._repost.add(uid)
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(pod)
            return
        if uid not in self.running and uid not in self.reported:
            self._admit(pod)

    def _admit(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        ip = self.nodes[pod["spec"]["nodeName"]]
        program = runnable(pod, os.environ.get("PATH", ""))
        if program is not None:
            root = self._pod_dir(pod)
            root.mkdir(parents=True, exist_ok=True)
            running = RunningPod(pod, ip, root, program, get=self._get, agent_env=os.environ)
            problem = running.sync_volumes()
            if problem:
                self.pending.add(uid)
                self._report(pod, waiting=("ContainerCreating", problem))
                return
            self.pending.discard(uid)
            running.start()
            self.running[uid] = running
            log.info(
                "pod %s/%s runs %s on %s", pod["metadata"]["namespace"], pod["metadata"]["name"], program, ip
            )
        self._report(pod)

    def _terminate(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.terminating:
            return
        self.terminating.add(uid)
        grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        running = self.running.pop(uid, None)

        def finish() -> None:
            if running is not None:
                running.stop(grace)
            meta = pod["metadata"]
            with contextlib.suppress(k8s.ApiException):
                # Grace goes in the body: a DELETE with a body ignores the query parameter.
                self.core.delete_namespaced_pod(
                    meta["name"],
                    meta["namespace"],
                    body=k8s.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=uid)
                    ),
                )
            log.info("pod %s/%s stopped and removed", meta["namespace"], meta["name"])
            self.terminating.discard(uid)

        threading.Thread(target=finish, name=f"stop {pod['metadata']['name']}", daemon=True).start()

    def _report(self, pod: Obj, waiting: tuple[str, str] | None = None) -> None:
        """Patch the pod's status when what a kubelet would report changed."""
        uid = pod["metadata"]["uid"]
        ip = self.nodes[pod["spec"]["nodeName"]]
        running = self.running.get(uid)
        now = _now()
        if waiting is not None:
            state: Obj = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
            ready = False
        elif running is not None and running.crashed:
            code, tail = running.last_exit or (0, "")
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"exited with code {code}: {tail}"}}
            ready = False
        else:
            state = {"running": {"startedAt": running.started_at if running else now}}
            ready = running.ready if running else True
        restarts = running.restart_count if running else 0
        key = json.dumps([state, ready, restarts], sort_keys=True)
        if self.reported.get(uid) == key:
            return
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
        for condition in conditions:
            condition["lastTransitionTime"] = now
        status = {
            "phase": "Running" if waiting is None else "Pending",
            "hostIP": ip,
            "hostIPs": [{"ip": ip}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": pod.get("status", {}).get("startTime") or now,
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "containerID": f"derpcluster://{uid[:8]}-{c['name']}",
                    "ready": ready,
                    "started": waiting is None,
                    "restartCount": restarts,
                    "state": state,
                }
                for c in pod["spec"]["containers"]
            ],
        }
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except k8s.ApiException as exc:
            if exc.status != 404:
                log.warning("status of pod %s/%s: %s", meta["namespace"], meta["name"], exc.reason)
            return
        self.reported[uid] = key

    def tick(self) -> None:
        sync = time.monotonic() - self._last_volume_sync >= VOLUME_SYNC_INTERVAL
        if sync:
            self._last_volume_sync = time.monotonic()
        silenced = self.silenced()
        for uid, running in list(self.running.items()):
            if running.pod["spec"].get("nodeName") in silenced:
                continue
            if sync:
                with contextlib.suppress(k8s.ApiException):
                    running.sync_volumes()
            if running.tick() or uid in self._repost:
                self._repost.discard(uid)
                self._report(running.pod)
        for uid in list(self.pending):
            pod = self.pods.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                self.pending.discard(uid)
            elif sync:
                self._admit(pod)

    def run(self) -> None:
        self.register_nodes()
        threading.Thread(target=self.watch_pods, name="pod watch", daemon=True).start()
        next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        while not self.stop.is_set():
            try:
                with contextlib.suppress(queue.Empty):
                    while True:
                        kind, pod = self.events.get(timeout=TICK)
                        self.handle(kind, pod)
                self.tick()
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
                    self.heartbeat()
            except (k8s.ApiException, urllib3.exceptions.HTTPError) as exc:
                # As a kubelet: an API server that is down or restarting is waited for, pods keep running;
                # the pod watch re-lists once it is back, so a lost event is seen again.
                log.warning("API server unreachable, retrying: %s", exc)
                time.sleep(1)
        for running in self.running.values():
            running.stop(5)


def _ready_condition(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def parse_nodes(values: list[str]) -> dict[str, str]:
    nodes = {}
    for value in values:
        name, sep, ip = value.partition("=")
        if not sep or not ip.startswith("127."):
            raise SystemExit(f"--node {value!r}: expected NAME=127.x.y.z (loopback only)")
        nodes[name] = ip
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Fake Kubernetes nodes on loopback that run pods as local processes."
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--node", action="append", required=True, metavar="NAME=IP")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    agent = Agent(k8s.ApiClient(configuration), parse_nodes(args.node), args.state_dir)

    def shut_down(*_: object) -> None:
        # Pods get SIGTERM at once, before the loop notices: if the agent is then killed
        # while its API calls hang on a stopped server, no pod outlives it.
        agent.stop.set()
        for running in list(agent.running.values()):
            running.terminate()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    agent.run()


if __name__ == "__main__":
    main()
