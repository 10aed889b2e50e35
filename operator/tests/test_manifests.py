"""Rendered manifests: the relay's command line, ports, probes, volumes, scheduling and ownership."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from derpoperator.credentials import generate_mesh_key, generate_region_certificate
from derpoperator.model import HOME_PAGE_PATTERN, RegionRef
from derpoperator.render import (
    TLS_FINGERPRINT_ANNOTATION,
    certificate_dns_names,
    owner_reference,
    relay_args,
    relay_pod_annotations,
    render_certificate,
    render_mesh_peers,
    render_mesh_secret,
    render_pdb,
    render_region,
    render_service,
    render_statefulset,
    render_tls_secret,
)
from derprelay.certs import generate_self_signed
from derprelay.cli import build_parser as relay_parser
from derprelay.http import HomePage
from derprelay.mesh import MeshPeer, parse_mesh_with
from fleetfixtures import spec_of

MESH_KEY = "ab" * 32
MESH_HOSTS = "derp-fra-{}.derp-fra-mesh.derp.svc.cluster.local:443"
SELECTOR = {"app.kubernetes.io/name": "derp-relay", "derpfleet.io/region": "fra"}


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(manifest["spec"]["template"]["spec"])


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(manifest)["containers"]
    return dict(only)


def test_relay_args_for_the_default_spec(ref: RegionRef) -> None:
    assert relay_args(ref, spec_of()) == [
        "-a",
        ":443",
        "--stun-port",
        "3478",
        "--hostname",
        "$(POD_NAME).derp-fra-mesh.derp.svc.cluster.local",
        "--certmode",
        "manual",
        "--tls-cert-file",
        "/etc/derp/tls/tls.crt",
        "--tls-key-file",
        "/etc/derp/tls/tls.key",
        "-c",
        "/var/lib/derp/derper.key",
        "--mesh-psk-file",
        "/etc/derp/mesh/mesh.key",
        "--mesh-with-file",
        "/etc/derp/peers/mesh-with",
        "--mesh-ca-file",
        "/etc/derp/tls/tls.crt",
    ]


def test_relay_args_are_accepted_by_the_relays_own_parser(ref: RegionRef) -> None:
    spec = spec_of(verifyClients={"url": "https://hs.example/verify", "failOpen": True}, stunPort=0)
    args = relay_parser().parse_args(relay_args(ref, spec))
    assert args.stun is False
    assert args.verify_client_url == "https://hs.example/verify"
    assert args.verify_client_url_fail_open is True
    assert str(args.mesh_with_file) == "/etc/derp/peers/mesh-with"


def test_relay_args_options(ref: RegionRef) -> None:
    args = relay_args(
        ref,
        spec_of(
            derpPort=8443,
            stunPort=0,
            mesh={"enabled": False},
            verifyClients={"url": "https://hs.example/verify"},
        ),
    )
    assert args[:3] == ["-a", ":8443", "--no-stun"]
    assert not any(a.startswith("--mesh") for a in args)
    assert args[-3:] == [
        "--verify-client-url",
        "https://hs.example/verify",
        "--verify-client-url-fail-open=false",
    ]


def test_mesh_without_the_region_certificate_trusts_the_mesh_key(ref: RegionRef) -> None:
    args = relay_args(ref, spec_of(tls={"mode": "secret", "secretName": "mine"}))
    assert "--mesh-ca-file" not in args
    assert "--mesh-tls-insecure" in args


def test_statefulset(ref: RegionRef) -> None:
    sts = render_statefulset(ref, spec_of(replicas=3))
    assert sts["apiVersion"] == "apps/v1"
    assert sts["metadata"]["name"] == "derp-fra"
    assert sts["metadata"]["namespace"] == "derp"
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "derp-fra-mesh"
    assert sts["spec"]["selector"] == {"matchLabels": SELECTOR}
    assert sts["spec"]["template"]["metadata"]["labels"] == {
        **SELECTOR,
        "app.kubernetes.io/instance": "fra",
        "app.kubernetes.io/managed-by": "derpfleet",
    }
    assert pod_spec(sts)["terminationGracePeriodSeconds"] == 30
    c = container(sts)
    assert (c["name"], c["command"], c["image"]) == (
        "relay",
        ["derp-relay"],
        "ghcr.io/derpfleet/derp-relay:0.1.0",
    )
    assert c["ports"] == [
        {"name": "derp", "containerPort": 443, "hostPort": 443, "protocol": "TCP"},
        {"name": "stun", "containerPort": 3478, "hostPort": 3478, "protocol": "UDP"},
    ]
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]} == {
        "POD_NAME": "metadata.name",
        "POD_IP": "status.podIP",
        "NODE_IP": "status.hostIP",
    }
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"] == {"path": "/derp/probe", "port": "derp", "scheme": "HTTPS"}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}}


def test_statefulset_volumes_follow_the_tls_mode_and_mesh(ref: RegionRef) -> None:
    def secrets(**fields: Any) -> dict[str, str]:
        volumes = pod_spec(render_statefulset(ref, spec_of(**fields)))["volumes"]
        return {v["name"]: v["secret"]["secretName"] for v in volumes if "secret" in v}

    assert secrets() == {"tls": "derp-fra-tls", "mesh": "derp-fra-mesh"}
    assert secrets(tls={"mode": "secret", "secretName": "mine"}, mesh={"enabled": False}) == {"tls": "mine"}
    sts = render_statefulset(ref, spec_of())
    assert {"name": "peers", "configMap": {"name": "derp-fra-peers"}} in pod_spec(sts)["volumes"]
    mounts = {m["name"]: m["mountPath"] for m in container(sts)["volumeMounts"]}
    assert mounts == {
        "tls": "/etc/derp/tls",
        "mesh": "/etc/derp/mesh",
        "peers": "/etc/derp/peers",
        "state": "/var/lib/derp",
        "tmp": "/tmp",
    }
    no_mesh = render_statefulset(ref, spec_of(mesh={"enabled": False}))
    assert [v["name"] for v in pod_spec(no_mesh)["volumes"]] == ["tls", "state", "tmp"]


def test_stun_off_publishes_no_udp_port(ref: RegionRef) -> None:
    assert [p["name"] for p in container(render_statefulset(ref, spec_of(stunPort=0)))["ports"]] == ["derp"]


def test_scheduling_merges_the_users_rules_with_anti_affinity(ref: RegionRef) -> None:
    theirs = {"labelSelector": {"matchLabels": {"app": "ingress"}}, "topologyKey": "kubernetes.io/hostname"}
    node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    spec = spec_of(
        nodeSelector={"derp": "yes"},
        tolerations=[{"key": "derp", "operator": "Exists"}],
        affinity={
            "nodeAffinity": node_affinity,
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [theirs]},
        },
    )
    pod = pod_spec(render_statefulset(ref, spec))
    assert pod["nodeSelector"] == {"derp": "yes"}
    assert pod["tolerations"] == [{"key": "derp", "operator": "Exists"}]
    assert pod["affinity"]["nodeAffinity"] == node_affinity
    assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {"labelSelector": {"matchLabels": SELECTOR}, "topologyKey": "kubernetes.io/hostname"},
        theirs,
    ]
    assert spec.affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [theirs]


def test_default_pod_has_only_our_anti_affinity(ref: RegionRef) -> None:
    pod = pod_spec(render_statefulset(ref, spec_of()))
    assert pod["affinity"] == {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": SELECTOR}, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    }
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_service_is_headless_and_publishes_unready_relays(ref: RegionRef) -> None:
    svc = render_service(ref, spec_of(derpPort=8443))
    assert svc["metadata"]["name"] == "derp-fra-mesh"
    assert svc["spec"] == {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": SELECTOR,
        "ports": [{"name": "derp", "port": 8443, "targetPort": "derp", "protocol": "TCP"}],
    }


def test_mesh_peers_list_every_member_one_per_line(ref: RegionRef) -> None:
    peers = render_mesh_peers(ref, spec_of(replicas=3))
    assert (peers["kind"], peers["metadata"]["name"]) == ("ConfigMap", "derp-fra-peers")
    assert peers["data"] == {"mesh-with": "".join(MESH_HOSTS.format(i) + "\n" for i in range(3))}
    assert parse_mesh_with(peers["data"]["mesh-with"].replace("\n", ",")) == [
        MeshPeer(MESH_HOSTS.format(i)) for i in range(3)
    ]


def test_mesh_peers_dial_known_pod_ips_and_name_the_others(ref: RegionRef) -> None:
    peers = render_mesh_peers(ref, spec_of(replicas=3), {0: "10.1.0.7", 2: "fd00::9"})
    lines = peers["data"]["mesh-with"].splitlines()
    assert lines == [
        MESH_HOSTS.format(0) + "/10.1.0.7",
        MESH_HOSTS.format(1),
        MESH_HOSTS.format(2) + "/fd00::9",
    ]
    assert [p.dial_host for p in parse_mesh_with(",".join(lines))] == ["10.1.0.7", "", "fd00::9"]


def test_pod_annotations_go_on_the_template_only_when_given(ref: RegionRef) -> None:
    plain = render_statefulset(ref, spec_of())["spec"]["template"]["metadata"]
    assert "annotations" not in plain
    marked = render_statefulset(ref, spec_of(), {"derpfleet.io/tls-sha256": "ab12"})
    assert marked["spec"]["template"]["metadata"]["annotations"] == {"derpfleet.io/tls-sha256": "ab12"}


CERT_SOURCES = {
    "secret": {"mode": "secret", "secretName": "mine"},
    "certManager": {"mode": "certManager", "issuerRef": {"name": "le", "kind": "ClusterIssuer"}},
}


@pytest.mark.parametrize("tls", CERT_SOURCES.values(), ids=CERT_SOURCES.keys())
def test_a_rotated_user_or_cert_manager_certificate_does_not_roll_the_relays(
    ref: RegionRef, tls: dict[str, Any]
) -> None:
    """The relays reload it from the updated volume themselves; a restart would drop their clients."""
    spec = spec_of(tls=tls, hostnameTemplate="derp{index}-fra.example.com")
    before, after = (generate_self_signed("derp0-fra.example.com") for _ in range(2))
    assert relay_pod_annotations(spec, before) == relay_pod_annotations(spec, after) == {}
    (sts,) = (m for m in render_region(ref, spec, MESH_KEY, None) if m["kind"] == "StatefulSet")
    assert "annotations" not in sts["spec"]["template"]["metadata"]
    assert ("tls", "/etc/derp/tls") in {(m["name"], m["mountPath"]) for m in container(sts)["volumeMounts"]}
    assert not any("subPath" in m for m in container(sts)["volumeMounts"])  # a subPath mount is never updated


def test_a_new_self_signed_region_certificate_rolls_the_relays(ref: RegionRef) -> None:
    """The DERP map pins it and the mesh verifies with it: pin, mesh and relays change together."""
    spec = spec_of()
    templates = [
        next(m for m in render_region(ref, spec, MESH_KEY, tls) if m["kind"] == "StatefulSet")["spec"][
            "template"
        ]
        for tls in (generate_region_certificate(ref, spec) for _ in range(2))
    ]
    hashes = [t["metadata"]["annotations"][TLS_FINGERPRINT_ANNOTATION] for t in templates]
    assert hashes[0] != hashes[1] and all(len(h) == 32 for h in hashes)


def test_scaling_does_not_touch_the_pod_template(ref: RegionRef) -> None:
    two = render_statefulset(ref, spec_of(replicas=2))["spec"]["template"]
    three = render_statefulset(ref, spec_of(replicas=3))["spec"]["template"]
    assert two == three


def test_pdb_allows_one_relay_down(ref: RegionRef) -> None:
    pdb = render_pdb(ref)
    assert (pdb["apiVersion"], pdb["metadata"]["name"]) == ("policy/v1", "derp-fra")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}


def test_mesh_secret_holds_the_normalised_key(ref: RegionRef) -> None:
    secret = render_mesh_secret(ref, "AB" * 32)
    assert secret["metadata"]["name"] == "derp-fra-mesh"
    assert base64.b64decode(secret["data"]["mesh.key"]) == b"ab" * 32
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        render_mesh_secret(ref, "abc")


def test_tls_secret(ref: RegionRef) -> None:
    material = generate_region_certificate(ref, spec_of())
    secret = render_tls_secret(ref, material)
    assert (secret["type"], secret["metadata"]["name"]) == ("kubernetes.io/tls", "derp-fra-tls")
    assert base64.b64decode(secret["data"]["tls.crt"]) == material.cert_pem
    assert base64.b64decode(secret["data"]["tls.key"]) == material.key_pem


def test_certificate_for_cert_manager(ref: RegionRef) -> None:
    spec = spec_of(
        replicas=3,
        hostnameTemplate="derp{index}-fra.example.com",
        tls={"mode": "certManager", "issuerRef": {"name": "le", "kind": "ClusterIssuer"}},
    )
    cert = render_certificate(ref, spec)
    assert (cert["apiVersion"], cert["kind"], cert["metadata"]["name"]) == (
        "cert-manager.io/v1",
        "Certificate",
        "derp-fra",
    )
    assert cert["spec"]["secretName"] == "derp-fra-tls"
    assert cert["spec"]["dnsNames"] == certificate_dns_names(spec)
    assert cert["spec"]["dnsNames"] == [
        "derp1-fra.example.com",
        "derp2-fra.example.com",
        "derp3-fra.example.com",
    ]
    assert cert["spec"]["issuerRef"] == {"name": "le", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    with pytest.raises(ValueError, match="certManager"):
        render_certificate(ref, spec_of())


def test_everything_is_owned_by_the_region(ref: RegionRef) -> None:
    manifests = render_region(
        ref, spec_of(), generate_mesh_key(), generate_region_certificate(ref, spec_of())
    )
    expected = {
        "apiVersion": "derpfleet.io/v1alpha1",
        "kind": "DerpRegion",
        "name": "fra",
        "uid": "0b6e5c1e-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert owner_reference(ref) == expected
    for manifest in manifests:
        assert manifest["metadata"]["ownerReferences"] == [expected]
        assert manifest["metadata"]["namespace"] == "derp"
        assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "derpfleet"


def test_offline_rendering_has_no_owner(ref: RegionRef) -> None:
    offline = RegionRef(ref.name, ref.namespace, uid="")
    assert "ownerReferences" not in render_pdb(offline)["metadata"]


@pytest.mark.parametrize(
    ("fields", "kinds"),
    [
        ({}, ["Secret/derp-fra-mesh", "ConfigMap/derp-fra-peers", "Secret/derp-fra-tls"]),
        ({"mesh": {"enabled": False}}, ["Secret/derp-fra-tls"]),
        (
            {"tls": {"mode": "secret", "secretName": "mine"}},
            ["Secret/derp-fra-mesh", "ConfigMap/derp-fra-peers"],
        ),
        (
            {
                "hostnameTemplate": "d{index}.example.com",
                "tls": {"mode": "certManager", "issuerRef": {"name": "le"}},
            },
            ["Secret/derp-fra-mesh", "ConfigMap/derp-fra-peers", "Certificate/derp-fra"],
        ),
    ],
)
def test_render_region_in_apply_order(ref: RegionRef, fields: dict[str, Any], kinds: list[str]) -> None:
    spec = spec_of(**fields)
    manifests = render_region(ref, spec, MESH_KEY, generate_region_certificate(ref, spec))
    assert [f"{m['kind']}/{m['metadata']['name']}" for m in manifests] == [
        *kinds,
        "Service/derp-fra-mesh",
        "StatefulSet/derp-fra",
        "PodDisruptionBudget/derp-fra",
    ]


def test_render_region_needs_the_secrets_it_renders(ref: RegionRef) -> None:
    with pytest.raises(ValueError, match="mesh key"):
        render_region(ref, spec_of(), None, None)
    with pytest.raises(ValueError, match="certificate"):
        render_region(ref, spec_of(), MESH_KEY, None)
    assert render_region(
        ref, spec_of(mesh={"enabled": False}, tls={"mode": "secret", "secretName": "x"}), None, None
    )


@pytest.mark.parametrize(
    ("resources", "workers"),
    [
        ({"limits": {"cpu": "4"}}, ["--workers", "4"]),
        ({"limits": {"cpu": "1500m"}, "requests": {"cpu": "1"}}, ["--workers", "2"]),
        ({"limits": {"cpu": "250m"}}, ["--workers", "1"]),
        ({"limits": {"cpu": 3}}, ["--workers", "3"]),
        ({"requests": {"cpu": "2"}}, []),
        ({"limits": {"memory": "1Gi"}}, []),
    ],
)
def test_relay_workers_follow_the_cpu_limit(
    ref: RegionRef, resources: dict[str, Any], workers: list[str]
) -> None:
    args = relay_args(ref, spec_of(resources=resources))
    at = args.index("--workers") if "--workers" in args else len(args)
    assert args[at : at + 2] == workers
    assert relay_parser().parse_args(args).workers == (int(workers[1]) if workers else None)


@pytest.mark.parametrize(
    "home", ["", "blank", "https://derp.example.com/", "http://127.0.0.1/x", "ftp://x", "x y"]
)
def test_home_page_is_what_the_relay_accepts(ref: RegionRef, home: str) -> None:
    """The CRD's homePage pattern (mirrored in the model) admits exactly what derp-relay --home takes."""
    try:
        HomePage.from_flag(home)
        relay_takes = True
    except ValueError:
        relay_takes = False
    assert (re.fullmatch(HOME_PAGE_PATTERN, home) is not None) == relay_takes
    if relay_takes:
        args = relay_parser().parse_args(relay_args(ref, spec_of(homePage=home)))
        assert args.home == home
