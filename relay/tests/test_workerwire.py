"""The worker-link codec against byte vectors, round trips and streams cut anywhere."""

from __future__ import annotations

import ipaddress

import pytest
from derprelay import frames as f
from derprelay import workerwire as ww
from hypothesis import given
from hypothesis import strategies as st

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))

EVERY_MESSAGE: list[ww.Message] = [
    ww.Packet(KEY_A, KEY_B, b"wireguard bytes"),
    ww.Packet(KEY_A, KEY_B, b""),
    ww.ClientJoined(
        f.PeerPresent(KEY_A, ipaddress.ip_address("127.0.0.1"), 41641, f.PeerPresentFlags.REGULAR)
    ),
    ww.ClientJoined(
        f.PeerPresent(
            KEY_B, ipaddress.ip_address("::1"), 1, f.PeerPresentFlags.MESH_PEER | f.PeerPresentFlags.NOT_IDEAL
        )
    ),
    ww.ClientLeft(KEY_A),
    ww.ClientActive(KEY_B),
    ww.ClosePeer(KEY_A),
    ww.StatsRequest(7, "varz"),
    ww.StatsReply(7, b"# TYPE x counter\nx_total 1.0\n"),
    ww.Sync(2**32 - 1),
    ww.SyncDone(0),
]


def decode(data: bytes) -> list[ww.Message]:
    decoder = ww.MessageDecoder()
    decoder.receive_data(data)
    return list(decoder.frames())


def test_packet_vector_is_header_keys_packet() -> None:
    wire = ww.Packet(KEY_A, KEY_B, b"hi").encode()
    assert wire == b"\x01\x00\x00\x00\x42" + KEY_A + KEY_B + b"hi"
    assert b"".join(ww.packet_parts(KEY_A, KEY_B, b"hi")) == wire


def test_client_joined_carries_a_peer_present_payload() -> None:
    present = f.PeerPresent(KEY_A, ipaddress.ip_address("10.0.0.1"), 443, f.PeerPresentFlags.PROBER)
    wire = ww.ClientJoined(present).encode()
    assert wire[0] == ww.MessageType.CLIENT_JOINED
    assert wire[5:] == present.encode()[5:]


def test_key_and_id_vectors() -> None:
    assert ww.ClientLeft(KEY_A).encode() == b"\x03\x00\x00\x00\x20" + KEY_A
    assert ww.Sync(258).encode() == b"\x08\x00\x00\x00\x04\x00\x00\x01\x02"
    assert ww.StatsReply(1, b"text").encode() == b"\x07\x00\x00\x00\x08\x00\x00\x00\x01text"


def test_every_message_round_trips_in_one_stream() -> None:
    assert decode(b"".join(m.encode() for m in EVERY_MESSAGE)) == EVERY_MESSAGE


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=20))
def test_a_stream_cut_anywhere_decodes_the_same(cuts: list[int]) -> None:
    wire = b"".join(m.encode() for m in EVERY_MESSAGE)
    decoder = ww.MessageDecoder()
    got: list[ww.Message] = []
    offset = 0
    for size in [*cuts, len(wire)]:
        decoder.receive_data(wire[offset : offset + size])
        got.extend(decoder.frames())
        offset += size
    assert got == EVERY_MESSAGE


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        (b"\x01\x00\x00\x00\x3f" + bytes(63), "no room for two keys"),
        (b"\x03\x00\x00\x00\x1f" + bytes(31), "must carry one key"),
        (b"\x08\x00\x00\x00\x05" + bytes(5), "request id alone"),
        (b"\x07\x00\x00\x00\x03" + bytes(3), "no request id"),
        (b"\x02\x00\x00\x00\x1f" + bytes(31), "shorter than 32"),
        (b"\x7f\x00\x00\x00\x00", "unknown worker message type 0x7f"),
    ],
)
def test_malformed_messages_are_protocol_errors(wire: bytes, complaint: str) -> None:
    with pytest.raises(f.ProtocolError, match=complaint):
        decode(wire)


def test_oversized_message_is_refused_before_its_payload() -> None:
    with pytest.raises(f.FrameTooLargeError):
        decode(b"\x07" + (ww.MAX_MESSAGE_LEN + 1).to_bytes(4, "big"))
