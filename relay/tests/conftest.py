"""Fixtures for the relay tests; the harness behind them lives in ``relayharness``."""

from relayharness import mesh_key_file, relay, relay_factory

__all__ = ["mesh_key_file", "relay", "relay_factory"]
