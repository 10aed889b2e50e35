"""The project's container images, built here from their Dockerfiles without any image registry.

No registry is reachable from the tests, so the Dockerfiles' ``BASE`` is
made here: a Debian root filesystem (debootstrap, from the machine's own
Debian sources) with Python and its venv module, the machine's CA bundle
and pip configuration (so the build reaches the package index the way this
machine does).  buildah (Debian's package; vfs storage, chroot isolation:
no daemon, no nested namespaces) imports it as a base image and builds
``relay/Dockerfile`` and ``operator/Dockerfile`` unchanged, with
``--build-arg BASE=...``.  Each image is exported as an OCI archive for
``ctr images import``.

Everything is cached outside the checkout, by content: the base by suite,
packages and the host files it carries; each image by its Dockerfile, the
sources it copies and the base.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .binaries import BuildError, cache_dir

REPO = Path(__file__).resolve().parents[3]
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_FILES = ("etc/ssl/certs/ca-certificates.crt", "etc/pip.conf")
"""Copied from this machine into the base: how it trusts and reaches the package index."""
IMAGE_SOURCES = ("pyproject.toml", "README.md", "relay", "operator")
"""What the Dockerfiles COPY; an image is rebuilt when any of it changes."""
VERSION = "0.1.0"


@dataclass(frozen=True)
class Image:
    dockerfile: str
    reference: str
    """The name the chart and the operator use by default, so pods find the image already on the node."""


RELAY = Image("relay/Dockerfile", f"ghcr.io/derpfleet/derp-relay:{VERSION}")
OPERATOR = Image("operator/Dockerfile", f"ghcr.io/derpfleet/derpfleet-operator:{VERSION}")


def _suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise BuildError("the base image is made from Debian's packages: /etc/os-release names no Debian suite")


def debian_mirror() -> str:
    """The first Debian archive this machine's apt sources use (deb822 ``.sources`` or ``sources.list``)."""
    sources = Path("/etc/apt")
    for path in sorted(sources.glob("sources.list.d/*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split(":", 1)[1].split()[0]
    for path in [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if len(words) > 2 and words[0] == "deb" and "security" not in words[1]:
                    return next(w for w in words[1:] if "://" in w)
    raise BuildError("no Debian archive in /etc/apt/sources.list*: the base image needs one")


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()[:16]


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{what} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")


def base_rootfs(cache: Path) -> Path:
    """A tar of a minimal Debian with Python (debootstrap), cached by suite, packages and host files."""
    suite = _suite()
    host_files = [Path("/", name) for name in HOST_FILES]
    key = _digest(
        suite.encode(), ",".join(BASE_PACKAGES).encode(), *(p.read_bytes() for p in host_files if p.exists())
    )
    out_dir = cache / f"base-rootfs-{suite}-{key}"
    archive = out_dir / "rootfs.tar"
    if archive.exists():
        return archive
    if shutil.which("debootstrap") is None:
        raise BuildError(
            "the base image needs debootstrap; make installs it (e2e/cluster/install-node-packages)"
        )
    print(
        f">> making the base image: Debian {suite} with {', '.join(BASE_PACKAGES)} (once; about 3 minutes)",
        flush=True,
    )
    started = time.monotonic()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rootfs = partial / "rootfs"
    rootfs.mkdir(parents=True)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            suite,
            str(rootfs),
            debian_mirror(),
        ],
        "debootstrap",
    )
    for source in host_files:
        if source.exists():
            target = rootfs / source.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial / "rootfs.tar"), "."], "tar")
    shutil.rmtree(rootfs)
    partial.rename(out_dir)
    print(f">> made the base image in {time.monotonic() - started:.0f}s", flush=True)
    return archive


def _buildah(cache: Path) -> list[str]:
    """buildah with storage of its own under the cache: vfs needs no overlay support, chroot no namespaces."""
    root = cache / "buildah-vfs"
    return [
        "buildah",
        "--storage-driver",
        "vfs",
        "--root",
        str(root / "storage"),
        "--runroot",
        str(root / "run"),
    ]


def base_image(cache: Path) -> str:
    """The base rootfs as an image in buildah's storage; its name carries the rootfs' cache key."""
    archive = base_rootfs(cache)
    reference = f"localhost/derpfleet-base:{archive.parent.name.removeprefix('base-rootfs-')}"
    buildah = _buildah(cache)
    known = subprocess.run(
        [*buildah, "inspect", "--type", "image", reference], capture_output=True, check=False
    )
    if known.returncode == 0:
        return reference
    container = subprocess.run(
        [*buildah, "from", "scratch"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        _run([*buildah, "add", container, str(archive), "/"], "buildah add (the base rootfs)")
        _run(
            [
                *buildah,
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                container,
            ],
            "buildah config",
        )
        _run([*buildah, "commit", "--quiet", container, reference], "buildah commit (the base)")
    finally:
        subprocess.run([*buildah, "rm", container], capture_output=True, check=False)
    return reference


def _sources_digest(image: Image) -> str:
    parts = [(REPO / image.dockerfile).read_bytes(), (REPO / ".dockerignore").read_bytes()]
    for name in IMAGE_SOURCES:
        path = REPO / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for source in files:
            if "__pycache__" not in source.parts:
                parts += [str(source.relative_to(REPO)).encode(), source.read_bytes()]
    return _digest(*parts)


def build(image: Image, cache: Path | None = None) -> Path:
    """Build ``image`` from its Dockerfile on the made-here base; the docker-archive for ``ctr images import``."""
    cache = cache or cache_dir()
    if shutil.which("buildah") is None:
        raise BuildError(
            "building the images needs buildah; make installs it (e2e/cluster/install-node-packages)"
        )
    base = base_image(cache)
    key = _digest(base.encode(), _sources_digest(image).encode())
    name = image.reference.rsplit("/", 1)[1].split(":")[0]
    archive = cache / "images" / f"{name}-{key}.tar"
    if archive.exists():
        return archive
    print(f">> building {image.reference} from {image.dockerfile} (buildah; BASE={base})", flush=True)
    started = time.monotonic()
    buildah = _buildah(cache)
    _run(
        [
            *buildah,
            "bud",
            "--isolation",
            "chroot",
            "--build-arg",
            f"BASE={base}",
            "--file",
            str(REPO / image.dockerfile),
            "--tag",
            image.reference,
            str(REPO),
        ],
        f"buildah bud {image.dockerfile}",
    )
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    _run(
        [*buildah, "push", "--quiet", image.reference, f"docker-archive:{partial}:{image.reference}"],
        "buildah push",
    )
    partial.rename(archive)
    for stale in archive.parent.glob(f"{name}-*.tar"):
        if stale != archive:
            stale.unlink()  # an earlier source's image: hundreds of megabytes nobody imports again
    # Build stages and replaced tags would pile up in the vfs store, each a full copy.
    subprocess.run([*buildah, "rmi", "--prune"], capture_output=True, check=False)
    print(f">> built {image.reference} in {time.monotonic() - started:.0f}s", flush=True)
    return archive
