"""Shared inputs for the operator's pure-layer tests (importable; conftest.py holds the fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from derpoperator.model import DerpRegionSpec, parse_region_spec

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "derpregion.yaml"
EXAMPLES = REPO / "examples"


def spec_of(**fields: Any) -> DerpRegionSpec:
    """A parsed spec: region 900 "fra" plus the given raw (camelCase) fields."""
    return parse_region_spec({"regionID": 900, "regionCode": "fra", **fields})
