"""Sans-I/O STUN (RFC 5389) binding requests and responses, as Tailscale's netcheck uses them.

Tailscale clients send a Binding Request carrying SOFTWARE "tailnode" and a
FINGERPRINT, and read the XOR-MAPPED-ADDRESS of the answer to learn their
public address.  The relay answers exactly as derper does: a Binding Success
Response with one XOR-MAPPED-ADDRESS attribute.  Unlike derper we also answer
plain RFC 5389 requests without SOFTWARE, so generic STUN tools work; a
FINGERPRINT, when present, must be right.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack(">I", MAGIC_COOKIE)
TXID_LEN = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

FINGERPRINT_XOR = 0x5354554E
"""RFC 5389 section 15.5: the CRC-32 is XORed with "STUN"."""

TAILSCALE_SOFTWARE = b"tailnode"
"""The SOFTWARE value Tailscale's requests carry."""

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

_HEADER = struct.Struct(">HHI12s")
_ATTR = struct.Struct(">HH")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class StunError(ValueError):
    """A datagram is not the STUN message we expected; the message says how."""


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """What a client learns: its transaction and its address as the server saw it."""

    txid: bytes
    address: IPAddress
    port: int


def _fingerprint(data: bytes) -> int:
    return (zlib.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def _attributes(body: bytes) -> list[tuple[int, bytes, int]]:
    """Split attributes into (type, value, offset-of-attribute) triples, checking padding."""
    found = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < _ATTR.size:
            raise StunError("truncated attribute header")
        attr_type, length = _ATTR.unpack_from(body, offset)
        padded = (length + 3) & ~3
        start = offset + _ATTR.size
        if start + padded > len(body):
            raise StunError(f"attribute 0x{attr_type:04x} of {length} bytes runs past the message")
        found.append((attr_type, body[start : start + length], offset))
        offset = start + padded
    return found


def _split(datagram: bytes) -> tuple[int, bytes, bytes]:
    if len(datagram) < HEADER_LEN:
        raise StunError(f"{len(datagram)} bytes is shorter than a STUN header")
    msg_type, length, cookie, txid = _HEADER.unpack_from(datagram)
    if msg_type & 0xC000:
        raise StunError("first two bits must be zero in a STUN message")
    if cookie != MAGIC_COOKIE:
        raise StunError("no STUN magic cookie")
    if length % 4 or HEADER_LEN + length > len(datagram):
        raise StunError(f"message length {length} is not a multiple of 4 within the datagram")
    return msg_type, txid, datagram[HEADER_LEN : HEADER_LEN + length]


def parse_binding_request(datagram: bytes) -> bytes:
    """Return the transaction ID of a valid Binding Request."""
    msg_type, txid, body = _split(datagram)
    if msg_type != BINDING_REQUEST:
        raise StunError(f"message type 0x{msg_type:04x} is not a Binding Request")
    attributes = _attributes(body)
    for index, (attr_type, value, offset) in enumerate(attributes):
        if attr_type != ATTR_FINGERPRINT:
            continue
        if index != len(attributes) - 1 or len(value) != 4:
            raise StunError("FINGERPRINT must be the last attribute and 4 bytes long")
        # The CRC covers the header (with the final length) up to this attribute.
        covered = datagram[: HEADER_LEN + offset]
        if struct.unpack(">I", value)[0] != _fingerprint(covered):
            raise StunError("FINGERPRINT does not match the message")
    return txid


def _xor_address(txid: bytes, address: IPAddress, port: int) -> bytes:
    family = FAMILY_IPV4 if address.version == 4 else FAMILY_IPV6
    key = MAGIC_COOKIE_BYTES + txid
    packed = bytes(a ^ b for a, b in zip(address.packed, key, strict=False))
    return struct.pack(">BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + packed


def binding_response(txid: bytes, address: IPAddress, port: int) -> bytes:
    """A Binding Success Response telling the client ``address``:``port``, as derper sends it."""
    if len(txid) != TXID_LEN:
        raise StunError(f"transaction ID must be {TXID_LEN} bytes")
    value = _xor_address(txid, address, port)
    attribute = _ATTR.pack(ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return _HEADER.pack(BINDING_SUCCESS, len(attribute), MAGIC_COOKIE, txid) + attribute


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def binding_request(txid: bytes) -> bytes:
    """A Binding Request in Tailscale's form: SOFTWARE "tailnode", then FINGERPRINT."""
    software = _ATTR.pack(ATTR_SOFTWARE, len(TAILSCALE_SOFTWARE)) + TAILSCALE_SOFTWARE
    length = len(software) + _ATTR.size + 4
    head = _HEADER.pack(BINDING_REQUEST, length, MAGIC_COOKIE, txid) + software
    return head + _ATTR.pack(ATTR_FINGERPRINT, 4) + struct.pack(">I", _fingerprint(head))


def _unxor(txid: bytes, value: bytes, xored: bool) -> tuple[IPAddress, int]:
    if len(value) < 4:
        raise StunError("address attribute shorter than 4 bytes")
    family, port = value[1], struct.unpack_from(">H", value, 2)[0]
    size = {FAMILY_IPV4: 4, FAMILY_IPV6: 16}.get(family)
    if size is None or len(value) < 4 + size:
        raise StunError(f"address attribute has bad family {family} or length {len(value)}")
    raw = value[4 : 4 + size]
    if xored:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, MAGIC_COOKIE_BYTES + txid, strict=False))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, port


def parse_binding_response(datagram: bytes) -> BindingResponse:
    """Read the mapped address from a Binding Success Response (XOR form preferred)."""
    msg_type, txid, body = _split(datagram)
    if msg_type != BINDING_SUCCESS:
        raise StunError(f"message type 0x{msg_type:04x} is not a Binding Success Response")
    fallback = None
    for attr_type, value, _ in _attributes(body):
        if attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            return BindingResponse(txid, *_unxor(txid, value, xored=True))
        if attr_type == ATTR_MAPPED_ADDRESS:
            fallback = _unxor(txid, value, xored=False)
    if fallback is None:
        raise StunError("response carries no mapped address")
    return BindingResponse(txid, *fallback)
