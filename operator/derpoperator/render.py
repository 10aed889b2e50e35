"""Pure rendering: a DerpRegion (name, spec, its secrets) -> the Kubernetes manifests that run it.

Every function returns plain JSON-ready dicts, complete enough for
server-side apply: the handlers apply them as they are, and ``derpfleet
render`` prints them for GitOps repositories.  Everything a region owns
carries a controller ownerReference to it, so deleting the DerpRegion lets
the garbage collector remove the rest.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from typing import Any

from derprelay.certs import CertMaterial

from .credentials import normalize_mesh_key
from .derp_map_yaml import headscale_yaml
from .model import API_GROUP, API_VERSION, KIND, DerpRegionSpec, RegionRef, TlsMode, render_hostname
from .naming import (
    CONTAINER_NAME,
    MANAGER,
    MESH_KEY_FIELD,
    MESH_PEERS_FIELD,
    generated_tls_secret_name,
    labels,
    mesh_domain,
    mesh_peers_configmap_name,
    mesh_secret_name,
    mesh_service_name,
    pod_mesh_host,
    selector_labels,
    statefulset_name,
    tls_secret_name,
)

Manifest = dict[str, Any]

TLS_FINGERPRINT_ANNOTATION = "derpfleet.io/tls-sha256"
"""On a selfSigned region's pod template: a short hash of its certificate (see :func:`relay_pod_annotations`)."""

TLS_DIR = "/etc/derp/tls"
MESH_DIR = "/etc/derp/mesh"
PEERS_DIR = "/etc/derp/peers"
STATE_DIR = "/var/lib/derp"
PROBE_PATH = "/derp/probe"
TERMINATION_GRACE_SECONDS = 30
"""Time for the relay's Restarting frame and connection drain before SIGKILL."""
RELAY_UID = 65532
"""An unprivileged user; ports below 1024 are opened through the pod's unprivileged-port sysctl."""
DERP_MAP_KEY = "derpmap.json"
"""The map as JSON: a Tailscale policy's ``derpMap``, and what ``/derpmap.json`` serves to ``derp.urls``."""
DERP_MAP_YAML_KEY = "derpmap.yaml"
"""The same map in the form Headscale's ``derp.paths`` reads (see :mod:`.derp_map_yaml`)."""
HOSTNAME_TOPOLOGY_KEY = "kubernetes.io/hostname"


def owner_reference(ref: RegionRef) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ref: RegionRef, name: str) -> dict[str, Any]:
    """Common metadata; rendered offline there is no uid to own by, and no ownerReference."""
    meta: dict[str, Any] = {"name": name, "namespace": ref.namespace, "labels": labels(ref)}
    if ref.uid:
        meta["ownerReferences"] = [owner_reference(ref)]
    return meta


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_mesh_secret(ref: RegionRef, mesh_key: str) -> Manifest:
    """The mesh key Secret; ``mesh_key`` comes from the existing Secret or :func:`generate_mesh_key`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ref, mesh_secret_name(ref)),
        "type": "Opaque",
        "data": {MESH_KEY_FIELD: _b64(normalize_mesh_key(mesh_key).encode("ascii"))},
    }


def render_tls_secret(ref: RegionRef, material: CertMaterial) -> Manifest:
    """The selfSigned mode's certificate Secret (kubernetes.io/tls)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ref, generated_tls_secret_name(ref)),
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": _b64(material.cert_pem), "tls.key": _b64(material.key_pem)},
    }


def certificate_dns_names(spec: DerpRegionSpec) -> list[str]:
    """The public hostnames of today's relays: a CA such as ACME must be able to validate each."""
    if not spec.hostname_template:
        return []
    return [render_hostname(spec.hostname_template, i) for i in range(spec.replicas)]


def render_certificate(ref: RegionRef, spec: DerpRegionSpec) -> Manifest:
    """A cert-manager Certificate writing ``derp-<name>-tls`` (certManager mode)."""
    issuer = spec.tls.issuer_ref
    if spec.tls.mode is not TlsMode.CERT_MANAGER or issuer is None:
        raise ValueError("render_certificate needs tls.mode certManager with an issuerRef")
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": _metadata(ref, statefulset_name(ref)),
        "spec": {
            "secretName": generated_tls_secret_name(ref),
            "dnsNames": certificate_dns_names(spec),
            "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": issuer.group},
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["server auth", "digital signature"],
        },
    }


def render_service(ref: RegionRef, spec: DerpRegionSpec) -> Manifest:
    """The headless Service giving every relay a stable DNS name for the mesh.

    Not-ready pods are published too: relays must find each other while they
    start, before their readiness probes pass.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, mesh_service_name(ref)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(ref),
            "ports": [{"name": "derp", "port": spec.derp_port, "targetPort": "derp", "protocol": "TCP"}],
        },
    }


def render_pdb(ref: RegionRef) -> Manifest:
    """Voluntary disruptions (node drains) take down one relay at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref, statefulset_name(ref)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ref)}},
    }


def mesh_peers(ref: RegionRef, spec: DerpRegionSpec, pod_ips: Mapping[int, str] | None = None) -> list[str]:
    """Mesh peer entries: every member including this one (the relay skips its own name).

    Where a pod's IP is known the entry dials it (``host:port/ip``): the mesh
    then works without cluster DNS, and TLS still checks the DNS name.
    """
    ips = pod_ips or {}
    peers = []
    for i in range(spec.replicas):
        peer = f"{pod_mesh_host(ref, i)}:{spec.derp_port}"
        peers.append(f"{peer}/{ips[i]}" if ips.get(i) else peer)
    return peers


def render_mesh_peers(
    ref: RegionRef, spec: DerpRegionSpec, pod_ips: Mapping[int, str] | None = None
) -> Manifest:
    """The mesh peer list, one per line, which the relays follow (``--mesh-with-file``).

    Kept out of the pod template on purpose: scaling the region or a pod
    moving to a new IP then updates the mounted file in place instead of
    restarting every relay.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref, mesh_peers_configmap_name(ref)),
        "data": {MESH_PEERS_FIELD: "".join(f"{peer}\n" for peer in mesh_peers(ref, spec, pod_ips))},
    }


def relay_args(ref: RegionRef, spec: DerpRegionSpec) -> list[str]:
    """The relay's command line; ``$(POD_NAME)`` is expanded by the kubelet from the env."""
    args = [
        "-a",
        f":{spec.derp_port}",
        *(["--stun-port", str(spec.stun_port)] if spec.stun_enabled else ["--no-stun"]),
        "--hostname",
        f"$(POD_NAME).{mesh_domain(ref)}",
        "--certmode",
        "manual",
        "--tls-cert-file",
        f"{TLS_DIR}/tls.crt",
        "--tls-key-file",
        f"{TLS_DIR}/tls.key",
        "-c",
        f"{STATE_DIR}/derper.key",
    ]
    if spec.mesh_enabled:
        args += [
            "--mesh-psk-file",
            f"{MESH_DIR}/{MESH_KEY_FIELD}",
            "--mesh-with-file",
            f"{PEERS_DIR}/{MESH_PEERS_FIELD}",
        ]
        # Only the self-signed region certificate names the in-cluster mesh hosts; a
        # user's or cert-manager's certificate names public hosts, which the mesh
        # does not dial, so there the mesh key alone authenticates members.
        if spec.tls.mode is TlsMode.SELF_SIGNED:
            args += ["--mesh-ca-file", f"{TLS_DIR}/tls.crt"]
        else:
            args += ["--mesh-tls-insecure"]
    workers = relay_workers(spec.resources)
    if workers is not None:
        args += ["--workers", str(workers)]
    if spec.verify_clients is not None:
        args += [
            "--verify-client-url",
            spec.verify_clients.url,
            f"--verify-client-url-fail-open={str(spec.verify_clients.fail_open).lower()}",
        ]
    if spec.home_page:
        args += ["--home", spec.home_page]
    if ref.relay_debug_allow:
        args += ["--debug-allow", ref.relay_debug_allow]
    return args


def relay_workers(resources: Mapping[str, Any]) -> int | None:
    """Relay worker processes for the container's CPU limit: the nearest whole core, at least 1.

    Said explicitly so the manifest shows it; the relay would read the same
    from its cgroup quota.  Without a limit there is no quota: the relay's
    default then takes every core of the node, which a relay alone on its
    node (hostPort) may use; a CPU request is a floor, not a cap.
    """
    limits = resources.get("limits")
    cores = cpu_cores(limits.get("cpu")) if isinstance(limits, Mapping) else None
    return None if cores is None else max(1, math.floor(cores + 0.5))


def cpu_cores(quantity: object) -> float | None:
    """A Kubernetes CPU quantity (``2``, ``1.5``, ``500m``) in cores; None if absent or not one."""
    text = str(quantity).strip() if isinstance(quantity, str | int | float) else ""
    scale = 1.0
    if text.endswith("m"):
        text, scale = text[:-1], 0.001
    try:
        cores = float(text) * scale
    except ValueError:
        return None
    return cores if math.isfinite(cores) and cores > 0 else None


def _env_from_field(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _probe(failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": PROBE_PATH, "port": "derp", "scheme": "HTTPS"},
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": failure_threshold,
    }


def _container(ref: RegionRef, spec: DerpRegionSpec) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [
        {"name": "derp", "containerPort": spec.derp_port, "hostPort": spec.derp_port, "protocol": "TCP"}
    ]
    if spec.stun_enabled:
        ports.append(
            {"name": "stun", "containerPort": spec.stun_port, "hostPort": spec.stun_port, "protocol": "UDP"}
        )
    mounts = [
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.mesh_enabled:
        mounts.append({"name": "mesh", "mountPath": MESH_DIR, "readOnly": True})
        mounts.append({"name": "peers", "mountPath": PEERS_DIR, "readOnly": True})
    return {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["derp-relay"],
        "args": relay_args(ref, spec),
        "env": [
            _env_from_field("POD_NAME", "metadata.name"),
            _env_from_field("POD_IP", "status.podIP"),
            _env_from_field("NODE_IP", "status.hostIP"),
        ],
        "ports": ports,
        # Readiness drops a relay from its Service quickly; liveness restarts it only when it stays stuck.
        "readinessProbe": _probe(failure_threshold=2),
        "livenessProbe": _probe(failure_threshold=6),
        "resources": dict(spec.resources),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _affinity(ref: RegionRef, spec: DerpRegionSpec) -> dict[str, Any]:
    """The user's affinity plus ours: never two relays of a region on one node.

    hostPort alone would also keep them apart, but as a scheduling failure
    ("port in use") instead of an explicit rule the scheduler plans with.
    """
    ours = {"labelSelector": {"matchLabels": selector_labels(ref)}, "topologyKey": HOSTNAME_TOPOLOGY_KEY}
    affinity = {key: dict(value) for key, value in spec.affinity.items()}
    anti = affinity.setdefault("podAntiAffinity", {})
    anti["requiredDuringSchedulingIgnoredDuringExecution"] = [
        ours,
        *anti.get("requiredDuringSchedulingIgnoredDuringExecution", []),
    ]
    return affinity


def _volumes(ref: RegionRef, spec: DerpRegionSpec) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "tls", "secret": {"secretName": tls_secret_name(ref, spec), "defaultMode": 0o440}},
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if spec.mesh_enabled:
        volumes.append(
            {"name": "mesh", "secret": {"secretName": mesh_secret_name(ref), "defaultMode": 0o440}}
        )
        volumes.append({"name": "peers", "configMap": {"name": mesh_peers_configmap_name(ref)}})
    return volumes


def relay_pod_annotations(spec: DerpRegionSpec, tls: CertMaterial | None) -> dict[str, str]:
    """The pod template's annotations for the region's certificate: which changes roll the relays.

    A changed ``secret`` or cert-manager certificate does not: the kubelet
    updates the mounted Secret volume in place and every relay serves the new
    pair to new connections on its own (``derprelay.certreload``), keeping its
    clients.  A selfSigned region's certificate is more than what the relays
    serve: the DERP map pins it and the mesh verifies peers against it
    (``--mesh-ca-file``, read at start), so a new one (its Secret deleted and
    made again) rolls the relays, and pin and mesh move together.
    """
    if spec.tls.mode is not TlsMode.SELF_SIGNED or tls is None:
        return {}
    return {TLS_FINGERPRINT_ANNOTATION: hashlib.sha256(tls.cert_pem).hexdigest()[:32]}


def render_statefulset(
    ref: RegionRef, spec: DerpRegionSpec, pod_annotations: Mapping[str, str] | None = None
) -> Manifest:
    """One relay per ordinal; ordinals give stable pod names, hence stable DERP node names.

    ``pod_annotations`` go on the pod template, where a changed value rolls
    the relays (:func:`relay_pod_annotations`).
    """
    pod_spec: dict[str, Any] = {
        "containers": [_container(ref, spec)],
        "volumes": _volumes(ref, spec),
        "affinity": _affinity(ref, spec),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RELAY_UID,
            "runAsGroup": RELAY_UID,
            "fsGroup": RELAY_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
        },
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(ref, statefulset_name(ref)),
        "spec": {
            "replicas": spec.replicas,
            "serviceName": mesh_service_name(ref),
            # Relays don't depend on each other to start: bring them all up at once.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels(ref)},
            "template": {
                "metadata": {
                    "labels": labels(ref),
                    **({"annotations": dict(pod_annotations)} if pod_annotations else {}),
                },
                "spec": pod_spec,
            },
        },
    }


def render_region(
    ref: RegionRef,
    spec: DerpRegionSpec,
    mesh_key: str | None,
    tls: CertMaterial | None,
    *,
    pod_ips: Mapping[int, str] | None = None,
) -> list[Manifest]:
    """Everything a region runs on, in apply order (Secrets and ConfigMaps before the pods mounting them).

    ``mesh_key`` is required when the mesh is enabled and ``tls`` in
    selfSigned mode: they are generated once by the caller and then read back
    from their Secrets, never made up here.  ``pod_ips`` (by ordinal) are
    what the operator observed; offline there are none.
    """
    manifests: list[Manifest] = []
    if spec.mesh_enabled:
        if mesh_key is None:
            raise ValueError("the mesh is enabled: pass the region's mesh key")
        manifests += [render_mesh_secret(ref, mesh_key), render_mesh_peers(ref, spec, pod_ips)]
    if spec.tls.mode is TlsMode.SELF_SIGNED:
        if tls is None:
            raise ValueError("tls.mode is selfSigned: pass the region's certificate")
        manifests.append(render_tls_secret(ref, tls))
    elif spec.tls.mode is TlsMode.CERT_MANAGER:
        manifests.append(render_certificate(ref, spec))
    pod_annotations = relay_pod_annotations(spec, tls)
    manifests += [render_service(ref, spec), render_statefulset(ref, spec, pod_annotations), render_pdb(ref)]
    return manifests


def render_derp_map_configmap(
    namespace: str, name: str, derp_map_json: str, annotations: Mapping[str, str] | None = None
) -> Manifest:
    """The fleet's DERP map, as JSON and as the YAML that Headscale ``derp.paths`` reads.

    It spans every region, so it has no single owner.  The operator annotates
    it with where each region came from (see :mod:`fleet`).
    """
    metadata: Manifest = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/name": "derp-map"},
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {DERP_MAP_KEY: derp_map_json, DERP_MAP_YAML_KEY: headscale_yaml(derp_map_json)},
    }
