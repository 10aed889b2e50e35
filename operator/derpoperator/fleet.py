"""The fleet's DERP map across operator restarts and API trouble: keep the last good one.

A map that loses a region sends every client homed there elsewhere, so a
region leaves the published map only on evidence about that region itself:

* its DerpRegion is gone or being deleted, as a look-up *by name* answers;
* its own fresh reconcile found nothing to serve (no relay passing probes,
  a blocking problem), or it lost a regionID conflict.

Nothing else removes it: not a list of DerpRegions that fails (nothing is
published then), not a list that comes back short or empty (an API server
restarting, an aggregated or cached list not yet filled), not a restarted
operator that has observed nothing yet.  That is the lesson of
headscale#2694, where a failed fetch of a DERP map emptied it: drop the old
entries only on a good answer, never on a missing one.

How: the ConfigMap records, next to the map, which DerpRegion each region
ID was published for (:data:`SOURCES_ANNOTATION`).  A published region the
listing lacks is looked up by that name (:func:`regions_to_look_up`); if it
exists it is a claim like any listed one (:func:`listed_region`), so a region
that is claimed but not observed since the start keeps the entry it has in
the published map, and once observed its fresh entry replaces it.  A map
published before the record existed names no sources: its unlisted regions
drop out as before.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from derprelay.derpmap import DerpMap

from .conflicts import RegionKey, find_region_id_conflicts
from .derp_map import derp_region
from .observed import ObservedRegion


@dataclass(frozen=True, slots=True)
class ListedRegion:
    """A DerpRegion as listed from the API: enough to settle ID conflicts."""

    namespace: str
    name: str
    created: datetime.datetime
    region_id: int

    @property
    def key(self) -> RegionKey:
        return (self.namespace, self.name)


SOURCES_ANNOTATION = "derpfleet.io/region-sources"
"""On the map's ConfigMap: JSON {regionID: "namespace/name"} of the DerpRegion each entry came from."""


def listed_region(body: Mapping[str, Any]) -> ListedRegion | None:
    """A DerpRegion as it claims its ID; None when it is being deleted or has no usable regionID."""
    meta = body.get("metadata") or {}
    region_id = (body.get("spec") or {}).get("regionID")
    if meta.get("deletionTimestamp") or not isinstance(region_id, int):
        return None
    return ListedRegion(
        str(meta["namespace"]), str(meta["name"]), parse_time(meta.get("creationTimestamp")), region_id
    )


def parse_time(text: str | None) -> datetime.datetime:
    """A ``metav1.Time``; none yet (an object just made) is now."""
    if not text:
        return datetime.datetime.now(datetime.UTC)
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def published_sources(annotations: Mapping[str, str] | None) -> dict[int, RegionKey]:
    """The record of :data:`SOURCES_ANNOTATION`; an unreadable one names nothing."""
    try:
        record = json.loads((annotations or {}).get(SOURCES_ANNOTATION) or "{}")
    except json.JSONDecodeError:
        return {}
    if not isinstance(record, dict):
        return {}
    sources = {}
    for rid, source in record.items():
        namespace, slash, name = str(source).partition("/")
        if rid.isdigit() and slash and namespace and name:
            sources[int(rid)] = (namespace, name)
    return sources


def regions_to_look_up(
    claims: Sequence[ListedRegion],
    published_json: str | None,
    sources: Mapping[int, RegionKey],
    watched: Collection[str] = (),
) -> list[RegionKey]:
    """DerpRegions whose entry is published but whom the listing lacks: only a look-up by name may drop them.

    Only in the ``watched`` namespaces (empty: all): a region outside them is
    not this operator's to keep (it may not even be allowed to read it).
    """
    listed = {claim.key for claim in claims}
    wanted = {sources[rid] for rid in previous_regions(published_json) if rid in sources}
    return sorted(key for key in wanted - listed if not watched or key[0] in watched)


def sources_record(claims: Sequence[ListedRegion], published_json: str) -> str:
    """The :data:`SOURCES_ANNOTATION` value for a map about to be published from these claims."""
    losers = find_region_id_conflicts(claims)
    in_map = previous_regions(published_json)
    record = {
        str(claim.region_id): f"{claim.namespace}/{claim.name}"
        for claim in claims
        if claim.key not in losers and claim.region_id in in_map
    }
    return json.dumps(dict(sorted(record.items(), key=lambda item: int(item[0]))), sort_keys=False)


Observation = ObservedRegion | None
"""What the last reconcile of a region made of it; None when it has nothing to publish."""


def previous_regions(published_json: str | None) -> dict[int, dict[str, Any]]:
    """Region entries of the currently published map by ID; an unreadable map carries nothing."""
    try:
        doc = json.loads(published_json or "{}")
    except json.JSONDecodeError:
        return {}
    regions = doc.get("Regions") if isinstance(doc, dict) else None
    if not isinstance(regions, dict):
        return {}
    return {int(rid): entry for rid, entry in regions.items() if rid.isdigit() and isinstance(entry, dict)}


def assemble_map(
    claims: Sequence[ListedRegion],
    observations: Mapping[RegionKey, Observation],
    published_json: str | None,
) -> str:
    """The DERP map JSON to publish now (:meth:`DerpMap.dumps` form, so equal maps are equal bytes)."""
    losers = find_region_id_conflicts(claims)
    carried = previous_regions(published_json)
    fresh = []
    kept: dict[str, dict[str, Any]] = {}
    for claim in claims:
        if claim.key in losers:
            continue
        if claim.key in observations:
            observation = observations[claim.key]
            region = derp_region(observation) if observation is not None else None
            if region is not None:
                fresh.append(region)
        elif claim.region_id in carried:
            kept[str(claim.region_id)] = carried[claim.region_id]
    doc = DerpMap(tuple(fresh)).to_json()
    doc["Regions"] = dict(sorted({**doc["Regions"], **kept}.items(), key=lambda item: int(item[0])))
    return json.dumps(doc, indent=2) + "\n"
