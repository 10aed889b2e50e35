"""Fixtures for the operator's pure-layer tests; plain helpers live in ``fleetfixtures``."""

from __future__ import annotations

import pytest
from derpoperator.model import RegionRef


@pytest.fixture
def ref() -> RegionRef:
    return RegionRef(name="fra", namespace="derp", uid="0b6e5c1e-uid")
