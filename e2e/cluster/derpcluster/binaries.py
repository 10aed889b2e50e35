"""The control plane's programs, built from the Go module proxy once and cached by version.

Each program comes from a small Go module of ours under ``e2e/cluster/``
(``k8s/``, ``etcd/``, ``helm/``) whose go.mod pins the release; the binaries
land in ``$CACHE/<name>-<version>/``, outside the checkout, so a second run
(or CI with a warm cache) starts in seconds.  A build shows what it builds
and how long it took; a failed build says which module and shows Go's output.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MODULES = Path(__file__).resolve().parents[1]
"""e2e/cluster: the Go modules that pin each program."""
K8S_PROGRAMS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
NODE_PROGRAMS = ("pause", "echoserver")
"""e2e/cluster/images: static programs the real node's images are made of."""


class BuildError(RuntimeError):
    """A program could not be built; the message carries Go's output."""


def cache_dir() -> Path:
    return Path(os.environ.get("CACHE") or Path.home() / ".cache" / "derpfleet")


def pinned_version(module_dir: Path, module: str) -> str:
    """The version of ``module`` that ``module_dir/go.mod`` requires."""
    text = (module_dir / "go.mod").read_text()
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.MULTILINE)
    if found is None:
        raise BuildError(f"{module_dir / 'go.mod'} does not require {module}")
    return found.group(1)


def go_env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GOMODCACHE": str(cache / "go" / "mod"),
        "GOCACHE": str(cache / "go" / "build"),
        "GOFLAGS": "-modcacherw -mod=readonly",
        "GOTOOLCHAIN": "local",
    }


def _build(
    module_dir: Path,
    packages: list[str],
    out_dir: Path,
    what: str,
    *,
    expected: str,
    renames: dict[str, str] | None = None,
    ldflags: str = "",
    tags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> None:
    if shutil.which("go") is None:
        raise BuildError("building the test cluster needs the Go toolchain (go on PATH); none found")
    print(f">> building {what} (once; cached in {out_dir}; {expected} on 2 cores)", flush=True)
    started = time.monotonic()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    flags = ["-trimpath", f"-ldflags=-s -w {ldflags}".strip(), f"-tags={','.join(tags)}"]
    process = subprocess.Popen(
        ["go", "build", *flags, "-o", f"{partial}/", *packages],
        cwd=module_dir,
        env={**go_env(cache_dir()), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    next_report = started + 30
    while process.poll() is None:
        time.sleep(1)
        if time.monotonic() >= next_report:
            print(f"   … {what}: {time.monotonic() - started:.0f}s", flush=True)
            next_report += 30
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise BuildError(f"go build in {module_dir} failed:\n{output}")
    for built, wanted in (renames or {}).items():
        (partial / built).rename(partial / wanted)
    partial.rename(out_dir)
    print(f">> built {what} in {time.monotonic() - started:.0f}s", flush=True)


@dataclass(frozen=True)
class Binaries:
    k8s_version: str
    k8s_dir: Path
    etcd_version: str
    etcd: Path
    helm_version: str
    helm: Path

    @property
    def kubectl(self) -> Path:
        return self.k8s_dir / "kubectl"


def ensure(cache: Path | None = None) -> Binaries:
    """Build whatever is not cached yet, and say where everything is."""
    cache = cache or cache_dir()
    k8s_version = pinned_version(MODULES / "k8s", "k8s.io/kubernetes")
    etcd_version = pinned_version(MODULES / "etcd", "go.etcd.io/etcd/server/v3")
    helm_version = pinned_version(MODULES / "helm", "helm.sh/helm/v3")
    k8s_dir = cache / f"k8s-{k8s_version}"
    etcd_dir = cache / f"etcd-{etcd_version}"
    helm_dir = cache / f"helm-{helm_version}"
    if not all((k8s_dir / p).exists() for p in K8S_PROGRAMS):
        _build(
            MODULES / "k8s",
            [f"k8s.io/kubernetes/cmd/{p}" for p in K8S_PROGRAMS],
            k8s_dir,
            f"Kubernetes {k8s_version} ({', '.join(K8S_PROGRAMS)})",
            expected="about 5 minutes",
        )
    if not (etcd_dir / "etcd").exists():
        # The server module's main package is its root; Go names the binary after its directory.
        _build(
            MODULES / "etcd",
            ["go.etcd.io/etcd/server/v3"],
            etcd_dir,
            f"etcd {etcd_version}",
            expected="about 1 minute",
            renames={"server": "etcd"},
        )
    if not (helm_dir / "helm").exists():
        _build(
            MODULES / "helm",
            ["helm.sh/helm/v3/cmd/helm"],
            helm_dir,
            f"helm {helm_version}",
            expected="about 1 minute",
            # What helm's own release build stamps in, so `helm version` tells the truth.
            ldflags=f"-X helm.sh/helm/v3/internal/version.version={helm_version}",
        )
    return Binaries(k8s_version, k8s_dir, etcd_version, etcd_dir / "etcd", helm_version, helm_dir / "helm")


def release_ldflags(version: str) -> str:
    """What Kubernetes' release build stamps in, so the kubelet reports its version to the API server."""
    major, minor = version.removeprefix("v").split(".")[:2]
    return " ".join(
        f"-X {package}.{name}={value}"
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for name, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        )
    )


def ensure_kubelet(cache: Path | None = None) -> Path:
    """The kubelet of the real test node, from the same k8s.io/kubernetes module as the control plane.

    It has a cache directory of its own, so adding it never rebuilds the control plane's.
    """
    cache = cache or cache_dir()
    version = pinned_version(MODULES / "k8s", "k8s.io/kubernetes")
    kubelet_dir = cache / f"kubelet-{version}"
    if not (kubelet_dir / "kubelet").exists():
        _build(
            MODULES / "k8s",
            ["k8s.io/kubernetes/cmd/kubelet"],
            kubelet_dir,
            f"kubelet {version}",
            expected="about 2 minutes after the control plane",
            ldflags=release_ldflags(version),
        )
    return kubelet_dir / "kubelet"


def ensure_node_programs(cache: Path | None = None) -> Path:
    """The real node's own programs (``pause``, ``echoserver``), static, cached by their source's hash."""
    cache = cache or cache_dir()
    module = MODULES / "images"
    digest = hashlib.sha256()
    for source in sorted(module.rglob("*")):
        if source.is_file():
            digest.update(f"{source.relative_to(module)}\0".encode() + source.read_bytes())
    out_dir = cache / f"node-programs-{digest.hexdigest()[:16]}"
    if not all((out_dir / p).exists() for p in NODE_PROGRAMS):
        _build(
            module,
            [f"./{p}" for p in NODE_PROGRAMS],
            out_dir,
            "the test node's programs (pause, echoserver)",
            expected="seconds",
            env={"CGO_ENABLED": "0"},
        )
    return out_dir
