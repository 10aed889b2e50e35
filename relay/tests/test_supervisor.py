"""How many workers: CPU affinity and cgroup quotas, read from real files in a temporary tree."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from derprelay import supervisor


@pytest.mark.parametrize(
    ("text", "cores"),
    [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000", 0.5), ("400000 100000", 4.0)],
)
def test_cgroup_v2_cpu_max(text: str, cores: float | None) -> None:
    assert supervisor.cpu_max_cores(text) == cores


def test_cgroup_v1_cfs_quota() -> None:
    assert supervisor.cfs_quota_cores("-1\n", "100000\n") is None
    assert supervisor.cfs_quota_cores("250000\n", "100000\n") == 2.5


@pytest.mark.parametrize(
    ("cpus", "quota", "workers"),
    [(8, None, 8), (8, 2.0, 2), (8, 1.5, 2), (8, 2.4, 2), (8, 0.2, 1), (2, 4.0, 2), (1, None, 1)],
)
def test_workers_round_to_the_nearest_core(cpus: int, quota: float | None, workers: int) -> None:
    assert supervisor.workers_for(cpus, quota) == workers


def test_v2_quota_is_the_tightest_on_the_way_up(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / "pod1" / "relay"
    pod.mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("800000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("200000 100000\n")
    (pod / "cpu.max").write_text("max 100000\n")
    assert supervisor.cgroup_cpu_quota("0::/kubepods/pod1/relay\n", tmp_path) == 2.0
    assert supervisor.cgroup_cpu_quota("0::/elsewhere\n", tmp_path) is None


def test_v1_quota_inside_a_container_is_read_at_the_mount_root(tmp_path: Path) -> None:
    mount = tmp_path / "cpu,cpuacct"
    mount.mkdir()
    (mount / "cpu.cfs_quota_us").write_text("150000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert supervisor.cgroup_cpu_quota(text, tmp_path) == 1.5


def test_default_workers_is_within_the_affinity() -> None:
    assert 1 <= supervisor.default_workers() <= len(os.sched_getaffinity(0))


def test_shared_sockets_bind_one_port_for_every_worker() -> None:
    shared = supervisor.bind_shared("127.0.0.1", 0, 0, 3)
    try:
        assert len({s.getsockname() for s in shared.derp}) == 1
        assert {s.getsockname()[1] for s in shared.all() if s.type == socket.SOCK_DGRAM} == {shared.stun_port}
        assert shared.derp_port != 0
    finally:
        for sock in shared.all():
            sock.close()
