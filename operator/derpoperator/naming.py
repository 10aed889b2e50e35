"""Names of everything a DerpRegion owns, and the labels that tie them together.

One place decides them so the renderer, the handlers and the prober agree on
``derp-<name>`` (StatefulSet, PDB, Certificate), ``derp-<name>-mesh`` (headless
Service and mesh-key Secret), ``derp-<name>-peers`` (mesh peer list) and
``derp-<name>-tls``.
"""

from __future__ import annotations

from .model import DerpRegionSpec, RegionRef, TlsMode

MESH_KEY_FIELD = "mesh.key"
MESH_PEERS_FIELD = "mesh-with"
CONTAINER_NAME = "relay"
APP_NAME = "derp-relay"
MANAGER = "derpfleet"
REGION_LABEL = "derpfleet.io/region"


def statefulset_name(ref: RegionRef) -> str:
    return f"derp-{ref.name}"


def mesh_service_name(ref: RegionRef) -> str:
    return f"derp-{ref.name}-mesh"


def mesh_secret_name(ref: RegionRef) -> str:
    return f"derp-{ref.name}-mesh"


def mesh_peers_configmap_name(ref: RegionRef) -> str:
    return f"derp-{ref.name}-peers"


def generated_tls_secret_name(ref: RegionRef) -> str:
    """The Secret the operator (selfSigned) or cert-manager (certManager) writes the certificate to."""
    return f"derp-{ref.name}-tls"


def tls_secret_name(ref: RegionRef, spec: DerpRegionSpec) -> str:
    """The Secret the relays mount: the user's in ``secret`` mode, else the generated one."""
    if spec.tls.mode is TlsMode.SECRET and spec.tls.secret_name:
        return spec.tls.secret_name
    return generated_tls_secret_name(ref)


def pod_name(ref: RegionRef, ordinal: int) -> str:
    return f"{statefulset_name(ref)}-{ordinal}"


def mesh_domain(ref: RegionRef) -> str:
    """The headless Service's DNS zone; every pod has ``<pod>.<this>``."""
    return f"{mesh_service_name(ref)}.{ref.namespace}.svc.{ref.cluster_domain}"


def pod_mesh_host(ref: RegionRef, ordinal: int) -> str:
    return f"{pod_name(ref, ordinal)}.{mesh_domain(ref)}"


def selector_labels(ref: RegionRef) -> dict[str, str]:
    """Labels that select a region's pods; immutable in a StatefulSet, so never extend them."""
    return {"app.kubernetes.io/name": APP_NAME, REGION_LABEL: ref.name}


def labels(ref: RegionRef) -> dict[str, str]:
    """Labels on everything a region owns; a superset of :func:`selector_labels`."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": ref.name,
        "app.kubernetes.io/managed-by": MANAGER,
        REGION_LABEL: ref.name,
    }
