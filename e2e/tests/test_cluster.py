"""The local cluster is a real Kubernetes: schema validation, controllers, scheduling, GC, helm.

And its node agent is a kubelet enough for our needs: pods of every kind run
on the fake nodes, a pod whose command is a local program runs as a process
bound to its node's address, sees its volumes update, becomes Ready by its
readiness probe, and gets SIGTERM when deleted.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import crd_manifest, pids_naming, wait_until
from derpcluster import LocalCluster, down, up
from kubernetes import client as k8s
from kubernetes import config as k8s_config

PAUSE_IMAGE = "registry.invalid/pause:1"
"""Never pulled: a pod whose command is not a local program is only marked running."""


def apply(cluster: LocalCluster, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))


def get(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_nodes_are_ready_on_chosen_loopback_addresses(cluster: LocalCluster) -> None:
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    with k8s.ApiClient(configuration) as api:
        nodes = k8s.CoreV1Api(api).list_node().items
    assert cluster.node_addresses is not None
    seen = {}
    for node in nodes:
        addresses = {a.type: a.address for a in node.status.addresses}
        ready = next(c.status for c in node.status.conditions if c.type == "Ready")
        seen[node.metadata.name] = (addresses["InternalIP"], addresses["ExternalIP"], ready)
        assert not node.spec.taints, node.spec.taints
    assert seen == {name: (ip, ip, "True") for name, ip in cluster.node_addresses.items()}


CRD = crd_manifest(
    "test.derpcluster.io",
    "Widget",
    "widgets",
    {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["size"],
                "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10}},
            }
        },
    },
)


def widget(name: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "test.derpcluster.io/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"size": size},
    }


def test_a_crds_schema_rejects_a_bad_object_with_the_servers_message(cluster: LocalCluster) -> None:
    apply(cluster, CRD)
    wait_until(
        "the Widget kind to be served", lambda: cluster.kubectl("get", "widgets", check=False).returncode == 0
    )
    apply(cluster, widget("fine", 3))
    bad = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(widget("huge", 99)), check=False)
    assert bad.returncode != 0
    assert "spec.size: Invalid value: 99: spec.size in body should be less than or equal to 10" in bad.stderr
    assert cluster.kubectl("get", "widget", "huge", check=False).returncode != 0


def pause_pod_template(app: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": app}},
        "spec": {"containers": [{"name": "main", "image": PAUSE_IMAGE, "command": ["/pause"]}]},
    }


def running_pods(cluster: LocalCluster, app: str) -> list[dict[str, Any]]:
    pods = get(cluster, "pods", "-l", f"app={app}")["items"]
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def test_deployments_statefulsets_and_daemonsets_run_on_the_fake_nodes(cluster: LocalCluster) -> None:
    selector = lambda app: {"matchLabels": {"app": app}}  # noqa: E731
    apply(
        cluster,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"replicas": 2, "selector": selector("web"), "template": pause_pod_template("web")},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {
                "replicas": 2,
                "serviceName": "db",
                "selector": selector("db"),
                "template": pause_pod_template("db"),
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "default"},
            "spec": {"selector": selector("agent"), "template": pause_pod_template("agent")},
        },
    )
    assert cluster.node_addresses is not None
    for app, count in (("web", 2), ("db", 2), ("agent", len(cluster.node_addresses))):
        pods = wait_until(
            f"{count} {app} pods Running and Ready",
            lambda app=app, count=count: (p := running_pods(cluster, app)) and len(p) == count and p,
        )
        for pod in pods:
            node = pod["spec"]["nodeName"]
            assert pod["status"]["podIP"] == pod["status"]["hostIP"] == cluster.node_addresses[node]
    daemons = running_pods(cluster, "agent")
    assert sorted(p["spec"]["nodeName"] for p in daemons) == sorted(cluster.node_addresses)
    assert sorted(p["metadata"]["name"] for p in running_pods(cluster, "db")) == ["db-0", "db-1"]
    wait_until(
        "the StatefulSet to count its pods ready",
        lambda: get(cluster, "statefulset", "db")["status"].get("readyReplicas") == 2,
    )
    for kind, name in (("deployment", "web"), ("statefulset", "db"), ("daemonset", "agent")):
        cluster.kubectl("delete", kind, name, "--wait=true", "--timeout=60s")


SERVER = """\
import http.server, pathlib, signal, sys
host, port = sys.argv[1].rsplit(":", 1)
root = pathlib.Path(sys.argv[2])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (root / "message").read_bytes()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def stop(*_):
    print("got SIGTERM", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("serving on", host, port, flush=True)
http.server.HTTPServer((host, int(port)), Handler).serve_forever()
"""


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


def test_the_pod_runner_serves_a_process_on_the_nodes_address(cluster: LocalCluster) -> None:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app", "namespace": "default"},
            "data": {"serve.py": SERVER, "message": "hello"},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "server", "namespace": "default"},
            "spec": {
                "nodeName": "node-b",
                "terminationGracePeriodSeconds": 10,
                "containers": [
                    {
                        "name": "main",
                        "image": PAUSE_IMAGE,
                        "command": ["python3", "/app/serve.py", ":8080", "/app"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "app", "mountPath": "/app"}],
                    }
                ],
                "volumes": [{"name": "app", "configMap": {"name": "app"}}],
            },
        },
    )
    assert cluster.node_addresses is not None
    ip = cluster.node_addresses["node-b"]
    pod = wait_until(
        "the server pod Ready",
        lambda: (
            (p := get(cluster, "pod", "server"))
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
            and p
        ),
    )
    assert pod["status"]["podIP"] == ip
    assert fetch(f"http://{ip}:8080/") == "hello"
    cluster.kubectl("patch", "configmap", "app", "--type=merge", "-p", '{"data": {"message": "updated"}}')
    wait_until("the volume to show the new message", lambda: fetch(f"http://{ip}:8080/") == "updated")

    logs = list(cluster.pods_dir.glob("default_server_*/container.log"))
    assert len(logs) == 1
    cluster.kubectl("delete", "pod", "server", "--wait=true", "--timeout=30s")
    assert cluster.kubectl("get", "pod", "server", check=False).returncode != 0
    assert "got SIGTERM" in logs[0].read_text()
    with pytest.raises(OSError):
        fetch(f"http://{ip}:8080/")


def test_the_garbage_collector_follows_owner_references(cluster: LocalCluster) -> None:
    apply(
        cluster,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": "default"}},
    )
    uid = get(cluster, "configmap", "owner")["metadata"]["uid"]
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "namespace": "default",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    apply(cluster, owned)
    cluster.kubectl("delete", "configmap", "owner")
    wait_until(
        "the owned ConfigMap collected",
        lambda: cluster.kubectl("get", "configmap", "owned", check=False).returncode != 0,
    )


def test_helm_renders_a_chart(cluster: LocalCluster, tmp_path: Path) -> None:
    version = subprocess.run(
        [str(cluster.helm), "version", "--short"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith(cluster.binaries.helm_version.split("-")[0])
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hi\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: tiny}\ndata: {greeting: {{ .Values.greeting | quote }}}\n"
    )
    rendered = subprocess.run(
        [str(cluster.helm), "template", "t", str(chart), "--set", "greeting=hello"],
        capture_output=True,
        text=True,
        check=True,
        env=cluster.env(),
    )
    assert yaml.safe_load(rendered.stdout.split("---", 2)[-1])["data"] == {"greeting": "hello"}


def listening_ports(pids: list[int]) -> list[str]:
    """TCP ports in LISTEN owned by these processes (from /proc: socket inodes matched to /proc/net/tcp*)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1])
    return found


def test_a_cluster_stops_without_leaving_a_process_or_a_port(tmp_path: Path) -> None:
    state = tmp_path / "second"
    second = up(state, nodes={"node-x": "127.0.0.21"}, progress=False)
    pids = pids_naming(str(state))
    assert len(pids) >= 5, pids  # etcd, apiserver, controller-manager, scheduler, agent
    assert listening_ports(pids)
    down(second)
    assert pids_naming(str(state)) == []
    assert listening_ports(pids) == []
