"""Fixtures for the operator's tests; plain helpers live in ``fleetfixtures``, real relays in ``relayharness``."""

from __future__ import annotations

import pytest
from derpoperator.model import RegionRef
from relayharness import mesh_key_file, relay, relay_factory

__all__ = ["mesh_key_file", "ref", "relay", "relay_factory"]


@pytest.fixture
def ref() -> RegionRef:
    return RegionRef(name="fra", namespace="derp", uid="0b6e5c1e-uid")
