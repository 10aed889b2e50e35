"""``make demo``, the README's main command, keeps working: the same code with ``--once``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pids_naming

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_the_demo_publishes_a_probed_map_and_cleans_up(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO / "e2e" / "cluster")}
    result = subprocess.run(
        [sys.executable, "-m", "derpcluster.demo", "--once", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=360,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Ready=True (2/2 relays healthy and published in the DERP map)" in out
    derp_map = json.loads(out[out.index("{\n") : out.index("\n}\n") + 2])
    nodes = derp_map["Regions"]["901"]["Nodes"]
    assert [n["Name"] for n in nodes] == ["901a", "901b"]
    assert all(n["CertName"].startswith("sha256-raw:") for n in nodes)
    probes = out[out.index("Probes (") :].splitlines()[2:4]
    assert all(" yes " in line and " ms " in line for line in probes), probes
    assert pids_naming(str(state)) == []
