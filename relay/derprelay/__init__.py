"""derp-relay: an asyncio DERP relay.

Importing the package picks the per-packet path (:mod:`derprelay.speedups`):
when a compiled build of this very source is installed, its directory goes
first on ``__path__`` so the compiled modules load in place of their source.
"""

from pathlib import Path

from . import speedups

SPEEDUPS = speedups.select(Path(__file__).parent)
"""The path this process runs; the relay logs it and exposes it on ``/debug/`` and in the metrics."""

if SPEEDUPS.directory is not None:
    __path__.insert(0, str(SPEEDUPS.directory))
