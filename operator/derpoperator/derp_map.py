"""The fleet's DERP map from observed regions, in :mod:`derprelay.derpmap`'s types.

A node is published when it is healthy, or when its region asks for
``publishUnhealthy``; a region with nothing to publish is left out, since a
region without nodes only confuses clients' latency measurements.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from derprelay.derpmap import STUN_PORT_DISABLED, DerpMap, DerpNode, DerpRegion

from .model import DEFAULT_DERP_PORT, DEFAULT_STUN_PORT, DerpRegionSpec, TlsMode
from .observed import NodeView, ObservedRegion, view_region


def published(spec: DerpRegionSpec, view: NodeView) -> bool:
    """Whether a node belongs in the map; a node without any host name can never be dialled."""
    return bool(view.host_name) and (view.healthy or spec.publish_unhealthy)


def _map_port(port: int, default: int) -> int:
    """Tailscale's maps leave default ports out (0 means the default), and so do ours."""
    return 0 if port == default else port


def _derp_node(region: ObservedRegion, view: NodeView) -> DerpNode:
    spec = region.spec
    return DerpNode(
        name=view.name,
        region_id=spec.region_id,
        host_name=view.host_name,
        ipv4=view.ipv4,
        ipv6=view.ipv6,
        stun_port=_map_port(spec.stun_port, DEFAULT_STUN_PORT) if spec.stun_enabled else STUN_PORT_DISABLED,
        derp_port=_map_port(spec.derp_port, DEFAULT_DERP_PORT),
        cert_name=region.cert_pin if spec.tls.mode is TlsMode.SELF_SIGNED else "",
    )


def derp_region(region: ObservedRegion) -> DerpRegion | None:
    """One region of the map, or None when it has no node to publish.

    A self-signed region without its pin is not publishable either: clients
    would reject the certificate.
    """
    spec = region.spec
    if spec.tls.mode is TlsMode.SELF_SIGNED and not region.cert_pin:
        return None
    nodes = tuple(_derp_node(region, v) for v in view_region(region) if published(spec, v))
    if not nodes:
        return None
    return DerpRegion(
        region_id=spec.region_id,
        region_code=spec.region_code,
        region_name=spec.display_name,
        nodes=nodes,
        avoid=spec.derp_map.avoid,
        no_measure_no_home=spec.derp_map.no_measure_no_home,
        latitude=spec.derp_map.latitude,
        longitude=spec.derp_map.longitude,
    )


def build_derp_map(regions: Iterable[ObservedRegion], omit_default_regions: bool = True) -> DerpMap:
    """The fleet map, regions sorted by ID.

    The caller drops the losers of :func:`find_region_id_conflicts` first; a
    duplicate ID reaching this point is a bug, so it raises ``ValueError``.
    """
    given = list(regions)
    duplicates = sorted(rid for rid, n in Counter(r.region_id for r in given).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate regionIDs {duplicates}: resolve them with find_region_id_conflicts")
    built = [r for r in map(derp_region, given) if r is not None]
    return DerpMap(tuple(sorted(built, key=lambda r: r.region_id)), omit_default_regions=omit_default_regions)
