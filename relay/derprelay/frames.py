"""Sans-I/O codec for the DERP frame protocol.

Every DERP frame is ``type (1 byte) || length (4 bytes, big-endian) ||
payload``.  This module turns bytes into frame events and frame events into
bytes; it never touches a socket, so each parsing rule is testable with byte
strings (the layout follows Tailscale's ``derp/derp.go``).

The :class:`FrameDecoder` enforces the size limit at the parser edge, before
buffering a payload, so a peer announcing a 4 GiB frame costs us 5 bytes.

The per-packet parts (the decoder, SendPacket, RecvPacket) are written to
compile well with mypyc (``derprelay.speedups``): constants the hot path reads
are ``Final``, so compiled code inlines them instead of looking them up, and
calls go to functions and methods by name, which compiled code makes direct.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from .keys import KEY_LEN, NONCE_LEN

MAGIC = "DERP🔑".encode()
"""Sent first in ServerKey so a client knows it reached a DERP server."""

PROTOCOL_VERSION: Final = 2
"""Version 2 puts the 32-byte source key in front of every RecvPacket."""

FRAME_HEADER_LEN: Final = 5
"""One type byte and a big-endian uint32 payload length."""

MAX_PACKET_SIZE: Final = 64 << 10
"""Largest relayed packet (the bytes WireGuard/disco hand to DERP)."""

MAX_INFO_LEN = 1 << 20
"""Largest sealed ClientInfo/ServerInfo JSON a client accepts."""

MAX_UNTRUSTED_CLIENT_INFO_LEN = 256 << 10
"""Largest ClientInfo a server reads before the client is authenticated."""

MAX_SERVER_FRAME_LEN: Final = 2 * KEY_LEN + MAX_PACKET_SIZE
"""Largest frame a server accepts: a ForwardPacket with a maximal packet."""

MAX_CLIENT_FRAME_LEN = NONCE_LEN + MAX_INFO_LEN + 64
"""Largest frame a client accepts: a ServerInfo box (MAC and slack included)."""

PING_LEN: Final = 8
"""Ping and Pong carry 8 opaque bytes that the peer echoes."""

MAX_PING_FRAME_LEN: Final = 1000
"""Ping frames may grow for future use, but no further than this."""

PEER_PRESENT_ADDR_LEN = 16 + 2
"""PeerPresent's optional IPv6-mapped address and big-endian port."""

_T = TypeVar("_T")
_Event = TypeVar("_Event")

_HEADER = struct.Struct(">BI")
_RESTARTING = struct.Struct(">II")
_PORT = struct.Struct(">H")


class FrameType(enum.IntEnum):
    """Frame type bytes, as numbered in Tailscale's ``derp/derp.go``."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    """Why a PeerGone was sent."""

    DISCONNECTED = 0x00
    """The peer was connected to this region and left."""
    NOT_HERE = 0x01
    """Someone sent to a peer this server has never seen."""
    MESH_CONN_BROKE = 0xF0
    """Invented locally when a mesh connection drops; never on the wire."""


class PeerPresentFlags(enum.IntFlag):
    """Optional flags byte at the end of PeerPresent (0 = old server)."""

    NONE = 0
    REGULAR = 1 << 0
    MESH_PEER = 1 << 1
    PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


class ProtocolError(Exception):
    """The peer broke the DERP protocol; its connection must be closed."""


class FrameTooLargeError(ProtocolError):
    """A frame header announced more bytes than the reader's limit."""


class MalformedFrameError(ProtocolError):
    """A frame's payload does not have the layout its type requires."""


# --- Frame events -----------------------------------------------------------
# Small immutable records, one per frame type; ``encode()`` gives wire bytes.


def _frame(frame_type: FrameType, payload: bytes = b"") -> bytes:
    return _HEADER.pack(frame_type, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class ServerKey:
    """The server's public key, the first frame a server sends."""

    public_key: bytes

    def encode(self) -> bytes:
        return _frame(FrameType.SERVER_KEY, MAGIC + self.public_key)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The client's public key and its ClientInfo JSON sealed to the server."""

    public_key: bytes
    sealed_info: bytes

    def encode(self) -> bytes:
        return _frame(FrameType.CLIENT_INFO, self.public_key + self.sealed_info)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server's ServerInfo JSON sealed to the client; ends the handshake."""

    sealed_info: bytes

    def encode(self) -> bytes:
        return _frame(FrameType.SERVER_INFO, self.sealed_info)


# The three packet events are made once per relayed packet, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs 2.6 times a plain one
# (713 ns against 270 ns, bench/hotpath.py's machine): they are not frozen, but
# are never changed all the same.  Their __init__ is written out (init=False):
# mypyc compiles that one, while the one dataclass generates stays interpreted
# and took a third of a compiled relay's instructions per SendPacket.
@dataclass(slots=True, init=False)
class SendPacket:
    """Client to server: relay ``packet`` to the client keyed ``destination``."""

    destination: bytes
    packet: bytes

    def __init__(self, destination: bytes, packet: bytes) -> None:
        self.destination = destination
        self.packet = packet

    def encode(self) -> bytes:
        return _frame(FrameType.SEND_PACKET, self.destination + self.packet)


@dataclass(slots=True, init=False)  # as SendPacket
class ForwardPacket:
    """Mesh peer to server: deliver a packet another region member received."""

    source: bytes
    destination: bytes
    packet: bytes

    def __init__(self, source: bytes, destination: bytes, packet: bytes) -> None:
        self.source = source
        self.destination = destination
        self.packet = packet

    def encode(self) -> bytes:
        return _frame(FrameType.FORWARD_PACKET, self.source + self.destination + self.packet)


@dataclass(slots=True, init=False)  # as SendPacket
class RecvPacket:
    """Server to client: a packet from ``source``."""

    source: bytes
    packet: bytes

    def __init__(self, source: bytes, packet: bytes) -> None:
        self.source = source
        self.packet = packet

    def encode(self) -> bytes:
        return encode_recv_packet(self.source, self.packet)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Server to client: no-op that keeps NATs and idle timers open."""

    def encode(self) -> bytes:
        return KEEP_ALIVE_FRAME


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """Client to server: whether this server is the client's home."""

    preferred: bool

    def encode(self) -> bytes:
        return _frame(FrameType.NOTE_PREFERRED, b"\x01" if self.preferred else b"\x00")


@dataclass(frozen=True, slots=True)
class PeerGone:
    """Server to client: ``peer`` can no longer be reached through us."""

    peer: bytes
    reason: PeerGoneReason = PeerGoneReason.DISCONNECTED

    def encode(self) -> bytes:
        return _frame(FrameType.PEER_GONE, self.peer + bytes((self.reason,)))


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """Server to watcher: ``peer`` connected, from ``address``:``port``."""

    peer: bytes
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port: int = 0
    flags: PeerPresentFlags = PeerPresentFlags.NONE

    def encode(self) -> bytes:
        address = self.address or ipaddress.IPv6Address(0)
        if isinstance(address, ipaddress.IPv4Address):
            address = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
        payload = self.peer + address.packed + _PORT.pack(self.port) + bytes((self.flags,))
        return _frame(FrameType.PEER_PRESENT, payload)


@dataclass(frozen=True, slots=True)
class WatchConns:
    """Mesh peer to server: subscribe to PeerPresent/PeerGone for all clients."""

    def encode(self) -> bytes:
        return _frame(FrameType.WATCH_CONNS)


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """Mesh peer to server: close every connection of ``peer``."""

    peer: bytes

    def encode(self) -> bytes:
        return _frame(FrameType.CLOSE_PEER, self.peer)


@dataclass(frozen=True, slots=True)
class Ping:
    """Either direction: please echo ``data`` in a Pong."""

    data: bytes

    def encode(self) -> bytes:
        return _frame(FrameType.PING, self.data)


@dataclass(frozen=True, slots=True)
class Pong:
    """Either direction: the echo of a Ping's ``data``."""

    data: bytes

    def encode(self) -> bytes:
        return _frame(FrameType.PONG, self.data)


@dataclass(frozen=True, slots=True)
class Health:
    """Server to client: a problem with this connection; empty clears it."""

    problem: str

    def encode(self) -> bytes:
        return _frame(FrameType.HEALTH, self.problem.encode())


@dataclass(frozen=True, slots=True)
class Restarting:
    """Server to client: reconnect after ``reconnect_in_ms``, keep trying for ``try_for_ms``."""

    reconnect_in_ms: int
    try_for_ms: int

    def encode(self) -> bytes:
        return _frame(FrameType.RESTARTING, _RESTARTING.pack(self.reconnect_in_ms, self.try_for_ms))


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame type this codec does not know; peers must skip it."""

    frame_type: int
    payload: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.frame_type, len(self.payload)) + self.payload


Frame = (
    ServerKey
    | ClientInfo
    | ServerInfo
    | SendPacket
    | ForwardPacket
    | RecvPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
    | UnknownFrame
)

KEEP_ALIVE_FRAME = _HEADER.pack(FrameType.KEEP_ALIVE, 0)

_RECV_PACKET_TYPE: Final = bytes((FrameType.RECV_PACKET,))
_SEND_PACKET_NUMBER: Final = int(FrameType.SEND_PACKET)


def recv_packet_header(packet_len: int) -> bytes:
    """Hot path: the 5 bytes before source key and packet in a RecvPacket frame.

    A relay writes header, key and packet as three parts of one batch, so the
    packet is copied once, into the batch, and not first into a frame of its own.
    (``int.to_bytes`` compiles to C; ``struct.pack`` stays a Python call.)
    """
    return _RECV_PACKET_TYPE + (KEY_LEN + packet_len).to_bytes(4, "big")


def encode_recv_packet(source: bytes, packet: bytes | memoryview) -> bytes:
    """The RecvPacket frame for ``packet`` from ``source``, one allocation."""
    return b"".join((recv_packet_header(len(packet)), source, packet))


# --- Payload parsers ----------------------------------------------------------


def _need(frame_type: FrameType, payload: bytes, minimum: int) -> None:
    if len(payload) < minimum:
        raise MalformedFrameError(
            f"{frame_type.name} frame of {len(payload)} bytes is shorter than {minimum}"
        )


def _exactly(frame_type: FrameType, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise MalformedFrameError(f"{frame_type.name} frame must be {size} bytes, got {len(payload)}")


def _parse_packet_len(frame_type: FrameType, length: int) -> None:
    if length > MAX_PACKET_SIZE:
        raise MalformedFrameError(
            f"{frame_type.name} carries a {length}-byte packet, over the {MAX_PACKET_SIZE} limit"
        )


def parse_frame(frame_type: int, payload: bytes) -> Frame:
    """Turn one frame's type and payload into its event, checking its layout."""
    if frame_type == _SEND_PACKET_NUMBER and KEY_LEN <= len(payload) <= KEY_LEN + MAX_PACKET_SIZE:
        return SendPacket(payload[:KEY_LEN], payload[KEY_LEN:])  # the one that comes per packet, first
    entry = _BY_NUMBER.get(frame_type)
    if entry is None:
        return UnknownFrame(frame_type, payload)
    known, parser = entry
    return parser(known, payload)


def _parse_server_key(t: FrameType, p: bytes) -> Frame:
    _need(t, p, len(MAGIC) + KEY_LEN)
    if p[: len(MAGIC)] != MAGIC:
        raise MalformedFrameError(f"SERVER_KEY has bad magic {p[: len(MAGIC)].hex()}")
    return ServerKey(p[len(MAGIC) : len(MAGIC) + KEY_LEN])


def _parse_client_info(t: FrameType, p: bytes) -> Frame:
    _need(t, p, KEY_LEN + NONCE_LEN)
    return ClientInfo(p[:KEY_LEN], p[KEY_LEN:])


def _parse_server_info(t: FrameType, p: bytes) -> Frame:
    _need(t, p, NONCE_LEN)
    return ServerInfo(p)


def _parse_send_packet(t: FrameType, p: bytes) -> Frame:
    if not KEY_LEN <= len(p) <= KEY_LEN + MAX_PACKET_SIZE:  # one comparison on the hot path
        _need(t, p, KEY_LEN)
        _parse_packet_len(t, len(p) - KEY_LEN)
    return SendPacket(p[:KEY_LEN], p[KEY_LEN:])


def _parse_forward_packet(t: FrameType, p: bytes) -> Frame:
    if not 2 * KEY_LEN <= len(p) <= 2 * KEY_LEN + MAX_PACKET_SIZE:
        _need(t, p, 2 * KEY_LEN)
        _parse_packet_len(t, len(p) - 2 * KEY_LEN)
    return ForwardPacket(p[:KEY_LEN], p[KEY_LEN : 2 * KEY_LEN], p[2 * KEY_LEN :])


def _parse_recv_packet(t: FrameType, p: bytes) -> Frame:
    _need(t, p, KEY_LEN)
    return RecvPacket(p[:KEY_LEN], p[KEY_LEN:])


def _parse_keep_alive(t: FrameType, p: bytes) -> Frame:
    return KeepAlive()


def _parse_note_preferred(t: FrameType, p: bytes) -> Frame:
    _exactly(t, p, 1)
    return NotePreferred(p[0] != 0)


def _parse_peer_gone(t: FrameType, p: bytes) -> Frame:
    _need(t, p, KEY_LEN)
    if len(p) == KEY_LEN:
        return PeerGone(p)
    try:
        reason = PeerGoneReason(p[KEY_LEN])
    except ValueError:
        raise MalformedFrameError(f"PEER_GONE has unknown reason 0x{p[KEY_LEN]:02x}") from None
    return PeerGone(p[:KEY_LEN], reason)


def _parse_peer_present(t: FrameType, p: bytes) -> Frame:
    _need(t, p, KEY_LEN)
    peer = p[:KEY_LEN]
    if len(p) < KEY_LEN + PEER_PRESENT_ADDR_LEN:
        return PeerPresent(peer)
    v6 = ipaddress.IPv6Address(p[KEY_LEN : KEY_LEN + 16])
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = v6.ipv4_mapped or v6
    (port,) = _PORT.unpack_from(p, KEY_LEN + 16)
    flags_at = KEY_LEN + PEER_PRESENT_ADDR_LEN
    flags = PeerPresentFlags(p[flags_at]) if len(p) > flags_at else PeerPresentFlags.NONE
    return PeerPresent(peer, address, port, flags)


def _parse_watch_conns(t: FrameType, p: bytes) -> Frame:
    _exactly(t, p, 0)
    return WatchConns()


def _parse_close_peer(t: FrameType, p: bytes) -> Frame:
    _exactly(t, p, KEY_LEN)
    return ClosePeer(p)


def _parse_ping(t: FrameType, p: bytes) -> Frame:
    _need(t, p, PING_LEN)
    if len(p) > MAX_PING_FRAME_LEN:
        raise MalformedFrameError(f"PING of {len(p)} bytes is over the {MAX_PING_FRAME_LEN} limit")
    return Ping(p[:PING_LEN])


def _parse_pong(t: FrameType, p: bytes) -> Frame:
    _need(t, p, PING_LEN)
    return Pong(p[:PING_LEN])


def _parse_health(t: FrameType, p: bytes) -> Frame:
    return Health(p.decode("utf-8", errors="replace"))


def _parse_restarting(t: FrameType, p: bytes) -> Frame:
    _need(t, p, _RESTARTING.size)
    reconnect_in, try_for = _RESTARTING.unpack_from(p)
    return Restarting(reconnect_in, try_for)


_PARSERS = {
    FrameType.SERVER_KEY: _parse_server_key,
    FrameType.CLIENT_INFO: _parse_client_info,
    FrameType.SERVER_INFO: _parse_server_info,
    FrameType.SEND_PACKET: _parse_send_packet,
    FrameType.FORWARD_PACKET: _parse_forward_packet,
    FrameType.RECV_PACKET: _parse_recv_packet,
    FrameType.KEEP_ALIVE: _parse_keep_alive,
    FrameType.NOTE_PREFERRED: _parse_note_preferred,
    FrameType.PEER_GONE: _parse_peer_gone,
    FrameType.PEER_PRESENT: _parse_peer_present,
    FrameType.WATCH_CONNS: _parse_watch_conns,
    FrameType.CLOSE_PEER: _parse_close_peer,
    FrameType.PING: _parse_ping,
    FrameType.PONG: _parse_pong,
    FrameType.HEALTH: _parse_health,
    FrameType.RESTARTING: _parse_restarting,
}

# Keyed by plain int: constructing the enum per frame costs more than parsing it.
_BY_NUMBER = {int(t): (t, parser) for t, parser in _PARSERS.items()}


class TypeLengthDecoder(Generic[_Event]):
    """Accumulates stream bytes and yields one event per complete message.

    A message is ``type (1 byte) || length (4 bytes, big-endian) || payload``:
    DERP frames, and the messages between a relay's worker processes
    (:mod:`derprelay.workerwire`), which reuse the layout.  ``receive_data``
    takes whatever the transport delivered; ``frames`` turns every complete
    message buffered so far into an event with ``parse``.  A header announcing
    more than ``max_frame_len`` raises :class:`FrameTooLargeError` at once,
    before any of the payload is buffered.  Subclasses say what a message
    means in :meth:`parse` (a method, not a callable attribute, so that
    compiled code calls it directly).

    Messages are cut out of an immutable ``bytes`` chunk: a busy sender's chunk is
    parsed as the transport delivered it, uncopied, and each payload is one slice
    (a ``bytearray`` would cost a copy in and two out, measured in
    ``bench/hotpath.py``).  Only a message split across chunks is gathered, in a
    ``bytearray`` that is turned into bytes once the message is complete, so a peer
    trickling a frame byte by byte costs linear, not quadratic, copying.
    """

    __slots__ = ("_chunk", "_offset", "_partial", "_partial_needed", "max_frame_len")

    def __init__(self, max_frame_len: int) -> None:
        self._chunk = b""
        """Bytes being parsed; everything before ``_offset`` is consumed."""
        self._offset = 0
        self._partial = bytearray()
        """The start of a frame that did not fit in the last chunk."""
        self._partial_needed = 0
        """Bytes ``_partial`` must hold before its frame (or header) is complete."""
        self.max_frame_len = max_frame_len
        """The limit in force; a server raises it once the client is authenticated."""

    def parse(self, message_type: int, payload: bytes) -> _Event:
        """The event for one complete message."""
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as frames."""
        return len(self._chunk) - self._offset + len(self._partial)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._partial:
            self._partial += data
            if len(self._partial) < self._partial_needed:
                return
            chunk = bytes(self._partial)
            self._partial.clear()
        elif self._offset < len(self._chunk):
            # Complete frames wait unread (the reader stopped to admit a client).
            chunk = self._chunk[self._offset :] + data
        else:
            chunk = bytes(data)  # no copy when the transport gave bytes
        self._chunk = chunk
        self._offset = 0

    def frames(self) -> Iterator[_Event]:
        chunk = self._chunk
        while True:
            start = self._offset
            available = len(chunk) - start
            if available < FRAME_HEADER_LEN:
                self._keep_partial(chunk, start, FRAME_HEADER_LEN)
                return
            frame_type = chunk[start]
            # Byte by byte: compiled, four indexings beat a call of struct's unpack_from.
            length = (
                chunk[start + 1] << 24 | chunk[start + 2] << 16 | chunk[start + 3] << 8 | chunk[start + 4]
            )
            if length > self.max_frame_len:
                raise FrameTooLargeError(
                    f"frame type 0x{frame_type:02x} announces {length} bytes, "
                    f"over the {self.max_frame_len}-byte limit"
                )
            end = start + FRAME_HEADER_LEN + length
            if len(chunk) < end:
                self._keep_partial(chunk, start, FRAME_HEADER_LEN + length)
                return
            self._offset = end
            yield self.parse(frame_type, chunk[start + FRAME_HEADER_LEN : end])

    def _keep_partial(self, chunk: bytes, start: int, needed: int) -> None:
        """Move an unfinished frame's first bytes aside until ``needed`` have come."""
        if start < len(chunk):
            self._partial += memoryview(chunk)[start:]
            self._partial_needed = needed
        self._chunk = b""
        self._offset = 0


class FrameDecoder(TypeLengthDecoder[Frame]):
    """The DERP stream decoder: yields :data:`Frame` events."""

    __slots__ = ()

    def parse(self, message_type: int, payload: bytes) -> Frame:
        return parse_frame(message_type, payload)


# --- The sealed handshake JSON -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientInfoMessage:
    """What a client tells the server about itself, sealed in ClientInfo.

    JSON field names are Go's: ``version`` and ``meshKey`` lower-case, the
    rest as declared in ``derp.ClientInfo``.
    """

    version: int = PROTOCOL_VERSION
    mesh_key: str = ""
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"version": self.version, "CanAckPings": self.can_ack_pings}
        if self.mesh_key:
            doc["meshKey"] = self.mesh_key
        if self.is_prober:
            doc["IsProber"] = True
        if self.app_name:
            doc["AppName"] = self.app_name
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClientInfoMessage:
        doc = _json_object(data, "ClientInfo")
        return cls(
            version=_typed(doc, "version", int, 0),
            mesh_key=_typed(doc, "meshKey", str, ""),
            can_ack_pings=_typed(doc, "CanAckPings", bool, False),
            is_prober=_typed(doc, "IsProber", bool, False),
            app_name=_typed(doc, "AppName", str, ""),
        )


@dataclass(frozen=True, slots=True)
class ServerInfoMessage:
    """What the server tells a client, sealed in ServerInfo.

    The token bucket fields announce the server's receive rate limit for this
    client; zero means none.
    """

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"version": self.version}
        if self.token_bucket_bytes_per_second:
            doc["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            doc["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ServerInfoMessage:
        doc = _json_object(data, "ServerInfo")
        return cls(
            version=_typed(doc, "version", int, 0),
            token_bucket_bytes_per_second=_typed(doc, "TokenBucketBytesPerSecond", int, 0),
            token_bucket_bytes_burst=_typed(doc, "TokenBucketBytesBurst", int, 0),
        )


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedFrameError(f"{what} JSON does not parse: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedFrameError(f"{what} JSON is a {type(doc).__name__}, not an object")
    return doc


def _typed(doc: dict[str, Any], name: str, kind: type[_T], default: _T) -> _T:
    value = doc.get(name, default)
    if value is None:
        return default
    # bool is a subclass of int: keep "version": true from passing as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedFrameError(f"field {name!r} must be {kind.__name__}, got {value!r}")
    return value
