"""The region's secrets: its mesh key and its self-signed certificate, and the certificate's pin.

Generating them is the only impure step (randomness); the handlers do it
once, when the Secret is missing, and never rotate silently: a new mesh key
splits the mesh until every pod restarts, and a new certificate breaks the
pin clients hold until they fetch the new DERP map.  The cryptography itself
is the relay's (:mod:`derprelay.certs`, :mod:`derprelay.keys`), so operator
and relay agree on the pin and the key format by construction.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Mapping
from dataclasses import dataclass

from derprelay.certs import CertMaterial, generate_self_signed
from derprelay.keys import KeyFormatError, MeshKey

from .model import MAX_REPLICAS, DerpRegionSpec, RegionRef, render_hostname
from .naming import MESH_KEY_FIELD, mesh_domain, mesh_service_name


class CredentialError(ValueError):
    """A Secret's content is not a usable mesh key or certificate; the message says which and why."""


def generate_mesh_key() -> str:
    """A new random mesh key as the relay reads it: 64 lowercase hex digits."""
    return MeshKey.generate().text


def normalize_mesh_key(text: str) -> str:
    """Check a mesh key's format and return its canonical (lowercase) form."""
    try:
        return MeshKey.from_text(text).text
    except KeyFormatError as exc:
        raise CredentialError(str(exc)) from None


def region_tls_names(ref: RegionRef, spec: DerpRegionSpec) -> list[str]:
    """Every name a region's relays answer to: mesh DNS wildcards, then each templated hostname.

    The template is rendered for all possible ordinals, not only today's
    replicas, so scaling up never needs a new certificate (and a new pin).
    """
    names = [f"*.{mesh_domain(ref)}", f"*.{mesh_service_name(ref)}.{ref.namespace}.svc"]
    if spec.hostname_template:
        names += [render_hostname(spec.hostname_template, i) for i in range(MAX_REPLICAS)]
    return list(dict.fromkeys(names))


def generate_region_certificate(ref: RegionRef, spec: DerpRegionSpec) -> CertMaterial:
    """A self-signed ECDSA P-256 certificate (10 years) shared by all of a region's relays.

    It is its own CA, so each relay verifies its mesh peers with it
    (``--mesh-ca-file``), and clients verify it by its pin in the DERP map.
    """
    return generate_self_signed(*region_tls_names(ref, spec))


def _secret_field(secret: Mapping[str, object], key: str) -> bytes:
    data = secret.get("data")
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, str):
        raise CredentialError(f"Secret has no {key!r}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise CredentialError(f"Secret field {key!r} is not base64") from None


def tls_material_from_secret(secret: Mapping[str, object]) -> CertMaterial:
    """The certificate and key of a kubernetes.io/tls Secret (as read from the API)."""
    material = CertMaterial(_secret_field(secret, "tls.crt"), _secret_field(secret, "tls.key"))
    try:
        _ = material.leaf  # parsing it is the check
    except ValueError as exc:
        raise CredentialError(f"tls.crt is not a PEM certificate ({exc})") from None
    return material


def certificate_pin(material: CertMaterial) -> str:
    """The DERP map CertName pinning this certificate: ``sha256-raw:<hex of sha256(leaf DER)>``."""
    return material.cert_name


def mesh_key_from_secret(secret: Mapping[str, object]) -> str:
    try:
        text = _secret_field(secret, MESH_KEY_FIELD).decode("ascii")
    except UnicodeDecodeError:
        raise CredentialError(f"{MESH_KEY_FIELD} is not text") from None
    return normalize_mesh_key(text)


PIN_ROTATION_GRACE = datetime.timedelta(minutes=5)
"""How long after a certificate changes the relays may still serve the one before.

The kubelet projects a changed Secret into running pods after its sync
period and cache delay (a minute or two by default); each relay takes the
new pair on its next look at the files (``derp-relay --cert-reload-interval``).
"""


@dataclass(frozen=True, slots=True)
class PinHistory:
    """The pin of a region's certificate as the operator saw it change: what probes may accept."""

    current: str
    previous: str = ""
    changed: datetime.datetime | None = None

    def observe(self, pin: str, now: datetime.datetime) -> PinHistory:
        """The history after reading the certificate's pin ``pin`` at ``now``."""
        return self if pin == self.current else PinHistory(pin, self.current, now)

    def rotating_out(self, now: datetime.datetime) -> tuple[str, ...]:
        """Pins a probe passes besides ``current``: the one before it, for a while after the change.

        A relay still serving it after :data:`PIN_ROTATION_GRACE` fails its
        probes on the pin: it did not take the new certificate.
        """
        if self.previous and self.changed is not None and now - self.changed < PIN_ROTATION_GRACE:
            return (self.previous,)
        return ()
