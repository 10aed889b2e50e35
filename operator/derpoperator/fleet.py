"""The fleet's DERP map across operator restarts: what was observed, and what is not known yet.

The operator learns regions one reconcile at a time.  Right after it starts
it has seen none of them, and publishing a map of only those seen so far
would pull every other region from clients for a moment.  So a region that
still exists but has not been looked at since the start keeps the entry it
has in the published map; once observed, its fresh entry replaces it, and a
deleted region drops out.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
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
