"""The region's mesh key and self-signed certificate: formats, names, pin, and a real TLS handshake."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import re
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from derpoperator.credentials import (
    CredentialError,
    certificate_pin,
    generate_mesh_key,
    generate_region_certificate,
    mesh_key_from_secret,
    normalize_mesh_key,
    region_tls_names,
    tls_material_from_secret,
)
from derpoperator.model import RegionRef
from derpoperator.naming import pod_mesh_host
from derpoperator.render import render_mesh_secret, render_tls_secret
from derprelay.certs import server_ssl_context
from fleetfixtures import spec_of


def test_mesh_keys_are_64_lowercase_hex_and_random() -> None:
    first, second = generate_mesh_key(), generate_mesh_key()
    assert re.fullmatch("[0-9a-f]{64}", first)
    assert first != second
    assert normalize_mesh_key(f"  {first.upper()}\n") == first
    with pytest.raises(CredentialError):
        normalize_mesh_key("xyz")


def test_tls_names_cover_the_mesh_and_every_possible_hostname(ref: RegionRef) -> None:
    assert region_tls_names(ref, spec_of()) == [
        "*.derp-fra-mesh.derp.svc.cluster.local",
        "*.derp-fra-mesh.derp.svc",
    ]
    names = region_tls_names(ref, spec_of(replicas=1, hostnameTemplate="derp{index}-fra.example.com"))
    assert names[2:] == [f"derp{i}-fra.example.com" for i in range(1, 27)]


def test_region_certificate(ref: RegionRef) -> None:
    spec = spec_of(hostnameTemplate="{letter}.derp.example.com")
    material = generate_region_certificate(ref, spec)
    cert = x509.load_pem_x509_certificate(material.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == region_tls_names(ref, spec)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    assert cert.issuer == cert.subject
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certificate_pin(material) == "sha256-raw:" + hashlib.sha256(der).hexdigest()


def test_secrets_read_back_what_was_rendered(ref: RegionRef) -> None:
    material = generate_region_certificate(ref, spec_of())
    assert tls_material_from_secret(render_tls_secret(ref, material)) == material
    key = generate_mesh_key()
    assert mesh_key_from_secret(render_mesh_secret(ref, key)) == key


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ({}, "no 'tls.crt'"),
        ({"data": {"tls.crt": "***", "tls.key": ""}}, "not base64"),
        ({"data": {"tls.crt": base64.b64encode(b"junk").decode(), "tls.key": ""}}, "not a PEM certificate"),
    ],
)
def test_broken_tls_secrets_are_named(secret: dict[str, object], message: str) -> None:
    with pytest.raises(CredentialError, match=message):
        tls_material_from_secret(secret)


def test_broken_mesh_secret_is_named() -> None:
    with pytest.raises(CredentialError, match="64 hexadecimal digits"):
        mesh_key_from_secret({"data": {"mesh.key": base64.b64encode(b"abcd").decode()}})


async def test_mesh_peers_verify_each_other_with_the_region_certificate(ref: RegionRef) -> None:
    """What --mesh-ca-file does in a relay: the region cert is the CA for its own pod names."""
    material = generate_region_certificate(ref, spec_of())
    served: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await reader.readexactly(5))
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ssl_context(material))
    port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "tls.crt"
        ca_file.write_bytes(material.cert_pem)
        client = ssl.create_default_context(cafile=str(ca_file))
    async with server:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=pod_mesh_host(ref, 1)
        )
        writer.write(b"hello")
        await writer.drain()
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="derp-fra-1.elsewhere"
            )
        for _ in range(100):
            if served:
                break
            await asyncio.sleep(0.01)
    assert served == [b"hello"]
