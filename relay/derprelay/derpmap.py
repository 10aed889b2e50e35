"""Tailscale's DERP map (``tailcfg.DERPMap``) as typed data and its JSON.

Field names are Go's exported names (``RegionID``, ``HostName``…) except
``omitDefaultRegions``, and zero values are omitted as Go's ``omitempty``
does, so the JSON drops straight into Headscale's ``derp.paths`` file or a
Tailscale policy's ``derpMap``.  The relay prints a one-node map in dev mode;
the operator builds the fleet map from the same types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

STUN_PORT_DISABLED = -1
"""A node's STUNPort of -1 turns STUN off for it (0 means the default 3478)."""


@dataclass(frozen=True, slots=True)
class DerpNode:
    name: str
    region_id: int
    host_name: str
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    derp_port: int = 0
    cert_name: str = ""
    stun_only: bool = False
    insecure_for_tests: bool = False
    can_port_80: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"Name": self.name, "RegionID": self.region_id, "HostName": self.host_name}
        optional: dict[str, Any] = {
            "CertName": self.cert_name,
            "IPv4": self.ipv4,
            "IPv6": self.ipv6,
            "STUNPort": self.stun_port,
            "STUNOnly": self.stun_only,
            "DERPPort": self.derp_port,
            "InsecureForTests": self.insecure_for_tests,
            "CanPort80": self.can_port_80,
        }
        doc.update((k, v) for k, v in optional.items() if v)
        return doc


@dataclass(frozen=True, slots=True)
class DerpRegion:
    region_id: int
    region_code: str
    region_name: str
    nodes: tuple[DerpNode, ...] = ()
    avoid: bool = False
    no_measure_no_home: bool = False
    latitude: float = 0.0
    longitude: float = 0.0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "RegionID": self.region_id,
            "RegionCode": self.region_code,
            "RegionName": self.region_name,
        }
        optional: dict[str, Any] = {
            "Latitude": self.latitude,
            "Longitude": self.longitude,
            "Avoid": self.avoid,
            "NoMeasureNoHome": self.no_measure_no_home,
        }
        doc.update((k, v) for k, v in optional.items() if v)
        doc["Nodes"] = [node.to_json() for node in self.nodes]
        return doc


@dataclass(frozen=True, slots=True)
class DerpMap:
    regions: tuple[DerpRegion, ...] = field(default_factory=tuple)
    omit_default_regions: bool = True

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "Regions": {
                str(r.region_id): r.to_json() for r in sorted(self.regions, key=lambda r: r.region_id)
            }
        }
        if self.omit_default_regions:
            doc["omitDefaultRegions"] = True
        return doc

    def dumps(self) -> str:
        """Stable, indented JSON: equal maps give equal bytes (no spurious ConfigMap updates)."""
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
