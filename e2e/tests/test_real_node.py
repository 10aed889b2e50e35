"""The real node: a kubelet with containerd, runc and CNI, registered with the real control plane.

Its own cluster (no fake nodes), started for this module: the node is
Ready with a stamped kubelet version; a pod reaches the API server at the
``kubernetes`` Service with the token the kubelet projected; a pod runs in a container from an
image built here, under the securityContext it asks for, with a ConfigMap
the kubelet mounts and updates; its hostPort is reached from the host at the
node's address, and the pod sees the client's own address (no masquerade);
loopback ports of this machine are not captured; ``kubectl logs`` goes
through the kubelet.  The relay image serves DERP over TLS and STUN through
hostPorts 443 and 3478; and a DerpRegion run by the operator from its own
rendering lands on the node, passes the operator's probes, and tells a
client ``Restarting`` when the kubelet stops it.  Stopping the cluster
leaves nothing behind: no process, cgroup, mount, namespace, link, iptables
chain, CNI state, /run/containerd or /var/log/pods; ip_forward and the
kernel settings the kubelet changes as they were.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    ON_THE_REAL_NODE,
    OPERATOR_NAMESPACE,
    REAL_NODE_REGION,
    REPO,
    Kubectl,
    OperatorProcess,
    condition,
    free_port,
    pids_naming,
    token_kubeconfig,
    wait_until,
)
from derpcluster import LocalCluster, down, images, realnode, up
from derpcluster.controlplane import KUBERNETES_SERVICE_IP
from derprelay import frames, stun
from derprelay.certs import CertMaterial, generate_self_signed
from derprelay.client import Endpoint, connect
from derprelay.keys import MeshKey, NodePrivateKey

HOST_PORT = 18080
"""Bound by portmap in the node's namespace only; the test also listens on it at 127.0.0.1."""
pytestmark = pytest.mark.timeout(300)


def host_state(state_dir: Path) -> dict[str, Any]:
    """What of the machine the node could touch, as far as it is the node's business."""
    chains = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    return {
        "iptables chains": sorted(
            line.split()[0] for line in chains.splitlines() if line.startswith((":KUBE-", ":CNI-"))
        ),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "kernel tunables": realnode.kernel_tunables(),
        "netns": (realnode.RUN_NETNS / realnode.NETNS).exists(),
        "/run/netns": realnode.RUN_NETNS.exists(),
        "link": Path(f"/sys/class/net/{realnode.HOST_LINK}").exists(),
        "cgroups": [str(p) for p in realnode.cgroup_roots()],
        "mounts under the cluster": str(state_dir) in mounts,
        "/run/containerd": realnode.RUN_CONTAINERD.exists(),
        "/var/lib/cni": realnode.VAR_LIB_CNI.exists(),
        "/var/log/pods": Path("/var/log/pods").exists(),
        "processes": pids_naming(str(state_dir)),
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, dict[str, Any]]]:
    state = tmp_path_factory.mktemp("realnode")
    before = host_state(state)
    cluster = up(state, nodes={}, progress=False, real_node=True, images=(images.RELAY, images.OPERATOR))
    try:
        yield cluster, before
    finally:
        down(cluster)


def get(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_the_node_registers_ready_with_its_own_address_and_versions(
    real: tuple[LocalCluster, dict[str, Any]],
) -> None:
    cluster, _ = real
    node = get(cluster, "node", realnode.NODE_NAME)
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == realnode.NODE_IP
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == cluster.binaries.k8s_version
    assert info["containerRuntimeVersion"].startswith("containerd://1.")
    assert [t["key"] for t in node["spec"].get("taints", [])] == [realnode.TAINT_KEY]
    assert node["metadata"]["labels"][realnode.NODE_LABEL] == "real"


WHO_AM_I = """
import json
from kubernetes import client, config
config.load_incluster_config()
api = client.ApiClient()
review = client.AuthenticationV1Api(api).create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
)
print(json.dumps({"host": api.configuration.host, "user": api.sanitize_for_serialization(review.status.user_info)}))
"""
"""In a pod: who the API server says we are, asked the way every in-cluster client asks."""


def test_a_pod_reaches_the_api_server_through_the_kubernetes_service(
    real: tuple[LocalCluster, dict[str, Any]],
) -> None:
    """The ClusterIP the kubelet hands pods, the CA and the token it projects: a real in-cluster client."""
    cluster, _ = real
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "whoami", "namespace": "default"},
        "spec": {
            **ON_THE_REAL_NODE,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
            "containers": [
                {
                    "name": "whoami",
                    "image": images.OPERATOR.reference,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", WHO_AM_I],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    try:

        def finished() -> str:
            phase = str(get(cluster, "pod", "whoami")["status"].get("phase", ""))
            return phase if phase in ("Succeeded", "Failed") else ""

        phase = wait_until("the whoami pod to finish", finished, timeout=120)
        logs = cluster.kubectl("logs", "whoami").stdout
        assert phase == "Succeeded", logs
        answer = json.loads(logs.strip().splitlines()[-1])
        assert answer["host"] == f"https://{KUBERNETES_SERVICE_IP}:443"
        user = answer["user"]
        assert user["username"] == "system:serviceaccount:default:default"
        # A token bound to this pod: the one the kubelet projected, not one made for the test.
        assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["whoami"]
    finally:
        cluster.kubectl("delete", "pod", "whoami", "--wait=true", "--timeout=60s", check=False)


def echo_pod() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "echo", "namespace": "default"},
            "data": {"message": "hello"},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {
                **ON_THE_REAL_NODE,
                "terminationGracePeriodSeconds": 5,
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
                "containers": [
                    {
                        "name": "echo",
                        "image": realnode.ECHO_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["-listen", ":8080", "-file", "/etc/echo/message"],
                        "ports": [{"name": "http", "containerPort": 8080, "hostPort": HOST_PORT}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                        "securityContext": {
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "message", "mountPath": "/etc/echo"}],
                    }
                ],
                "volumes": [{"name": "message", "configMap": {"name": "echo"}}],
            },
        },
    ]


def ask_echo() -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{realnode.NODE_IP}:{HOST_PORT}/", timeout=3) as response:
        return dict(json.loads(response.read()))


def test_a_pod_runs_in_a_container_reached_through_its_host_port(
    real: tuple[LocalCluster, dict[str, Any]],
) -> None:
    cluster, _ = real
    # A listener of "another program" on the same port at 127.0.0.1: the node must not capture it.
    with socket.socket() as bystander:
        bystander.bind(("127.0.0.1", HOST_PORT))
        bystander.listen()
        cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in echo_pod()))
        pod = wait_until(
            "the echo pod Ready",
            lambda: (
                (p := get(cluster, "pod", "echo"))
                and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])
                )
                and p
            ),
            timeout=120,
        )
        with socket.create_connection(("127.0.0.1", HOST_PORT), timeout=3):
            accepted, _ = bystander.accept()
            accepted.close()

    assert pod["status"]["hostIP"] == realnode.NODE_IP
    assert pod["status"]["podIP"].startswith(realnode.POD_CIDR.rsplit(".", 2)[0] + ".")
    reply = ask_echo()
    assert reply["remoteAddr"].rsplit(":", 1)[0] == realnode.HOST_IP  # the client's own address
    assert reply["uid"] == 65532
    assert reply["hostname"] == "echo"
    assert reply["file"] == "hello"

    cluster.kubectl("patch", "configmap", "echo", "--type=merge", "-p", '{"data": {"message": "updated"}}')
    wait_until("the kubelet to update the mounted ConfigMap", lambda: ask_echo()["file"] == "updated")
    logs = cluster.kubectl("logs", "echo").stdout
    assert "serving on [::]:8080" in logs

    cluster.kubectl("delete", "pod", "echo", "--wait=true", "--timeout=60s")
    with pytest.raises(OSError):
        ask_echo()


RELAY_HOST = "relay.derpcluster.test"


def relay_pod(cert_secret: str) -> dict[str, Any]:
    """derp-relay from its image, locked down as the operator runs it: uid 65532, read-only, no capabilities."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "relay", "namespace": "default"},
        "spec": {
            **ON_THE_REAL_NODE,
            "terminationGracePeriodSeconds": 10,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
            },
            "containers": [
                {
                    "name": "relay",
                    "image": images.RELAY.reference,
                    "imagePullPolicy": "Never",
                    "command": ["derp-relay"],
                    "args": [
                        *("-a", ":443", "--stun-port", "3478", "--hostname", RELAY_HOST),
                        *("--certmode", "manual", "--tls-cert-file", "/etc/derp/tls/tls.crt"),
                        *("--tls-key-file", "/etc/derp/tls/tls.key", "-c", "/var/lib/derp/derper.key"),
                    ],
                    "ports": [
                        {"name": "derp", "containerPort": 443, "hostPort": 443, "protocol": "TCP"},
                        {"name": "stun", "containerPort": 3478, "hostPort": 3478, "protocol": "UDP"},
                    ],
                    "readinessProbe": {
                        "httpGet": {"path": "/derp/probe", "port": "derp", "scheme": "HTTPS"},
                        "periodSeconds": 1,
                    },
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "tls", "mountPath": "/etc/derp/tls", "readOnly": True},
                        {"name": "state", "mountPath": "/var/lib/derp"},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            "volumes": [
                {"name": "tls", "secret": {"secretName": cert_secret, "defaultMode": 0o440}},
                {"name": "state", "emptyDir": {}},
                # Python's ssl loads a certificate from a file: with a read-only root it needs a /tmp.
                {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            ],
        },
    }


def stun_binding(address: tuple[str, int]) -> tuple[stun.BindingResponse, tuple[str, int]]:
    """One STUN binding from the host; returns the answer and the address the request left from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(address)
        txid = stun.new_txid()
        sock.send(stun.binding_request(txid))
        response = stun.parse_binding_response(sock.recv(2048))
        assert response.txid == txid
        return response, sock.getsockname()


async def relay_a_packet(url: str, pin: str) -> None:
    keys = [NodePrivateKey.generate(), NodePrivateKey.generate()]
    clients = [await connect(Endpoint(url, cert_name=pin), key) for key in keys]
    try:
        await clients[0].send(keys[1].public, b"through the hostPort")
        got = await asyncio.wait_for(clients[1].recv_packet(), 5)
        assert got.packet == b"through the hostPort"
    finally:
        for client in clients:
            await client.close()


def relay_pod_ready(cluster: LocalCluster, what: str) -> None:
    """Wait until the pod named ``relay`` is Ready by the kubelet's readiness probe."""
    wait_until(
        what,
        lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in get(cluster, "pod", "relay")["status"].get("conditions", [])
        ),
        timeout=120,
    )


def tls_secret(name: str, material: CertMaterial) -> dict[str, Any]:
    """A ``kubernetes.io/tls`` Secret in ``default`` holding a relay's certificate and key."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "default"},
        "data": {
            "tls.crt": base64.b64encode(material.cert_pem).decode(),
            "tls.key": base64.b64encode(material.key_pem).decode(),
        },
    }


def test_the_relay_image_serves_derp_and_stun_at_the_nodes_address(
    real: tuple[LocalCluster, dict[str, Any]],
) -> None:
    cluster, _ = real
    material = generate_self_signed(RELAY_HOST)
    secret = tls_secret("relay-tls", material)
    cluster.kubectl(
        "apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in (secret, relay_pod("relay-tls")))
    )
    relay_pod_ready(cluster, "the relay pod Ready (the kubelet's HTTPS readiness probe)")
    response, sent_from = stun_binding((realnode.NODE_IP, 3478))
    assert (str(response.address), response.port) == sent_from  # the client's real address and port
    asyncio.run(relay_a_packet(f"https://{realnode.NODE_IP}:443/derp", material.cert_name))
    cluster.kubectl("delete", "pod", "relay", "--wait=true", "--timeout=60s")


PEER_HOST = "peer.derpcluster.test"
"""A relay of the test's own, on the host end of the node's link, that the pod's relay learns to mesh with."""


def meshed_relay_pod(cert_secret: str, mesh_secret: str, peers_configmap: str) -> dict[str, Any]:
    """:func:`relay_pod` with a mesh key from a Secret and its peers from a ConfigMap, as the operator mounts them."""
    pod = relay_pod(cert_secret)
    container = pod["spec"]["containers"][0]
    container["args"] += [
        *("--mesh-psk-file", "/etc/derp/mesh/key", "--mesh-with-file", "/etc/derp/peers/peers"),
        "--mesh-tls-insecure",  # the peer's certificate is a throwaway self-signed one
    ]
    container["volumeMounts"] += [
        {"name": "mesh", "mountPath": "/etc/derp/mesh", "readOnly": True},
        {"name": "peers", "mountPath": "/etc/derp/peers", "readOnly": True},
    ]
    pod["spec"]["volumes"] += [
        {"name": "mesh", "secret": {"secretName": mesh_secret, "defaultMode": 0o440}},
        {"name": "peers", "configMap": {"name": peers_configmap}},
    ]
    return pod


async def deliver_until_received(
    sender_url: str, sender_pin: str, receiver_url: str, receiver_pin: str
) -> None:
    """A client of one relay sends (again every half second) until a client of the other receives."""
    keys = [NodePrivateKey.generate(), NodePrivateKey.generate()]
    sender = await connect(Endpoint(sender_url, cert_name=sender_pin), keys[0])
    receiver = await connect(Endpoint(receiver_url, cert_name=receiver_pin), keys[1])
    try:

        async def resend() -> None:
            while True:
                await sender.send(keys[1].public, b"across the mesh")
                await asyncio.sleep(0.5)

        sending = asyncio.create_task(resend())
        try:
            got = await asyncio.wait_for(receiver.recv_packet(), 150)
        finally:
            sending.cancel()
        assert got.packet == b"across the mesh"
    finally:
        await sender.close()
        await receiver.close()


def test_the_relay_follows_its_mesh_peers_when_the_kubelet_updates_the_configmap(
    real: tuple[LocalCluster, dict[str, Any]], tmp_path: Path
) -> None:
    """The kubelet swaps a ConfigMap volume's ``..data`` symlink; the relay re-reads the file and dials."""
    cluster, _ = real
    mesh_key = MeshKey.generate().text
    material = generate_self_signed(RELAY_HOST)
    key_file = tmp_path / "mesh.key"
    key_file.write_text(mesh_key)
    peer_port = free_port()
    status_file = tmp_path / "peer-status.json"
    peer = subprocess.Popen(
        [
            *("derp-relay", "-a", f"{realnode.HOST_IP}:{peer_port}", "--stun-port", "0"),
            *(
                "--hostname",
                PEER_HOST,
                "--certdir",
                str(tmp_path / "certs"),
                "-c",
                str(tmp_path / "peer.key"),
            ),
            *("--mesh-psk-file", str(key_file), "--mesh-with", f"{RELAY_HOST}:443/{realnode.NODE_IP}"),
            *("--mesh-tls-insecure", "--status-file", str(status_file), "--workers", "1"),
        ],
        stdout=(tmp_path / "peer.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    objects: list[dict[str, Any]] = [
        tls_secret("meshed-tls", material),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "meshed-key", "namespace": "default"},
            "stringData": {"key": mesh_key},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "meshed-peers", "namespace": "default"},
            "data": {"peers": f"{RELAY_HOST}:443\n"},
        },
        meshed_relay_pod("meshed-tls", "meshed-key", "meshed-peers"),
    ]
    try:
        cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in objects))
        wait_until("the peer relay's status file", status_file.exists)
        peer_pin = json.loads(status_file.read_text())["certName"]
        relay_pod_ready(cluster, "the meshed relay pod Ready")
        peers = f"{RELAY_HOST}:443\n{PEER_HOST}:{peer_port}/{realnode.HOST_IP}\n"
        cluster.kubectl(
            "patch", "configmap", "meshed-peers", "--type=merge", "-p", json.dumps({"data": {"peers": peers}})
        )
        # Only the pod's relay dialling the peer (after re-reading the file) tells it where this receiver is.
        asyncio.run(
            deliver_until_received(
                f"https://{realnode.NODE_IP}:443/derp",
                material.cert_name,
                f"https://{realnode.HOST_IP}:{peer_port}/derp",
                peer_pin,
            )
        )
        assert PEER_HOST in cluster.kubectl("logs", "relay").stdout
    finally:
        cluster.kubectl("delete", "pod", "relay", "--wait=true", "--timeout=60s", check=False)
        peer.terminate()
        peer.wait(30)


async def restarting_frame_on_delete(
    cluster: LocalCluster, url: str, pin: str, pod: str
) -> frames.Restarting:
    """A client of the relay when its pod is deleted: the kubelet's SIGTERM makes the relay say Restarting."""
    async with await connect(Endpoint(url, cert_name=pin), NodePrivateKey.generate()) as client:
        cluster.kubectl("-n", "derp", "delete", "pod", pod, "--wait=false")
        while True:
            frame = await asyncio.wait_for(client.recv(), 30)
            if isinstance(frame, frames.Restarting):
                return frame


def test_the_operators_relay_runs_from_its_image_on_the_real_node(
    real: tuple[LocalCluster, dict[str, Any]], tmp_path: Path, derpprobe: Path
) -> None:
    """The operator's own rendering, image and probes on a real kubelet: nothing the fake node hid."""
    cluster, _ = real
    kubectl = Kubectl(cluster)
    kubectl("create", "namespace", "derp")
    cluster.install_chart_without_operator(REPO / "charts" / "derpfleet", OPERATOR_NAMESPACE)
    operator = OperatorProcess(
        cluster, token_kubeconfig(cluster, kubectl, tmp_path / "kubeconfig"), tmp_path / "operator.log", "a"
    )
    operator.start()
    try:
        kubectl("apply", "-f", "-", input=yaml.safe_dump(REAL_NODE_REGION))
        region = wait_until(
            "the region Ready: the operator's STUN, DERP and ping probes through the node's hostPorts",
            lambda: (r := kubectl.region("real")) and condition(r, "Ready").get("status") == "True" and r,
            timeout=150,
        )
        (node,) = region["status"]["nodes"]
        assert (node["ipv4"], node["nodeName"], node["ready"]) == (realnode.NODE_IP, realnode.NODE_NAME, True)
        pod = node["podName"]
        assert kubectl("-n", "derp", "exec", pod, "--", "id", "-u").stdout.strip() == "65532"
        readonly = kubectl("-n", "derp", "exec", pod, "--", "touch", "/written", check=False)
        assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr
        spec = kubectl.json("-n", "derp", "get", "pod", pod)["spec"]["containers"][0]
        assert spec["image"] == images.RELAY.reference

        response, sent_from = stun_binding((realnode.NODE_IP, 3478))
        assert (str(response.address), response.port) == sent_from
        published = kubectl.derp_map()["Regions"]["950"]["Nodes"][0]
        url = f"https://{published['IPv4']}:{published.get('DERPPort', 443)}/derp"
        # Tailscale's derpprobe on the operator's published map: STUN through the hostPort (its TLS
        # probe wants a DNS-named node, as in test_operator.py).
        probe = subprocess.run(
            [
                *(str(derpprobe), "-once", "-spread=false"),
                *("-derp-map", f"http://127.0.0.1:{operator.port}/derpmap.json"),
                *("-interval", "20s", "-stun-interval", "20s", "-tls-interval", "0", "-mesh-interval", "0"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert probe.returncode == 0 and "good: derp/real/950a/udp" in probe.stderr, probe.stderr
        asyncio.run(relay_a_packet(url, published["CertName"]))
        restarting = asyncio.run(restarting_frame_on_delete(cluster, url, published["CertName"], pod))
        assert restarting.reconnect_in_ms > 0
        wait_until(
            "the StatefulSet's new relay pod Ready again",
            lambda: (
                condition(kubectl.region("real"), "Ready").get("status") == "True"
                and kubectl.json("-n", "derp", "get", "pod", pod)["status"]
                .get("containerStatuses", [{}])[0]
                .get("ready")
            ),
            timeout=120,
        )
    finally:
        # The operator removes its finalizer: delete while it runs.
        kubectl("delete", "-f", "-", "--timeout=50s", input=yaml.safe_dump(REAL_NODE_REGION), check=False)
        operator.stop()


def test_stopping_leaves_nothing_behind(real: tuple[LocalCluster, dict[str, Any]]) -> None:
    cluster, before = real
    running = host_state(cluster.state_dir)
    assert running["netns"] and running["link"] and running["cgroups"] and running["processes"]
    down(cluster)
    assert host_state(cluster.state_dir) == before
