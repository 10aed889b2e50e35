"""A small OCI image writer: files in, an image archive that ``ctr images import`` takes, out.

The real node's sandbox and test images are single static binaries; no image
registry is reachable here, and building them needs no builder: one layer
tar, a config and a manifest, written deterministically (fixed owners and
times), so the same files give the same image digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
"""The full reference ``ctr images import`` names the image by."""


def _layer(files: Mapping[str, Path]) -> bytes:
    """A tar of ``files`` (path in the image -> file here), executables kept executable, owned by root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, source in sorted(files.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            data = source.read_bytes()
            info.size = len(data)
            info.mode = 0o755 if source.stat().st_mode & 0o111 else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def write_image(archive: Path, reference: str, files: Mapping[str, Path], entrypoint: Sequence[str]) -> None:
    """Write an OCI image layout tar holding one image: ``files`` as its only layer."""
    layer = _layer(files)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
    }
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        layer_ref = {"mediaType": LAYER_MEDIA_TYPE, **_blob(tar, layer)}
        config_ref = {"mediaType": CONFIG_MEDIA_TYPE, **_blob(tar, _json(config))}
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config_ref,
            "layers": [layer_ref],
        }
        manifest_ref = {
            "mediaType": MANIFEST_MEDIA_TYPE,
            **_blob(tar, _json(manifest)),
            "annotations": {CONTAINERD_NAME_ANNOTATION: reference},
        }
        for name, content in (
            ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
            ("index.json", _json({"schemaVersion": 2, "manifests": [manifest_ref]})),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    partial.replace(archive)
