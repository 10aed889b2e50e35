"""The session's local cluster: built once (cached), started fresh in a temporary directory.

Tests get a :class:`derpcluster.LocalCluster`: ``kubectl(...)``, ``env()``,
``kubeconfig``, ``node_addresses``, ``helm``, ``pods_dir``.  At the end the
fixture stops it and checks that nothing it started is left running.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from derpcluster import LocalCluster, down, up


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("cluster")
    started = up(state, progress=False)
    try:
        yield started
    finally:
        down(started)


WAIT = 90.0
"""Seconds for any one thing to converge: pods start, probes run, controllers catch up."""


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (subprocess.CalledProcessError, LookupError, ValueError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def crd_manifest(group: str, kind: str, plural: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A namespaced, single-version (v1) CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
            ],
        },
    }


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a state directory is unique to one cluster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
