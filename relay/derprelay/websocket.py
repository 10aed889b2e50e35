"""Sans-I/O WebSocket (RFC 6455) framing, as DERP-over-WebSocket needs it.

Browsers and wasm clients reach DERP through a WebSocket with subprotocol
``derp``.  The DERP byte stream rides in binary messages whose boundaries mean
nothing, so the decoder simply hands back payload bytes; control frames
(ping, pong, close) surface as events.  Compression is never negotiated:
WireGuard packets do not compress.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455 section 1.3: appended to the client's key to prove we read it."""

SUBPROTOCOL = "derp"
"""The only subprotocol the relay accepts, as derper requires."""

MAX_MESSAGE_FRAME = 1 << 20
"""Largest WebSocket frame payload we buffer (a DERP frame is at most ~64 KiB)."""

MAX_SENT_MESSAGE = 16 * 1024
"""Largest message we send: Tailscale's WebSocket client reads at most 32 KiB per message."""

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009

_FIN = 0x80
_MASKED = 0x80
_LEN16 = struct.Struct(">H")
_LEN64 = struct.Struct(">Q")


class WebSocketError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def accept_token(client_key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(client_key.strip().encode() + ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class Data:
    """Payload bytes of a binary (or continuation) frame."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PingEvent:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseEvent:
    code: int
    reason: str


Event = Data | PingEvent | CloseEvent


def _apply_mask(payload: bytes, mask: bytes) -> bytes:
    # XOR the whole payload at once through big integers: no per-byte loop.
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    length = len(payload)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")


def encode_frame(opcode: int, payload: bytes, *, mask: bool = False) -> bytes:
    """One final frame; clients must ``mask``, servers must not."""
    length = len(payload)
    mask_bit = _MASKED if mask else 0
    if length < 126:
        head = bytes((_FIN | opcode, mask_bit | length))
    elif length < 1 << 16:
        head = bytes((_FIN | opcode, mask_bit | 126)) + _LEN16.pack(length)
    else:
        head = bytes((_FIN | opcode, mask_bit | 127)) + _LEN64.pack(length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _apply_mask(payload, key)


def encode_stream(data: bytes) -> bytes:
    """Stream bytes as binary messages small enough for every client's read limit."""
    if len(data) <= MAX_SENT_MESSAGE:
        return encode_frame(OP_BINARY, data)
    view = memoryview(data)
    return b"".join(
        encode_frame(OP_BINARY, bytes(view[start : start + MAX_SENT_MESSAGE]))
        for start in range(0, len(data), MAX_SENT_MESSAGE)
    )


def encode_close(code: int, reason: str = "") -> bytes:
    return encode_frame(OP_CLOSE, _LEN16.pack(code) + reason.encode()[:120])


class WebSocketDecoder:
    """Turns received bytes into :data:`Event` values.

    ``expect_masked`` is True on the server (client frames must be masked) and
    False on the client.
    """

    __slots__ = ("_buffer", "_expect_masked")

    def __init__(self, *, expect_masked: bool) -> None:
        self._buffer = bytearray()
        self._expect_masked = expect_masked

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def events(self) -> Iterator[Event]:
        buffer = self._buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            if first & 0x70:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
            opcode = first & 0x0F
            masked = bool(second & _MASKED)
            if masked != self._expect_masked:
                which = "masked" if self._expect_masked else "unmasked"
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"frames from this peer must be {which}")
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                (length,) = _LEN16.unpack_from(buffer, 2)
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                (length,) = _LEN64.unpack_from(buffer, 2)
                offset = 10
            if length > MAX_MESSAGE_FRAME:
                raise WebSocketError(CLOSE_TOO_BIG, f"frame of {length} bytes is over {MAX_MESSAGE_FRAME}")
            mask_key = b""
            if masked:
                mask_key = bytes(buffer[offset : offset + 4])
                offset += 4
            end = offset + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[offset:end])
            del buffer[:end]
            if masked:
                payload = _apply_mask(payload, mask_key)
            yield self._event(opcode, payload)

    @staticmethod
    def _event(opcode: int, payload: bytes) -> Event:
        if opcode in (OP_BINARY, OP_CONTINUATION):
            return Data(payload)
        if opcode == OP_PING:
            return PingEvent(payload)
        if opcode == OP_PONG:
            return Data(b"")
        if opcode == OP_CLOSE:
            code = _LEN16.unpack_from(payload)[0] if len(payload) >= 2 else CLOSE_NORMAL
            return CloseEvent(code, payload[2:].decode("utf-8", errors="replace"))
        if opcode == OP_TEXT:
            raise WebSocketError(CLOSE_UNSUPPORTED_DATA, "DERP over WebSocket is binary; got a text frame")
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown opcode 0x{opcode:x}")
