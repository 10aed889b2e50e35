"""The ``derp.paths`` form of the map: the keys yaml.v3 gives tailcfg's fields, region IDs as integers."""

from __future__ import annotations

import json

import yaml
from derpoperator.derp_map_yaml import headscale_yaml
from derpoperator.render import render_derp_map_configmap
from derprelay.derpmap import STUN_PORT_DISABLED, DerpMap, DerpNode, DerpRegion

TAILCFG_REGION_KEYS = {
    "regionid",
    "regioncode",
    "regionname",
    "latitude",
    "longitude",
    "avoid",
    "nomeasurenohome",
    "nodes",
}
"""tailcfg.DERPRegion's fields (tailscale.com v1.102.5) as yaml.v3 keys them: the Go name, lowercased."""
TAILCFG_NODE_KEYS = {
    "name",
    "regionid",
    "hostname",
    "certname",
    "ipv4",
    "ipv6",
    "stunport",
    "stunonly",
    "derpport",
    "insecurefortests",
    "canport80",
}
"""tailcfg.DERPNode's fields that our maps can set, keyed the same way."""

EVERY_FIELD = DerpMap(
    (
        DerpRegion(
            region_id=950,
            region_code="no",  # YAML 1.1 reads a bare no as false: it must stay a string
            region_name="Oslo",
            nodes=(
                DerpNode(
                    name="950a",
                    region_id=950,
                    host_name="203.0.113.7",
                    ipv4="203.0.113.7",
                    ipv6="2001:db8::7",
                    stun_port=STUN_PORT_DISABLED,
                    derp_port=8443,
                    cert_name="sha256-raw:" + "ab" * 32,
                    stun_only=True,
                    insecure_for_tests=True,
                    can_port_80=True,
                ),
            ),
            avoid=True,
            no_measure_no_home=True,
            latitude=59.91,
            longitude=10.75,
        ),
        DerpRegion(901, "lab", "lab", (DerpNode("901a", 901, "127.0.0.11", ipv4="127.0.0.11"),)),
    )
)


def test_every_field_is_keyed_as_yaml_v3_names_it() -> None:
    loaded = yaml.safe_load(headscale_yaml(EVERY_FIELD.dumps()))
    assert set(loaded) == {"regions", "omitdefaultregions"}
    assert loaded["omitdefaultregions"] is True
    assert list(loaded["regions"]) == [901, 950]  # map[int]: integer keys, never "950"
    oslo = loaded["regions"][950]
    assert set(oslo) == TAILCFG_REGION_KEYS
    assert set(oslo["nodes"][0]) == TAILCFG_NODE_KEYS
    assert oslo["regioncode"] == "no"
    assert (oslo["latitude"], oslo["longitude"], oslo["avoid"], oslo["nomeasurenohome"]) == (
        59.91,
        10.75,
        True,
        True,
    )
    assert oslo["nodes"][0] == {
        "name": "950a",
        "regionid": 950,
        "hostname": "203.0.113.7",
        "certname": "sha256-raw:" + "ab" * 32,
        "ipv4": "203.0.113.7",
        "ipv6": "2001:db8::7",
        "stunport": -1,
        "stunonly": True,
        "derpport": 8443,
        "insecurefortests": True,
        "canport80": True,
    }


def test_home_params_region_scores_are_keyed_by_integer_region_id() -> None:
    carried = json.dumps({"Regions": {}, "HomeParams": {"RegionScore": {"901": 0.5}}})
    assert yaml.safe_load(headscale_yaml(carried)) == {
        "regions": {},
        "homeparams": {"regionscore": {901: 0.5}},
    }


def test_the_configmap_holds_both_forms() -> None:
    derp_map_json = EVERY_FIELD.dumps()
    configmap = render_derp_map_configmap("derpfleet-system", "derp-map", derp_map_json)
    assert configmap["data"] == {"derpmap.json": derp_map_json, "derpmap.yaml": headscale_yaml(derp_map_json)}
