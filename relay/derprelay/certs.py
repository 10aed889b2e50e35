"""TLS material for the relay: certificates from files, generated and pinned ones, the meta cert.

Three ways to get a certificate, as derper has them where it can:

* ``manual``: ``<certdir>/<hostname>.crt`` and ``.key`` (derper's naming, with
  characters outside ``[A-Za-z0-9.-]`` dropped from the hostname), or two
  explicit files (what a Kubernetes Secret mount gives);
* ``selfsigned``: generated at start, kept in the certdir when there is one so
  the pin survives restarts; the DERP map then pins it with
  ``CertName: "sha256-raw:<hex>"`` and no CA or DNS name is needed.

Every listener also sends derper's "meta certificate" after the leaf: a
throwaway certificate whose subject names the relay's DERP public key, which
lets a TLS 1.3 Tailscale client skip waiting for the HTTP 101 (fast start).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hashlib
import ipaddress
import os
import re
import ssl
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

PIN_PREFIX = "sha256-raw:"
"""DERP map CertName prefix for a pinned leaf certificate."""

META_CERT_CN_PREFIX = "derpkey"
"""Subject CN prefix of derper's meta certificate, followed by the hex public key."""

SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)
META_CERT_VALIDITY = datetime.timedelta(days=30)
BACKDATE = datetime.timedelta(days=1)
"""Certificates start a day early so a slightly slow client clock accepts them."""

_UNSAFE_HOSTNAME_CHARS = re.compile(r"[^a-zA-Z0-9.-]")


class CertProblem(enum.StrEnum):
    """What is wrong with a certificate and key pair (the ``result`` label of the reload metric)."""

    UNREADABLE = "unreadable"
    NOT_PEM = "not_pem"
    KEY_MISMATCH = "key_mismatch"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_NAME = "wrong_name"
    REFUSED = "refused"
    """The TLS library would not serve it (a key too weak for its security level, say)."""


class CertError(Exception):
    """A certificate or key could not be loaded or does not fit; the message names the file."""

    def __init__(self, message: str, problem: CertProblem = CertProblem.NOT_PEM) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class CertMaterial:
    """A leaf certificate (PEM, possibly with its chain) and its private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def cert_name(self) -> str:
        """The DERP map CertName that pins this leaf: ``sha256-raw:<hex>``."""
        der = self.leaf.public_bytes(serialization.Encoding.DER)
        return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def _self_issued(
    name: x509.Name,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    serial: int,
    valid_before_now: datetime.timedelta,
    valid_after_now: datetime.timedelta,
) -> x509.CertificateBuilder:
    """A builder for a certificate that is its own issuer, valid around now."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - valid_before_now)
        .not_valid_after(now + valid_after_now)
    )


def _subject_alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def generate_self_signed(hostname: str, *extra_names: str) -> CertMaterial:
    """An ECDSA P-256 certificate for ``hostname`` (a DNS name or an IP) and any extra names."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A unique subject: a CA bundle holding several relays' certificates (mesh
    # peers verify each other with one) must not confuse one issuer for another.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"derp-relay self-signed {os.urandom(6).hex()}"),
            x509.NameAttribute(NameOID.COMMON_NAME, hostname),
        ]
    )
    cert = (
        _self_issued(name, key.public_key(), x509.random_serial_number(), BACKDATE, SELF_SIGNED_VALIDITY)
        .add_extension(_subject_alt_names([hostname, *extra_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CertMaterial(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def manual_paths(certdir: Path, hostname: str) -> tuple[Path, Path]:
    """derper's file names for ``--certmode manual``."""
    safe = _UNSAFE_HOSTNAME_CHARS.sub("", hostname)
    return certdir / f"{safe}.crt", certdir / f"{safe}.key"


def load_files(cert_path: Path, key_path: Path) -> CertMaterial:
    """Load a PEM certificate (chain) and key, checking they parse and belong together."""
    try:
        material = CertMaterial(cert_path.read_bytes(), key_path.read_bytes())
    except OSError as exc:
        raise CertError(f"{exc.filename}: {exc.strerror}", CertProblem.UNREADABLE) from None
    check_pair(material, cert_path, key_path)
    return material


def check_pair(material: CertMaterial, cert_path: Path, key_path: Path) -> None:
    """Raise :class:`CertError` unless the PEMs parse and the key is the certificate's."""
    try:
        leaf = material.leaf
    except ValueError as exc:
        raise CertError(f"{cert_path}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(material.key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertError(
            f"{key_path} is not the key of the certificate in {cert_path}", CertProblem.KEY_MISMATCH
        )


def names_host(leaf: x509.Certificate, hostname: str) -> bool:
    """Whether the leaf's subjectAltNames cover ``hostname`` (an IP, a DNS name, one ``*.`` label).

    As Go's ``VerifyHostname`` (derper checks its manual certificate with it)
    and browsers do, the subject's CN is not looked at.
    """
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(hostname) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    host = hostname.lower().rstrip(".")
    label, _, parent = host.partition(".")
    for pattern in (n.lower().rstrip(".") for n in names.get_values_for_type(x509.DNSName)):
        if pattern == host or (label and parent and pattern == f"*.{parent}"):
            return True
    return False


def check_valid_at(leaf: x509.Certificate, now: datetime.datetime, cert_path: Path) -> None:
    """Raise :class:`CertError` unless ``now`` is within the leaf's validity."""
    if now < leaf.not_valid_before_utc:
        raise CertError(
            f"{cert_path}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
            CertProblem.NOT_YET_VALID,
        )
    if now > leaf.not_valid_after_utc:
        raise CertError(
            f"{cert_path}: expired {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC", CertProblem.EXPIRED
        )


def describe(leaf: x509.Certificate) -> str:
    """Serial and notAfter, how log lines name a certificate."""
    return f"serial {leaf.serial_number:x} notAfter {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"


def load_or_create_self_signed(certdir: Path | None, hostname: str) -> CertMaterial:
    """Reuse the certificate kept in ``certdir`` for ``hostname``, or make and keep one."""
    if certdir is None:
        return generate_self_signed(hostname)
    cert_path, key_path = manual_paths(certdir, hostname)
    if cert_path.exists() and key_path.exists():
        return load_files(cert_path, key_path)
    material = generate_self_signed(hostname)
    try:
        certdir.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, material.key_pem)
        cert_path.write_bytes(material.cert_pem)
    except OSError as exc:
        raise CertError(
            f"{exc.filename}: cannot keep the self-signed certificate: {exc.strerror}", CertProblem.UNREADABLE
        ) from None
    return material


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def meta_cert_pem(server_public_key: bytes, protocol_version: int) -> bytes:
    """derper's meta certificate: CN ``derpkey<hex key>``, serial = protocol version."""
    key = ed25519.Ed25519PrivateKey.generate()
    # "derpkey" + 64 hex digits is 71 characters, over X.520's 64 for a CN; Go doesn't care.
    common_name = META_CERT_CN_PREFIX + server_public_key.hex()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)])
    cert = (
        _self_issued(name, key.public_key(), protocol_version, META_CERT_VALIDITY, META_CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def server_ssl_context(material: CertMaterial, extra_chain_pem: bytes = b"") -> ssl.SSLContext:
    """A server context sending the leaf (and its chain), then ``extra_chain_pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # TLS 1.3 session tickets (OpenSSL sends two after every handshake) cost
    # CPU and bytes per connection, and no Tailscale client keeps a session cache.
    context.num_tickets = 0
    # load_cert_chain reads files only: stage the PEMs in a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="derp-relay-tls-") as tmp:
        chain_path = Path(tmp) / "chain.pem"
        key_path = Path(tmp) / "key.pem"
        chain_path.write_bytes(material.cert_pem.rstrip(b"\n") + b"\n" + extra_chain_pem)
        _write_private(key_path, material.key_pem)
        try:
            context.load_cert_chain(chain_path, key_path)
        except ssl.SSLError as exc:
            raise CertError(
                f"TLS library refused the certificate or key: {exc}", CertProblem.REFUSED
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                key_path.unlink()
    return context
