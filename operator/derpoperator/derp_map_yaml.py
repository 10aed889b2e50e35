"""The DERP map in the YAML form Headscale's ``derp.paths`` reads.

Headscale fetches ``derp.urls`` as JSON, but it reads a ``derp.paths`` file
with gopkg.in/yaml.v3 straight into ``tailcfg.DERPMap``, whose fields carry
JSON tags only.  yaml.v3 then keys each field by its Go name lowercased
(``RegionID`` → ``regionid``, ``OmitDefaultRegions`` → ``omitdefaultregions``)
and ignores keys it does not know, so the JSON map's CamelCase names load as
an empty map, silently.  A map keyed by region ID (``Regions``,
``HomeParams.RegionScore``) is a ``map[int]``, so its keys must be YAML
integers, not the JSON's quoted strings.

The conversion works on the published JSON itself, not on our types: the
published map may carry regions verbatim from before a restart (see
:mod:`.fleet`), and whatever the JSON says, the YAML says too.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

HEADER = "# derpfleet's DERP map for Headscale derp.paths (tailcfg.DERPMap, keyed as yaml.v3 reads it)\n"
INT_KEYED_MAPS = frozenset({"Regions", "RegionScore"})
"""``tailcfg`` fields of Go type ``map[int]…``: their keys are region IDs."""


def _yaml_keys(value: Any, int_keys: bool = False) -> Any:
    """``value`` with every struct field name lowercased, as yaml.v3 names a field without a tag."""
    if isinstance(value, dict):
        if int_keys:
            return {int(k): _yaml_keys(v) for k, v in value.items()}
        return {k.lower(): _yaml_keys(v, k in INT_KEYED_MAPS) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_keys(v) for v in value]
    return value


def headscale_yaml(derp_map_json: str) -> str:
    """The map of ``derp_map_json`` (a ``tailcfg.DERPMap``) as a Headscale ``derp.paths`` file."""
    body = yaml.safe_dump(_yaml_keys(json.loads(derp_map_json)), sort_keys=False, default_flow_style=False)
    return HEADER + body
