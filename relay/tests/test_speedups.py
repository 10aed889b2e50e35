"""The choice between the compiled per-packet modules and their source, made at import.

``make unit`` runs the relay's tests twice, naming the path each run must be
on in ``DERP_RELAY_EXPECT_SPEEDUPS``: a build that failed to load would
otherwise turn the compiled run into a second pure one without anyone noticing.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import derprelay
import pytest
from derprelay import frames, server, speedups, workerwire

PACKAGE = Path(derprelay.__file__).parent


def _is_extension(module: object) -> bool:
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def test_this_process_runs_the_path_it_reports() -> None:
    compiled = [_is_extension(module) for module in (frames, workerwire, server)]
    assert compiled == [derprelay.SPEEDUPS.path == "compiled"] * 3
    assert not _is_extension(speedups)  # the choosing itself is always source
    expected = os.environ.get("DERP_RELAY_EXPECT_SPEEDUPS")
    if expected is not None:
        assert derprelay.SPEEDUPS.path == expected, derprelay.SPEEDUPS.describe()


def _fake_build(entry: Path, **manifest: object) -> Path:
    build = entry / speedups.DIRECTORY
    build.mkdir(parents=True)
    fields = {"source": speedups.source_digest(PACKAGE), "python": speedups.python_tag(), "mypyc": "9.9"}
    (build / speedups.MANIFEST).write_text(json.dumps(fields | manifest))
    return build


def test_a_build_of_this_source_is_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(speedups.DISABLE_ENV, raising=False)
    build = _fake_build(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    chosen = speedups.select(PACKAGE)
    assert (chosen.directory, chosen.path) == (build, "compiled")
    assert chosen.describe() == "compiled by mypyc (frames, workerwire, server; mypyc 9.9)"


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        ({"source": "0" * 64}, "was compiled from other source than"),
        ({"python": "cpython-27"}, "is for cpython-27, not"),
    ],
)
def test_a_stale_or_foreign_build_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest: dict[str, str], reason: str
) -> None:
    monkeypatch.delenv(speedups.DISABLE_ENV, raising=False)
    _fake_build(tmp_path, **manifest)
    monkeypatch.syspath_prepend(str(tmp_path))
    chosen = speedups.select(PACKAGE)
    assert chosen.path == "pure" and reason in chosen.reason


def test_the_environment_variable_turns_a_build_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_build(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(speedups.DISABLE_ENV, "1")
    chosen = speedups.select(PACKAGE)
    assert chosen.describe() == "pure Python (DERP_RELAY_NO_SPEEDUPS is set)"


def test_a_changed_source_file_changes_the_digest(tmp_path: Path) -> None:
    copy = tmp_path / "derprelay"
    copy.mkdir()
    for name in speedups.COMPILED_MODULES:
        (copy / f"{name}.py").write_bytes((PACKAGE / f"{name}.py").read_bytes())
    assert speedups.source_digest(copy) == speedups.source_digest(PACKAGE)
    with (copy / "server.py").open("a") as source:
        source.write("\n")
    assert speedups.source_digest(copy) != speedups.source_digest(PACKAGE)


def test_a_relay_process_takes_the_variable() -> None:
    """What an operator sets in a pod's environment reaches the import of the relay's modules."""
    probe = (
        "import derprelay, derprelay.server as s; print(derprelay.SPEEDUPS.path, type(s.__loader__).__name__)"
    )
    env = os.environ | {speedups.DISABLE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["pure", "SourceFileLoader"]
