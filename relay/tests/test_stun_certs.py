"""STUN codec vectors and the relay's STUN port; certificates, pins and the meta cert."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import socket
import struct
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from derprelay import certs, stun
from derprelay.metrics import RelayStats
from derprelay.stunserver import start_stun_server
from hypothesis import given
from hypothesis import strategies as st
from relayharness import RelayProcess, metric

# RFC 5769 section 2.2: an IPv4 Binding Success Response from 192.0.2.1:32853.
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_XOR_MAPPED_V4 = bytes.fromhex("0001a147e112a643")


def test_request_in_tailscale_form_parses_and_is_fingerprinted() -> None:
    txid = stun.new_txid()
    request = stun.binding_request(txid)
    assert request[:2] == b"\x00\x01" and request[4:8] == stun.MAGIC_COOKIE_BYTES
    assert b"tailnode" in request and len(request) == 20 + 12 + 8
    assert stun.parse_binding_request(request) == txid


def test_bad_fingerprint_is_refused() -> None:
    request = bytearray(stun.binding_request(stun.new_txid()))
    request[-1] ^= 0xFF
    with pytest.raises(stun.StunError, match="FINGERPRINT does not match"):
        stun.parse_binding_request(bytes(request))


def test_plain_rfc5389_request_without_attributes_is_answered() -> None:
    txid = bytes(range(12))
    plain = struct.pack(">HHI", 1, 0, stun.MAGIC_COOKIE) + txid
    assert stun.parse_binding_request(plain) == txid


def test_response_matches_rfc5769_xor_mapped_address() -> None:
    response = stun.binding_response(RFC5769_TXID, ipaddress.IPv4Address("192.0.2.1"), 32853)
    assert response[:4] == b"\x01\x01\x00\x0c"
    assert response[20:24] == b"\x00\x20\x00\x08" and response[24:] == RFC5769_XOR_MAPPED_V4
    parsed = stun.parse_binding_response(response)
    assert (parsed.txid, str(parsed.address), parsed.port) == (RFC5769_TXID, "192.0.2.1", 32853)


def test_ipv6_response_round_trip() -> None:
    txid = stun.new_txid()
    address = ipaddress.IPv6Address("2001:db8:1234:5678:11:2233:4455:6677")
    parsed = stun.parse_binding_response(stun.binding_response(txid, address, 443))
    assert (parsed.address, parsed.port) == (address, 443)


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (b"\x00\x01\x00", "shorter than a STUN header"),
        (b"\x00\x01\x00\x00" + b"\x00" * 16, "magic cookie"),
        (b"\x01\x01\x00\x00" + stun.MAGIC_COOKIE_BYTES + bytes(12), "not a Binding Request"),
        (b"\x00\x01\x00\x08" + stun.MAGIC_COOKIE_BYTES + bytes(12) + b"\x80\x22\x00\x09abcd", "runs past"),
    ],
)
def test_malformed_requests_say_why(datagram: bytes, message: str) -> None:
    with pytest.raises(stun.StunError, match=message):
        stun.parse_binding_request(datagram)


@given(st.binary(max_size=120))
def test_random_datagrams_only_raise_stun_errors(data: bytes) -> None:
    for parse in (stun.parse_binding_request, stun.parse_binding_response):
        with contextlib.suppress(stun.StunError):
            parse(data)


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
async def test_stun_server_answers_with_the_callers_address(family: socket.AddressFamily, host: str) -> None:
    stats = RelayStats()
    transport = await start_stun_server(host, 0, stats)
    port = transport.get_extra_info("sockname")[1]
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.bind((host, 0))
            client.settimeout(5)
            client.sendto(b"garbage that is not stun", (host, port))
            txid = stun.new_txid()
            client.sendto(stun.binding_request(txid), (host, port))
            reply = await asyncio.get_running_loop().run_in_executor(None, client.recv, 1500)
            parsed = stun.parse_binding_response(reply)
            assert parsed.txid == txid
            assert (str(parsed.address), parsed.port) == (host, client.getsockname()[1])
    finally:
        transport.close()
    assert (stats.stun_requests, stats.stun_malformed) == (1, 1)


def test_relay_process_serves_stun_and_counts_it(relay: RelayProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        txid = stun.new_txid()
        client.sendto(stun.binding_request(txid), ("127.0.0.1", relay.status["stunPort"]))
        parsed = stun.parse_binding_response(client.recv(1500))
        assert (parsed.txid, parsed.port) == (txid, client.getsockname()[1])
    assert metric(relay, "stun_requests_total", 'disposition="success"') == 1


def test_self_signed_certificate_names_and_pin() -> None:
    material = certs.generate_self_signed("127.0.0.1", "derp.example")
    names = material.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["derp.example"]
    der = material.leaf.public_bytes(certs.serialization.Encoding.DER)
    assert material.cert_name == "sha256-raw:" + hashlib.sha256(der).hexdigest()


def test_self_signed_is_kept_so_the_pin_survives_restarts(tmp_path: Path) -> None:
    first = certs.load_or_create_self_signed(tmp_path, "derp.example")
    assert (tmp_path / "derp.example.crt").exists() and (
        tmp_path / "derp.example.key"
    ).stat().st_mode & 0o077 == 0
    assert certs.load_or_create_self_signed(tmp_path, "derp.example").cert_name == first.cert_name


def test_manual_mode_uses_derper_file_names_and_clear_errors(tmp_path: Path) -> None:
    assert certs.manual_paths(tmp_path, "derp_1.example/x") == (
        tmp_path / "derp1.examplex.crt",
        tmp_path / "derp1.examplex.key",
    )
    with pytest.raises(certs.CertError, match=r"derp\.example\.crt: No such file"):
        certs.load_files(*certs.manual_paths(tmp_path, "derp.example"))
    one, other = certs.generate_self_signed("a.example"), certs.generate_self_signed("b.example")
    (tmp_path / "derp.example.crt").write_bytes(one.cert_pem)
    (tmp_path / "derp.example.key").write_bytes(other.key_pem)
    with pytest.raises(certs.CertError, match="is not the key of the certificate"):
        certs.load_files(*certs.manual_paths(tmp_path, "derp.example"))
    (tmp_path / "derp.example.key").write_bytes(b"junk")
    with pytest.raises(certs.CertError, match="not an unencrypted PEM private key"):
        certs.load_files(*certs.manual_paths(tmp_path, "derp.example"))


def test_meta_cert_names_the_server_key_and_protocol_version() -> None:
    key = bytes(range(32))
    meta = x509.load_pem_x509_certificate(certs.meta_cert_pem(key, 2))
    with warnings.catch_warnings():  # the CN is longer than X.520 allows, as derper's is
        warnings.simplefilter("ignore", UserWarning)
        common_name = meta.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert common_name == "derpkey" + key.hex()
    assert meta.serial_number == 2


async def test_tls_handshake_serves_the_pinned_leaf() -> None:
    material = certs.generate_self_signed("127.0.0.1")
    context = certs.server_ssl_context(material, certs.meta_cert_pem(bytes(32), 2))
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client_context = certs.ssl.SSLContext(certs.ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = certs.ssl.CERT_NONE
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context)
        leaf = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    assert "sha256-raw:" + hashlib.sha256(leaf).hexdigest() == material.cert_name
