"""The fleet DERP map: exact JSON, who gets published, and region ID conflicts."""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from typing import Any

import pytest
from derpoperator.conflicts import find_region_id_conflicts
from derpoperator.derp_map import build_derp_map
from derpoperator.observed import NodeAddress, ObservedNode, ObservedRegion, ProbeResult
from fleetfixtures import spec_of

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
PIN = "sha256-raw:" + "ab" * 32


def running(ordinal: int, *addresses: str, probe_ok: bool | None = True) -> ObservedNode:
    probe = None if probe_ok is None else ProbeResult(probe_ok, T0, 2.0, "" if probe_ok else "timeout")
    return ObservedNode(
        ordinal,
        pod_name=f"derp-x-{ordinal}",
        pod_ready=True,
        addresses=tuple(NodeAddress("ExternalIP", a) for a in addresses),
        probe=probe,
    )


def region(
    name: str = "fra", nodes: tuple[ObservedNode, ...] = (), pin: str = PIN, **fields: Any
) -> ObservedRegion:
    return ObservedRegion(name, "derp", T0, spec_of(**fields), cert_pin=pin, nodes=nodes)


def test_exact_json_for_a_small_fleet() -> None:
    fra = region(
        nodes=(running(0, "203.0.113.7", "2001:db8::7"), running(1, "203.0.113.8")),
        regionName="Frankfurt",
        derpMap={"latitude": 50.11, "longitude": 8.68},
    )
    nyc = region(
        "nyc",
        nodes=(running(0, "198.51.100.1"),),
        pin="",
        regionID=901,
        regionCode="nyc",
        replicas=1,
        hostnameTemplate="derp{index}-nyc.example.com",
        derpPort=8443,
        stunPort=0,
        tls={"mode": "secret", "secretName": "nyc-tls"},
        derpMap={"avoid": True, "noMeasureNoHome": True},
    )
    derp_map = build_derp_map([nyc, fra])
    assert derp_map.to_json() == {
        "Regions": {
            "900": {
                "RegionID": 900,
                "RegionCode": "fra",
                "RegionName": "Frankfurt",
                "Latitude": 50.11,
                "Longitude": 8.68,
                "Nodes": [
                    {
                        "Name": "900a",
                        "RegionID": 900,
                        "HostName": "203.0.113.7",
                        "CertName": PIN,
                        "IPv4": "203.0.113.7",
                        "IPv6": "2001:db8::7",
                    },
                    {
                        "Name": "900b",
                        "RegionID": 900,
                        "HostName": "203.0.113.8",
                        "CertName": PIN,
                        "IPv4": "203.0.113.8",
                    },
                ],
            },
            "901": {
                "RegionID": 901,
                "RegionCode": "nyc",
                "RegionName": "nyc",
                "Avoid": True,
                "NoMeasureNoHome": True,
                "Nodes": [
                    {
                        "Name": "901a",
                        "RegionID": 901,
                        "HostName": "derp1-nyc.example.com",
                        "IPv4": "198.51.100.1",
                        "STUNPort": -1,
                        "DERPPort": 8443,
                    }
                ],
            },
        },
        "omitDefaultRegions": True,
    }
    assert list(json.loads(derp_map.dumps())["Regions"]) == ["900", "901"]


def test_non_default_stun_port_is_published() -> None:
    derp_map = build_derp_map([region(nodes=(running(0, "203.0.113.7"),), replicas=1, stunPort=3479)])
    assert derp_map.to_json()["Regions"]["900"]["Nodes"][0]["STUNPort"] == 3479


def published(r: ObservedRegion) -> list[str]:
    regions = build_derp_map([r]).to_json()["Regions"]
    return [n["Name"] for n in regions["900"]["Nodes"]] if regions else []


def test_unhealthy_nodes_are_left_out_unless_asked_for() -> None:
    nodes = (
        running(0, "203.0.113.7"),
        running(1, "203.0.113.8", probe_ok=False),
        ObservedNode(2, pod_name="derp-x-2", addresses=(NodeAddress("ExternalIP", "203.0.113.9"),)),
    )
    assert published(region(nodes=nodes, replicas=4)) == ["900a"]
    assert published(region(nodes=nodes, replicas=4, publishUnhealthy=True)) == ["900a", "900b", "900c"]


def test_unprobed_ready_relays_are_published() -> None:
    assert published(region(nodes=(running(0, "203.0.113.7", probe_ok=None),), replicas=1)) == ["900a"]


def test_templated_hostname_without_an_address_is_still_dialable() -> None:
    r = region(nodes=(running(0),), replicas=1, hostnameTemplate="derp{index}.example.com")
    assert build_derp_map([r]).to_json()["Regions"]["900"]["Nodes"] == [
        {"Name": "900a", "RegionID": 900, "HostName": "derp1.example.com", "CertName": PIN}
    ]


def test_regions_with_nothing_to_publish_are_left_out() -> None:
    assert published(region(nodes=(running(0, probe_ok=False),), replicas=1)) == []
    assert published(region(nodes=(running(0, "203.0.113.7"),), replicas=1, pin="")) == []
    assert build_derp_map([]).to_json() == {"Regions": {}, "omitDefaultRegions": True}
    assert build_derp_map([], omit_default_regions=False).to_json() == {"Regions": {}}


def test_duplicate_region_ids_must_be_resolved_first() -> None:
    with pytest.raises(ValueError, match=r"duplicate regionIDs \[900\]"):
        build_derp_map([region("fra"), region("ber")])


def test_oldest_region_keeps_its_id() -> None:
    old = region("zzz")
    newer = replace(region("aaa"), created=T0 + datetime.timedelta(hours=1))
    tie = replace(region("bbb"), namespace="alpha")
    other = region("nyc", regionID=901)
    losers = find_region_id_conflicts([newer, other, old, tie])
    assert set(losers) == {("derp", "aaa"), ("derp", "zzz")}
    assert losers[("derp", "aaa")].startswith(
        "regionID 900 is already used by DerpRegion alpha/bbb, which claimed it first"
    )
    assert "choose another regionID" in losers[("derp", "zzz")]
    assert find_region_id_conflicts([old, other]) == {}
