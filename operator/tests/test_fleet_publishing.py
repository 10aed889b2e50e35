"""The map across operator restarts: unobserved regions keep their entry, deleted ones drop out."""

from __future__ import annotations

import datetime
import json

from derpoperator.fleet import (
    SOURCES_ANNOTATION,
    ListedRegion,
    assemble_map,
    listed_region,
    previous_regions,
    published_sources,
    regions_to_look_up,
    sources_record,
)
from test_fleet_derp_map import T0, region, running

LATER = T0 + datetime.timedelta(hours=1)


def listed(name: str, region_id: int, created: datetime.datetime = T0) -> ListedRegion:
    return ListedRegion("derp", name, created, region_id)


def regions_of(derp_map_json: str) -> dict[str, list[str]]:
    doc = json.loads(derp_map_json)
    assert doc["omitDefaultRegions"] is True
    return {rid: [n["Name"] for n in r["Nodes"]] for rid, r in doc["Regions"].items()}


def test_observed_regions_are_published_in_id_order() -> None:
    fra = region("fra", (running(0, "203.0.113.7"),), regionID=902)
    ams = region("ams", (running(0, "203.0.113.9"),), regionID=901, regionCode="ams")
    out = assemble_map(
        [listed("fra", 902), listed("ams", 901)], {("derp", "fra"): fra, ("derp", "ams"): ams}, None
    )
    assert list(regions_of(out)) == ["901", "902"]
    assert out.endswith("}\n")


def test_a_region_not_yet_observed_keeps_its_published_entry() -> None:
    fra = region("fra", (running(0, "203.0.113.7"), running(1, "203.0.113.8")), regionID=900)
    before = assemble_map([listed("fra", 900)], {("derp", "fra"): fra}, None)
    # A restarted operator has observed nothing yet: the map stays as it was.
    assert assemble_map([listed("fra", 900)], {}, before) == before
    # Observed with one node gone, the fresh entry replaces the carried one.
    fewer = region("fra", (running(0, "203.0.113.7"),), regionID=900)
    assert regions_of(assemble_map([listed("fra", 900)], {("derp", "fra"): fewer}, before)) == {
        "900": ["900a"]
    }


def test_deleted_regions_and_regions_with_nothing_to_publish_drop_out() -> None:
    fra = region("fra", (running(0, "203.0.113.7"),), regionID=900)
    before = assemble_map([listed("fra", 900)], {("derp", "fra"): fra}, None)
    assert regions_of(assemble_map([], {}, before)) == {}
    assert regions_of(assemble_map([listed("fra", 900)], {("derp", "fra"): None}, before)) == {}


def test_the_later_claimant_of_an_id_is_never_published_even_if_carried() -> None:
    old = region("fra", (running(0, "203.0.113.7"),), regionID=900)
    new = region("fra2", (running(0, "203.0.113.8"),), regionID=900)
    claims = [listed("fra", 900), listed("fra2", 900, LATER)]
    out = assemble_map(claims, {("derp", "fra"): old, ("derp", "fra2"): new}, None)
    assert json.loads(out)["Regions"]["900"]["Nodes"][0]["HostName"] == "203.0.113.7"


def test_an_unreadable_published_map_carries_nothing() -> None:
    assert previous_regions("not json") == {}
    assert previous_regions('{"Regions": []}') == {}
    assert previous_regions(None) == {}
    assert list(previous_regions('{"Regions": {"900": {"RegionID": 900}, "x": {}}}')) == [900]


def test_a_listing_that_lacks_a_published_region_sends_it_to_be_looked_up_by_name() -> None:
    """headscale#2694: an API server restarting may answer an empty list; only a look-up may drop a region."""
    fra = region("fra", (running(0, "203.0.113.7"),), regionID=900)
    before = assemble_map([listed("fra", 900)], {("derp", "fra"): fra}, None)
    record = sources_record([listed("fra", 900)], before)
    assert record == '{"900": "derp/fra"}'
    sources = published_sources({SOURCES_ANNOTATION: record})
    assert regions_to_look_up([], before, sources) == [("derp", "fra")]
    assert regions_to_look_up([listed("fra", 900)], before, sources) == []
    # Found by name, it is a claim again and keeps its entry although the operator observed nothing.
    found = listed_region(
        {
            "metadata": {"namespace": "derp", "name": "fra", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"regionID": 900},
        }
    )
    assert found is not None
    assert assemble_map([found], {}, before) == before
    # A namespaced operator looks up only regions in the namespaces it watches.
    assert regions_to_look_up([], before, sources, ("other",)) == []
    assert regions_to_look_up([], before, sources, ("derp",)) == [("derp", "fra")]
    # A map published before the record existed names no sources: nothing to look up.
    assert regions_to_look_up([], before, {}) == []


def test_a_region_being_deleted_is_no_claim() -> None:
    body = {
        "metadata": {"namespace": "derp", "name": "fra", "deletionTimestamp": "x"},
        "spec": {"regionID": 900},
    }
    assert listed_region(body) is None
    assert listed_region({"metadata": {"namespace": "derp", "name": "fra"}, "spec": {}}) is None


def test_an_unreadable_sources_record_names_nothing() -> None:
    assert published_sources(None) == {}
    assert published_sources({SOURCES_ANNOTATION: "not json"}) == {}
    assert published_sources({SOURCES_ANNOTATION: '{"900": "no-slash", "x": "a/b", "901": "a/b"}'}) == {
        901: ("a", "b")
    }


def test_the_sources_record_names_only_published_winners() -> None:
    fra = region("fra", (running(0, "203.0.113.7"),), regionID=900)
    claims = [listed("fra", 900), listed("fra2", 900, LATER), listed("empty", 903)]
    out = assemble_map(claims, {("derp", "fra"): fra, ("derp", "empty"): None}, None)
    assert json.loads(sources_record(claims, out)) == {"900": "derp/fra"}
