"""The session's local cluster: built once (cached), started fresh in a temporary directory.

Tests get a :class:`derpcluster.LocalCluster`: ``kubectl(...)``, ``env()``,
``kubeconfig``, ``node_addresses``, ``helm``, ``pods_dir``.  At the end the
fixture stops it and checks that nothing it started is left running.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
