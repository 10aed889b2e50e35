"""Headscale and Tailscale's own client, built once per version and cached like the cluster's programs.

The tailnet test runs a real coordination server and real clients on the
operator's published map, so it needs ``headscale``, ``tailscaled`` and
``tailscale``.  Tailscale's two come from the ``tailscale.com`` version that
``e2e/interop/go.mod`` pins (its ``tool`` lines keep their dependencies in
that go.sum).  Headscale is built as its release is: its exact module
version is downloaded and built in place, from its own go.mod and go.sum
(``go install …@version`` would ask the proxy for a version list, which it
refuses here, and a module of ours requiring it would need a copy of its
go.sum kept in step).  ``python -m derpcluster.tailnet_binaries`` builds them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .binaries import MODULES, BuildError, _build, cache_dir, go_env, pinned_version

HEADSCALE_MODULE = "github.com/juanfont/headscale"
HEADSCALE_VERSION = "v0.29.3"
"""The newest Headscale release the module proxy serves here."""
INTEROP_MODULE = MODULES.parent / "interop"
"""e2e/interop: its go.mod pins tailscale.com for the interop tests and these builds alike."""
TAILSCALE_PROGRAMS = ("tailscale", "tailscaled")
STAMPS = ("longStamp", "shortStamp")
OFFLINE_TAGS = ("ts_omit_captiveportal", "ts_omit_cloud", "ts_omit_portmapper", "ts_omit_clientupdate")
"""Tailscale's own build tags for leaving out features that reach past loopback on their own:
captive-portal checks (Tailscale's public hosts), cloud detection (the metadata address),
port mapping (the LAN gateway) and update checks.  Nothing the tests exercise depends on them."""


@dataclass(frozen=True)
class TailnetBinaries:
    headscale_version: str
    headscale: Path
    tailscale_version: str
    tailscale_dir: Path

    @property
    def tailscale(self) -> Path:
        return self.tailscale_dir / "tailscale"

    @property
    def tailscaled(self) -> Path:
        return self.tailscale_dir / "tailscaled"


def _download_module(module: str, version: str, cache: Path) -> Path:
    """``go mod download`` one exact version (a version list is never asked for) and say where it is."""
    print(f">> downloading {module}@{version}", flush=True)
    started = time.monotonic()
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=cache,
        env=go_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(f"go mod download {module}@{version} failed:\n{result.stdout}{result.stderr}")
    print(f">> downloaded {module}@{version} in {time.monotonic() - started:.0f}s", flush=True)
    return Path(json.loads(result.stdout)["Dir"])


def ensure(cache: Path | None = None) -> TailnetBinaries:
    """Build whatever is not cached yet, and say where everything is."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tailscale_version = pinned_version(INTEROP_MODULE, "tailscale.com")
    headscale_dir = cache / f"headscale-{HEADSCALE_VERSION}"
    # The directory names the tag set: a different set is a different build.
    tailscale_dir = cache / f"tailscaled-{tailscale_version}-offline"
    if not (headscale_dir / "headscale").exists():
        source = _download_module(HEADSCALE_MODULE, HEADSCALE_VERSION, cache)
        _build(
            source,
            ["./cmd/headscale"],
            headscale_dir,
            f"Headscale {HEADSCALE_VERSION}",
            expected="about 3 minutes",
        )
    if not all((tailscale_dir / p).exists() for p in TAILSCALE_PROGRAMS):
        _build(
            INTEROP_MODULE,
            [f"tailscale.com/cmd/{p}" for p in TAILSCALE_PROGRAMS],
            tailscale_dir,
            f"tailscale and tailscaled {tailscale_version} ({', '.join(OFFLINE_TAGS)})",
            expected="about 2 minutes",
            tags=OFFLINE_TAGS,
            # What Tailscale's own release build stamps in; unstamped, the version reads x.y.z-ERR-BuildInfo.
            ldflags=" ".join(f"-X tailscale.com/version.{v}={tailscale_version.lstrip('v')}" for v in STAMPS),
        )
    return TailnetBinaries(HEADSCALE_VERSION, headscale_dir / "headscale", tailscale_version, tailscale_dir)


def main() -> int:
    try:
        built = ensure()
    except BuildError as exc:
        print(f"tailnet_binaries: {exc}", file=sys.stderr)
        return 1
    print(f">> Headscale {built.headscale_version}, tailscale/tailscaled {built.tailscale_version} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
