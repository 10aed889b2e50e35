"""Which per-packet path this process runs: mypyc-compiled modules, or the pure-Python source.

The modules every relayed packet passes through (:data:`COMPILED_MODULES`)
are plain ``mypy --strict`` Python, and mypyc compiles those same files into C
extension modules (``make speedups``, and the relay image): the source stays
the one truth and keeps running wherever no compiled build is present, as
websockets', aiohttp's and msgpack's speedups do.

A build is a directory named :data:`DIRECTORY` on ``sys.path`` holding the
extension modules and a manifest of the sources and Python they were made
from (``relay/build_speedups.py`` writes it; ``make speedups`` caches it
outside the checkout and links it into the virtualenv with a ``.pth`` file).
At import, ``derprelay/__init__.py`` asks :func:`select` and, when a build
fits, puts that directory first on the package's ``__path__``, so
``import derprelay.server`` loads the compiled module and every other module
its source.  The pure path runs instead when:

- ``DERP_RELAY_NO_SPEEDUPS=1`` is set (:data:`DISABLE_ENV`);
- no build is on ``sys.path``;
- the build was compiled from other source than the files here, or for
  another Python: a stale build would otherwise run yesterday's code
  silently while the source says otherwise.

The relay logs its choice at start and shows it on ``/debug/`` and in the
``derp_relay_speedups_info`` metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

COMPILED_MODULES = ("frames", "workerwire", "server")
"""Compiled together: ``workerwire.MessageDecoder`` subclasses ``frames.TypeLengthDecoder``,
and a compiled class takes no interpreted subclass; ``server`` holds the per-packet state machine."""

GROUP_NAME = "derprelay.compiled"
"""mypyc's name for the build's shared library, ``derprelay/compiled__mypyc...so``."""

DIRECTORY = "derprelay_speedups"
"""The name of a build's directory on ``sys.path``."""

MANIFEST = "manifest.json"

DISABLE_ENV = "DERP_RELAY_NO_SPEEDUPS"
"""Set to 1 to run the pure-Python path although a build is present."""


@dataclass(frozen=True, slots=True)
class Selection:
    """The path chosen at import, and why."""

    directory: Path | None
    """The build's directory, first on ``derprelay.__path__``; None: pure Python."""
    reason: str

    @property
    def path(self) -> str:
        """``compiled`` or ``pure``: the value of the metric's label."""
        return "compiled" if self.directory is not None else "pure"

    def describe(self) -> str:
        """One line for the start-up log and ``/debug/``."""
        if self.directory is None:
            return f"pure Python ({self.reason})"
        return f"compiled by mypyc ({', '.join(COMPILED_MODULES)}; {self.reason})"


def python_tag() -> str:
    """The interpreter an extension module is built for, e.g. ``cpython-311``."""
    return sys.implementation.cache_tag


def source_digest(package_dir: Path) -> str:
    """What a build must have been compiled from: the compiled modules' source, byte for byte."""
    hasher = hashlib.sha256()
    for name in COMPILED_MODULES:
        hasher.update(name.encode() + b"\0")
        hasher.update(hashlib.sha256((package_dir / f"{name}.py").read_bytes()).digest())
    return hasher.hexdigest()


def select(package_dir: Path) -> Selection:
    """Decide, once per process, which path ``derprelay``'s compiled modules come from."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return Selection(None, f"{DISABLE_ENV} is set")
    builds = [Path(entry, DIRECTORY) for entry in sys.path if Path(entry, DIRECTORY, MANIFEST).is_file()]
    if not builds:
        return Selection(None, "no compiled build installed")
    build = builds[0]
    try:
        manifest = json.loads((build / MANIFEST).read_text())
        digest = source_digest(package_dir)
    except (OSError, ValueError) as exc:
        return Selection(None, f"build in {build} unreadable: {exc}")
    if manifest.get("python") != python_tag():
        return Selection(None, f"build in {build} is for {manifest.get('python')}, not {python_tag()}")
    if manifest.get("source") != digest:
        return Selection(None, f"build in {build} was compiled from other source than {package_dir}")
    return Selection(build, f"mypyc {manifest.get('mypyc', '?')}")
