"""The operator against a real control plane, with relays the pod runner really serves.

One module-scoped operator (a real ``derpfleet operator`` process) runs
through the whole story of a region: apply → objects, Secret, map with the
fake nodes' addresses, Ready after probes; scale; rollout; a relay frozen
and thawed; bad and conflicting specs; restart idempotence; hand edits put
back; deletion.  The steps build on each other, so they are one module in
file order, each with its own bounded waits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    NAMESPACE,
    OPERATOR_NAMESPACE,
    PROBE_INTERVAL,
    REGION,
    WAIT,
    Kubectl,
    OperatorProcess,
    condition,
    crd_manifest,
    region_doc,
    region_nodes,
    relay_pids,
    wait_for,
    wait_until,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from derprelay.certs import generate_self_signed
from derprelay.client import DerpClientError, Endpoint, connect
from derprelay.keys import NodePrivateKey

pytestmark = pytest.mark.timeout(600)


def owned_versions(kubectl: Kubectl) -> dict[str, str]:
    names = [
        "statefulset/derp-lab",
        "service/derp-lab-mesh",
        "secret/derp-lab-mesh",
        "secret/derp-lab-tls",
        "configmap/derp-lab-peers",
        "poddisruptionbudget/derp-lab",
    ]
    versions = {n: kubectl.json("-n", NAMESPACE, "get", n)["metadata"]["resourceVersion"] for n in names}
    versions["configmap/derp-map"] = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map")[
        "metadata"
    ]["resourceVersion"]
    return versions


def tls_secret(name: str, host: str) -> dict[str, Any]:
    """A kubernetes.io/tls Secret with a fresh self-signed certificate for ``host``."""
    material = generate_self_signed(host)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {
            "tls.crt": base64.b64encode(material.cert_pem).decode(),
            "tls.key": base64.b64encode(material.key_pem).decode(),
        },
    }


def pin_of(tls_secret: dict[str, Any]) -> str:
    pem = base64.b64decode(tls_secret["data"]["tls.crt"])
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


async def relay_across_the_mesh(addresses: list[str], pin: str) -> None:
    """A real DERP client on each of two relays: a packet goes from one to the other over the mesh."""
    keys = [NodePrivateKey.generate(), NodePrivateKey.generate()]
    clients = [
        await connect(Endpoint(f"https://{ip}:443/derp", cert_name=pin), key)
        for ip, key in zip(addresses[:2], keys, strict=True)
    ]
    try:

        async def delivered() -> None:
            while True:
                await clients[0].send(keys[1].public, b"over the mesh")
                try:
                    got = await asyncio.wait_for(clients[1].recv_packet(), 0.5)
                except TimeoutError:
                    continue
                if got.packet == b"over the mesh":
                    return

        await asyncio.wait_for(delivered(), 20)
    finally:
        for client in clients:
            await client.close()


def test_a_region_comes_up_probed_and_published(
    cluster: Any, kubectl: Kubectl, operators: list[OperatorProcess]
) -> None:
    kubectl("apply", "-f", "-", input=region_doc())
    region = wait_for(
        "region lab Ready, every relay probed",
        kubectl.region,
        lambda r: (
            condition(r, "Ready").get("status") == "True"
            and all("rttMs" in n for n in r["status"].get("nodes", [{}]))
        ),
    )
    assert region["status"]["readyNodes"] == region["status"]["desiredNodes"] == 2
    assert region["status"]["observedGeneration"] == region["metadata"]["generation"]
    assert condition(region, "Degraded")["status"] == "False"
    for node in region["status"]["nodes"]:
        assert node["ready"] is True and node["rttMs"] > 0 and node["lastProbe"], node

    uid = region["metadata"]["uid"]
    for kind, name in [
        ("statefulset", "derp-lab"),
        ("service", "derp-lab-mesh"),
        ("secret", "derp-lab-mesh"),
        ("secret", "derp-lab-tls"),
        ("configmap", "derp-lab-peers"),
        ("poddisruptionbudget", "derp-lab"),
    ]:
        owners = kubectl.json("-n", NAMESPACE, "get", kind, name)["metadata"]["ownerReferences"]
        assert [(o["kind"], o["uid"], o["controller"]) for o in owners] == [("DerpRegion", uid, True)], (
            kind,
            name,
        )
    mesh_key = base64.b64decode(
        kubectl.json("-n", NAMESPACE, "get", "secret", "derp-lab-mesh")["data"]["mesh.key"]
    )
    assert len(mesh_key.strip()) == 64
    pods = kubectl.json("-n", NAMESPACE, "get", "pods", "-l", "derpfleet.io/region=lab")["items"]
    pod_ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
    peers = kubectl.json("-n", NAMESPACE, "get", "configmap", "derp-lab-peers")["data"][
        "mesh-with"
    ].splitlines()
    assert peers == [
        f"derp-lab-{i}.derp-lab-mesh.derp.svc.cluster.local:443/{pod_ips[f'derp-lab-{i}']}" for i in range(2)
    ]

    # The map points at the fake nodes' addresses, pinned to the region's certificate.
    pin = pin_of(kubectl.json("-n", NAMESPACE, "get", "secret", "derp-lab-tls"))
    derp_map = wait_for("both relays in the map", kubectl.derp_map, lambda m: len(region_nodes(m, 901)) == 2)
    nodes = derp_map["Regions"]["901"]["Nodes"]
    assert {n["IPv4"] for n in nodes} <= set(cluster.node_addresses.values())
    assert {n["CertName"] for n in nodes} == {pin}
    assert [n["Name"] for n in nodes] == ["901a", "901b"]
    status, served = operators[0].http("/derpmap.json")
    assert status == 200 and json.loads(served) == derp_map

    asyncio.run(relay_across_the_mesh([n["IPv4"] for n in nodes], pin))
    wait_until(
        "a RelaysServing event",
        lambda: (
            "RelaysServing"
            in {
                e["reason"]
                for e in kubectl.json(
                    "-n", NAMESPACE, "get", "events", "--field-selector", "involvedObject.name=lab"
                )["items"]
            }
        ),
    )
    status, metrics = operators[0].http("/metrics")
    assert 'derpfleet_region_ready{namespace="derp",region="lab"} 1.0' in metrics


def test_derpprobe_reaches_every_relay_of_the_published_map(
    operators: list[OperatorProcess], derpprobe: Path
) -> None:
    """Tailscale's derpprobe -once, fed the operator's /derpmap.json, gets every relay's STUN answer.

    Its TLS and mesh probes want nodes named by DNS (the TLS server name must
    equal the HostName) and these are named by their nodes' IPs, so they are
    off here; e2e/interop runs them against named relays.
    """
    url = f"http://127.0.0.1:{operators[0].port}/derpmap.json"
    intervals = ["-interval", "20s", "-stun-interval", "20s", "-tls-interval", "0", "-mesh-interval", "0"]
    probe = subprocess.run(
        [str(derpprobe), "-once", "-spread=false", "-derp-map", url, *intervals],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    good = set(re.findall(r"good: (\S+):", probe.stderr))
    assert good == {"derpmap-probe", "derp/lab/901a/udp", "derp/lab/901b/udp"}, probe.stderr


def test_the_api_server_rejects_an_invalid_spec_with_the_schemas_message(kubectl: Kubectl) -> None:
    bad = kubectl("apply", "-f", "-", input=region_doc("bad", regionID=5000), check=False)
    assert bad.returncode != 0
    assert "spec.regionID" in bad.stderr and "less than or equal to 999" in bad.stderr
    assert kubectl("-n", NAMESPACE, "get", "derpregion", "bad", check=False).returncode != 0


def test_the_api_server_keeps_the_region_id_immutable(kubectl: Kubectl) -> None:
    changed = kubectl.patch_region({"regionID": 902}, check=False)
    assert changed.returncode != 0
    assert "regionID is immutable: create a new DerpRegion for a new ID" in changed.stderr
    assert kubectl.region()["spec"]["regionID"] == 901


def test_a_duplicate_region_id_is_degraded_and_not_published(
    kubectl: Kubectl, operators: list[OperatorProcess]
) -> None:
    kubectl("apply", "-f", "-", input=region_doc("lab2", replicas=1, regionCode="lab2"))
    degraded = wait_for(
        "lab2 Degraded by the conflict",
        lambda: condition(kubectl.region("lab2"), "Degraded"),
        lambda c: c.get("reason") == "RegionIDConflict",
    )
    assert "regionID 901 is already used by DerpRegion derp/lab" in degraded["message"]
    assert condition(kubectl.region("lab2"), "Ready")["status"] == "False"
    assert region_nodes(kubectl.derp_map(), 901).keys() == {"901a", "901b"}
    assert condition(kubectl.region(), "Ready")["status"] == "True"
    kubectl("-n", NAMESPACE, "delete", "derpregion", "lab2", "--wait=true", "--timeout=60s")


def test_scaling_up_adds_a_node_without_restarting_the_others(kubectl: Kubectl) -> None:
    before = {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in kubectl.json("-n", NAMESPACE, "get", "pods", "-l", "derpfleet.io/region=lab")["items"]
    }
    kubectl.patch_region({"replicas": 3})
    wait_until(
        "three relays in the map",
        lambda: region_nodes(kubectl.derp_map(), 901).keys() == {"901a", "901b", "901c"},
    )
    wait_until("status 3/3", lambda: kubectl.region()["status"].get("readyNodes") == 3)
    after = {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in kubectl.json("-n", NAMESPACE, "get", "pods", "-l", "derpfleet.io/region=lab")["items"]
    }
    assert {name: after[name] for name in before} == before
    peers = kubectl.json("-n", NAMESPACE, "get", "configmap", "derp-lab-peers")["data"]["mesh-with"]
    assert len(peers.splitlines()) == 3


def test_a_new_image_rolls_every_relay(kubectl: Kubectl) -> None:
    image = "ghcr.io/derpfleet/derp-relay:0.1.1"
    kubectl.patch_region({"image": image})

    def rolled() -> bool:
        pods = kubectl.json("-n", NAMESPACE, "get", "pods", "-l", "derpfleet.io/region=lab")["items"]
        return len(pods) == 3 and all(p["spec"]["containers"][0]["image"] == image for p in pods)

    wait_until("every pod on the new image", rolled, timeout=3 * WAIT)
    wait_until(
        "the rollout to complete and the region to be Ready",
        lambda: (
            condition(r := kubectl.region(), "Progressing").get("reason") == "RolloutComplete"
            and condition(r, "Ready").get("status") == "True"
            and r["status"]["readyNodes"] == 3
        ),
        timeout=2 * WAIT,
    )


def test_a_frozen_relay_leaves_the_map_and_returns_when_healthy(kubectl: Kubectl) -> None:
    wait_until("three relays in the map", lambda: len(region_nodes(kubectl.derp_map(), 901)) == 3)
    victim_ip = region_nodes(kubectl.derp_map(), 901)["901b"]
    pids = relay_pids(victim_ip)  # every worker, or one of them would go on serving
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until("901b out of the map", lambda: "901b" not in region_nodes(kubectl.derp_map(), 901))
        node = next(n for n in kubectl.region()["status"]["nodes"] if n["name"] == "901b")
        assert node["ready"] is False and node["message"], node
        assert region_nodes(kubectl.derp_map(), 901).keys() == {"901a", "901c"}
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_until("901b back in the map", lambda: "901b" in region_nodes(kubectl.derp_map(), 901))


def test_hand_edits_of_owned_objects_are_put_back(kubectl: Kubectl) -> None:
    def field(kind: str, name: str, *path: str) -> Any:
        value = kubectl.json("-n", NAMESPACE, "get", kind, name)
        for key in path:
            value = value[key]
        return value

    kubectl(
        "-n",
        NAMESPACE,
        "patch",
        "service",
        "derp-lab-mesh",
        "--type=merge",
        "-p",
        '{"spec": {"publishNotReadyAddresses": false}}',
    )
    kubectl(
        "-n", NAMESPACE, "patch", "pdb", "derp-lab", "--type=merge", "-p", '{"spec": {"maxUnavailable": 3}}'
    )
    wait_until(
        "the Service publishing unready relays again",
        lambda: field("service", "derp-lab-mesh", "spec", "publishNotReadyAddresses") is True,
    )
    wait_until("the PDB back at one", lambda: field("pdb", "derp-lab", "spec", "maxUnavailable") == 1)
    kubectl(
        "-n",
        NAMESPACE,
        "patch",
        "configmap",
        "derp-lab-peers",
        "--type=merge",
        "-p",
        '{"data": {"mesh-with": "evil:443\\n"}}',
    )
    wait_until(
        "the peers list restored",
        lambda: (
            len(
                kubectl.json("-n", NAMESPACE, "get", "configmap", "derp-lab-peers")["data"][
                    "mesh-with"
                ].splitlines()
            )
            == 3
        ),
    )


def test_an_operator_restart_changes_nothing_that_is_right(
    kubectl: Kubectl, operators: list[OperatorProcess]
) -> None:
    wait_until(
        "the region settled",
        lambda: (
            condition(kubectl.region(), "Ready").get("status") == "True"
            and len(region_nodes(kubectl.derp_map(), 901)) == 3
        ),
    )
    before = owned_versions(kubectl)
    operators[0].stop()
    restarted_at = time.time()
    operators[0].start()

    def probed_since_restart() -> bool:
        nodes = kubectl.region()["status"]["nodes"]
        times = [
            time.mktime(time.strptime(n["lastProbe"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone for n in nodes
        ]
        return all(t > restarted_at + 1 for t in times)

    wait_until("a probe round by the restarted operator", probed_since_restart)
    time.sleep(3 * float(PROBE_INTERVAL))
    assert owned_versions(kubectl) == before


def test_a_missing_tls_secret_degrades_until_it_exists(kubectl: Kubectl) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        input=region_doc(
            "ext",
            regionID=950,
            regionCode="ext",
            replicas=1,
            derpPort=8443,
            stunPort=3479,
            tls={"mode": "secret", "secretName": "ext-tls"},
        ),
    )
    degraded = wait_for(
        "ext Degraded for its missing Secret",
        lambda: condition(kubectl.region("ext"), "Degraded"),
        lambda c: c.get("reason") == "TLSSecretMissing",
    )
    assert "Secret derp/ext-tls (tls.secretName) does not exist" in degraded["message"]
    kubectl("apply", "-f", "-", input=json.dumps(tls_secret("ext-tls", "ext.derp.test")))
    wait_until("ext Ready", lambda: condition(kubectl.region("ext"), "Ready").get("status") == "True")
    ext = kubectl.derp_map()["Regions"]["950"]["Nodes"][0]
    assert ext["DERPPort"] == 8443 and ext["STUNPort"] == 3479 and "CertName" not in ext


def test_a_renewed_tls_secret_reaches_the_relay_without_a_restart(kubectl: Kubectl) -> None:
    """The relay reloads the certificate from its updated volume; its pod and process stay."""
    address = kubectl.derp_map()["Regions"]["950"]["Nodes"][0]["IPv4"]
    pod_uid = kubectl.json("-n", NAMESPACE, "get", "pod", "derp-ext-0")["metadata"]["uid"]
    pids = sorted(relay_pids(address, 8443))
    renewed = tls_secret("ext-tls", "ext.derp.test")
    kubectl("apply", "-f", "-", input=json.dumps(renewed))

    async def served_pin() -> bool:
        try:
            client = await connect(
                Endpoint(f"https://{address}:8443/derp", cert_name=pin_of(renewed)),
                NodePrivateKey.generate(),
                timeout=5,
            )
        except DerpClientError:
            return False
        await client.close()
        return True

    wait_until("the relay serving the renewed certificate", lambda: asyncio.run(served_pin()))
    assert kubectl.json("-n", NAMESPACE, "get", "pod", "derp-ext-0")["metadata"]["uid"] == pod_uid
    assert sorted(relay_pids(address, 8443)) == pids
    template = kubectl.json("-n", NAMESPACE, "get", "statefulset", "derp-ext")["spec"]["template"]
    assert "derpfleet.io/tls-sha256" not in template["metadata"].get("annotations", {})
    # The operator's probes pin the renewed certificate now, and pass.
    probed = kubectl.region("ext")["status"]["nodes"][0]["lastProbe"]
    wait_until(
        "a passing probe after the renewal",
        lambda: (n := kubectl.region("ext")["status"]["nodes"][0])["lastProbe"] != probed and n["ready"],
    )
    assert condition(kubectl.region("ext"), "Ready").get("status") == "True"
    kubectl("-n", NAMESPACE, "delete", "derpregion", "ext", "--wait=true", "--timeout=60s")
    wait_until("ext out of the map", lambda: "950" not in kubectl.derp_map()["Regions"])


CERTIFICATE_CRD = crd_manifest(
    "cert-manager.io",
    "Certificate",
    "certificates",
    {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
)
"""Just cert-manager's Certificate kind: the operator must use it when it exists; nothing issues."""


def test_cert_manager_mode_waits_for_the_kind_then_for_the_issued_secret(kubectl: Kubectl) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        input=region_doc(
            "cm",
            regionID=960,
            regionCode="cm",
            replicas=1,
            derpPort=8444,
            stunPort=3480,
            hostnameTemplate="cm{index}.derp.test",
            tls={"mode": "certManager", "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
        ),
    )
    missing = wait_for(
        "cm Degraded: no cert-manager",
        lambda: condition(kubectl.region("cm"), "Degraded"),
        lambda c: c.get("reason") == "CertManagerMissing",
    )
    assert "install cert-manager" in missing["message"]
    kubectl("apply", "-f", "-", input=json.dumps(CERTIFICATE_CRD))
    certificate = wait_for(
        "the Certificate",
        lambda: kubectl.json("-n", NAMESPACE, "get", "certificates.cert-manager.io", "derp-cm"),
        bool,
    )
    assert certificate["spec"]["secretName"] == "derp-cm-tls"
    assert certificate["spec"]["dnsNames"] == ["cm1.derp.test"]
    assert certificate["spec"]["issuerRef"] == {
        "name": "letsencrypt",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    # Play cert-manager: issue the Secret; the relay starts and the region becomes Ready.
    kubectl("apply", "-f", "-", input=json.dumps(tls_secret("derp-cm-tls", "cm1.derp.test")))
    wait_until("cm Ready", lambda: condition(kubectl.region("cm"), "Ready").get("status") == "True")
    node = kubectl.derp_map()["Regions"]["960"]["Nodes"][0]
    assert node["HostName"] == "cm1.derp.test" and "CertName" not in node
    kubectl("-n", NAMESPACE, "delete", "derpregion", "cm", "--wait=true", "--timeout=60s")


def test_a_second_replica_stands_by_and_takes_over(cluster: Any, operators: list[OperatorProcess]) -> None:
    first = operators[0]
    second = OperatorProcess(cluster, first.kubeconfig, first.log_path.with_name("b.log"), "b")
    operators.append(second)
    second.start()
    assert second.http("/healthz") == (200, "ok: standby\n")
    assert first.http("/healthz") == (200, "ok: leading\n")
    first.stop()
    wait_until("b to lead", lambda: second.http("/healthz") == (200, "ok: leading\n"), timeout=30)


def test_deleting_the_region_removes_it_from_map_and_cluster(
    kubectl: Kubectl, operators: list[OperatorProcess]
) -> None:
    kubectl("-n", NAMESPACE, "delete", "derpregion", REGION, "--wait=true", "--timeout=60s")
    wait_until("901 out of the map", lambda: "901" not in kubectl.derp_map()["Regions"])
    for kind, name in [
        ("statefulset", "derp-lab"),
        ("secret", "derp-lab-mesh"),
        ("configmap", "derp-lab-peers"),
    ]:
        wait_until(
            f"{kind}/{name} collected",
            lambda kind=kind, name=name: (
                kubectl("-n", NAMESPACE, "get", kind, name, check=False).returncode != 0
            ),
        )
    assert json.loads(operators[-1].http("/derpmap.json")[1])["Regions"] == {}
