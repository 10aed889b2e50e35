"""Region ID conflicts across the fleet: the oldest DerpRegion keeps an ID, later claimants lose it.

Two regions with one ID would merge into one region in every client's view,
so the losers stay out of the DERP map and report the conflict in their
status.  Age decides because it is stable: creating a new region can never
take an ID away from one that clients already use.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Protocol

RegionKey = tuple[str, str]
"""(namespace, name) of a DerpRegion."""


class RegionClaim(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def created(self) -> datetime.datetime: ...
    @property
    def region_id(self) -> int: ...


def find_region_id_conflicts(regions: Iterable[RegionClaim]) -> dict[RegionKey, str]:
    """Map each region that loses its regionID to a message saying who holds it and what to do.

    Ties in creation time (one-second resolution) go to namespace/name order.
    """
    holders: dict[int, RegionClaim] = {}
    losers: dict[RegionKey, str] = {}
    for region in sorted(regions, key=lambda r: (r.created, r.namespace, r.name)):
        holder = holders.setdefault(region.region_id, region)
        if holder is not region:
            losers[(region.namespace, region.name)] = (
                f"regionID {region.region_id} is already used by DerpRegion {holder.namespace}/{holder.name}, "
                f"which claimed it first; choose another regionID — this region stays out of the DERP map until then"
            )
    return losers
