"""Sans-I/O codec of the links between the worker processes of one relay.

With ``--workers N`` a relay is N processes sharing one listening port, one
key and one registry of clients; every pair of workers shares a Unix
socketpair (``derprelay.workerlinks`` moves the bytes).  Over it go packets
for a client connected to the other worker, and the news that keeps each
worker's view of the others' clients right: a client joined, left, became its
key's active connection, or must be closed; plus metric snapshots for
``/metrics``.

A message has the DERP frame layout, ``type (1 byte) || length (4 bytes,
big-endian) || payload``, so the relay's tested decoder cuts them out of the
stream (:class:`derprelay.frames.TypeLengthDecoder`), but the types are our
own: workers of one relay always run the same code, so nothing here is a
compatibility promise.  A packet is 69 bytes of header and keys, written as
parts of a batch so the packet itself is copied once, into the link's write.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from . import frames as f
from .keys import KEY_LEN

MAX_MESSAGE_LEN = 64 << 20
"""Largest message a worker accepts: a metrics snapshot is the big one."""

_HEADER = struct.Struct(">BI")
_REQUEST_ID = struct.Struct(">I")


class MessageType(enum.IntEnum):
    """Message type bytes on a worker link."""

    PACKET = 0x01
    """Source key, destination key, packet: deliver to the destination here."""
    CLIENT_JOINED = 0x02
    """A PeerPresent payload: that worker registered a connection of this key."""
    CLIENT_LEFT = 0x03
    """Key: one of that worker's connections of this key is gone."""
    CLIENT_ACTIVE = 0x04
    """Key: that worker's connection of this key sent last, so it gets the packets."""
    CLOSE_PEER = 0x05
    """Key: close your connections of this key (a mesh peer's ClosePeer)."""
    STATS_REQUEST = 0x06
    """Request id, then the exposition's name (``metrics``, ``varz``): answer with yours."""
    STATS_REPLY = 0x07
    """Request id, then the Prometheus text exposition of that worker."""
    SYNC = 0x08
    """Request id: answer SYNC_DONE once everything sent before it is handled."""
    SYNC_DONE = 0x09
    """Request id of the SYNC answered."""


class WorkerProtocolError(f.ProtocolError):
    """A worker sent bytes no worker of this relay writes: a bug, not an attacker."""


@dataclass(
    slots=True, init=False
)  # not frozen, __init__ written out: one per relayed packet, as frames.SendPacket
class Packet:
    source: bytes
    destination: bytes
    packet: bytes

    def __init__(self, source: bytes, destination: bytes, packet: bytes) -> None:
        self.source = source
        self.destination = destination
        self.packet = packet

    def encode(self) -> bytes:
        return b"".join(packet_parts(self.source, self.destination, self.packet))


@dataclass(frozen=True, slots=True)
class ClientJoined:
    present: f.PeerPresent
    """What watchers are told, as the worker that holds the connection saw it."""

    def encode(self) -> bytes:
        payload = self.present.encode()[f.FRAME_HEADER_LEN :]
        return _HEADER.pack(MessageType.CLIENT_JOINED, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class ClientLeft:
    key: bytes

    def encode(self) -> bytes:
        return _key_message(MessageType.CLIENT_LEFT, self.key)


@dataclass(frozen=True, slots=True)
class ClientActive:
    key: bytes

    def encode(self) -> bytes:
        return _key_message(MessageType.CLIENT_ACTIVE, self.key)


@dataclass(frozen=True, slots=True)
class ClosePeer:
    key: bytes

    def encode(self) -> bytes:
        return _key_message(MessageType.CLOSE_PEER, self.key)


@dataclass(frozen=True, slots=True)
class StatsRequest:
    request_id: int
    exposition: str

    def encode(self) -> bytes:
        payload = _REQUEST_ID.pack(self.request_id) + self.exposition.encode()
        return _HEADER.pack(MessageType.STATS_REQUEST, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Sync:
    request_id: int

    def encode(self) -> bytes:
        return _id_message(MessageType.SYNC, self.request_id)


@dataclass(frozen=True, slots=True)
class SyncDone:
    request_id: int

    def encode(self) -> bytes:
        return _id_message(MessageType.SYNC_DONE, self.request_id)


@dataclass(frozen=True, slots=True)
class StatsReply:
    request_id: int
    exposition: bytes

    def encode(self) -> bytes:
        payload = _REQUEST_ID.pack(self.request_id) + self.exposition
        return _HEADER.pack(MessageType.STATS_REPLY, len(payload)) + payload


Message = (
    Packet
    | ClientJoined
    | ClientLeft
    | ClientActive
    | ClosePeer
    | StatsRequest
    | StatsReply
    | Sync
    | SyncDone
)


_PACKET = int(MessageType.PACKET)


def packet_parts(source: bytes, destination: bytes, packet: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Hot path: a PACKET message as parts of a write batch (the packet uncopied)."""
    return (
        _HEADER.pack(MessageType.PACKET, 2 * KEY_LEN + len(packet)),
        source,
        destination,
        packet,
    )


def _key_message(message_type: MessageType, key: bytes) -> bytes:
    return _HEADER.pack(message_type, len(key)) + key


def _id_message(message_type: MessageType, request_id: int) -> bytes:
    return _HEADER.pack(message_type, _REQUEST_ID.size) + _REQUEST_ID.pack(request_id)


def parse_message(message_type: int, payload: bytes) -> Message:
    """Turn one message into its event, checking its layout."""
    if message_type == _PACKET:  # first, compared as a plain int: the one that comes per packet
        if len(payload) < 2 * KEY_LEN:
            raise WorkerProtocolError(f"PACKET of {len(payload)} bytes has no room for two keys")
        return Packet(payload[:KEY_LEN], payload[KEY_LEN : 2 * KEY_LEN], payload[2 * KEY_LEN :])
    if message_type == MessageType.CLIENT_JOINED:
        present = f.parse_frame(f.FrameType.PEER_PRESENT, payload)
        assert isinstance(present, f.PeerPresent)
        return ClientJoined(present)
    if message_type in _KEY_MESSAGES:
        if len(payload) != KEY_LEN:
            raise WorkerProtocolError(f"{MessageType(message_type).name} must carry one key")
        return _KEY_MESSAGES[message_type](payload)
    if message_type in (MessageType.STATS_REQUEST, MessageType.STATS_REPLY):
        if len(payload) < _REQUEST_ID.size:
            raise WorkerProtocolError(f"{MessageType(message_type).name} has no request id")
        (request_id,) = _REQUEST_ID.unpack_from(payload)
        rest = payload[_REQUEST_ID.size :]
        if message_type == MessageType.STATS_REQUEST:
            try:
                return StatsRequest(request_id, rest.decode("ascii"))
            except UnicodeDecodeError:
                raise WorkerProtocolError("STATS_REQUEST names no exposition") from None
        return StatsReply(request_id, rest)
    if message_type in _ID_MESSAGES:
        if len(payload) != _REQUEST_ID.size:
            raise WorkerProtocolError(f"{MessageType(message_type).name} must carry a request id alone")
        (request_id,) = _REQUEST_ID.unpack_from(payload)
        return _ID_MESSAGES[message_type](request_id)
    raise WorkerProtocolError(f"unknown worker message type 0x{message_type:02x}")


_KEY_MESSAGES: dict[int, type[ClientLeft | ClientActive | ClosePeer]] = {
    MessageType.CLIENT_LEFT: ClientLeft,
    MessageType.CLIENT_ACTIVE: ClientActive,
    MessageType.CLOSE_PEER: ClosePeer,
}


_ID_MESSAGES: dict[int, type[Sync | SyncDone]] = {
    MessageType.SYNC: Sync,
    MessageType.SYNC_DONE: SyncDone,
}


class MessageDecoder(f.TypeLengthDecoder[Message]):
    """Cuts worker messages out of a link's byte stream."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(MAX_MESSAGE_LEN)

    def parse(self, message_type: int, payload: bytes) -> Message:
        return parse_message(message_type, payload)
