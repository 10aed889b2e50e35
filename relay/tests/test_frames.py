"""The frame codec against byte vectors, round trips and random input."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools

import pytest
from derprelay import frames as f
from derprelay.keys import KEY_LEN, NodePrivateKey
from hypothesis import given
from hypothesis import strategies as st

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


def decode_all(data: bytes, limit: int = f.MAX_SERVER_FRAME_LEN) -> list[f.Frame]:
    decoder = f.FrameDecoder(limit)
    decoder.receive_data(data)
    return list(decoder.frames())


def test_magic_is_derp_key_emoji() -> None:
    assert bytes.fromhex("44455250f09f9491") == f.MAGIC


def test_server_key_vector() -> None:
    wire = f.ServerKey(KEY_A).encode()
    assert wire == b"\x01\x00\x00\x00\x28" + f.MAGIC + KEY_A
    assert decode_all(wire) == [f.ServerKey(KEY_A)]


def test_server_key_with_future_bytes_still_parses() -> None:
    payload = f.MAGIC + KEY_A + b"future"
    wire = bytes([1]) + len(payload).to_bytes(4, "big") + payload
    assert decode_all(wire) == [f.ServerKey(KEY_A)]


def test_server_key_bad_magic_is_malformed() -> None:
    payload = b"NOTDERP!" + KEY_A
    with pytest.raises(f.MalformedFrameError, match="bad magic"):
        decode_all(bytes([1]) + len(payload).to_bytes(4, "big") + payload)


def test_send_packet_vector() -> None:
    wire = f.SendPacket(KEY_B, b"hi").encode()
    assert wire == b"\x04\x00\x00\x00\x22" + KEY_B + b"hi"


def test_recv_packet_carries_source_first() -> None:
    wire = f.encode_recv_packet(KEY_A, b"x")
    assert wire == b"\x05\x00\x00\x00\x21" + KEY_A + b"x"
    assert f.RecvPacket(KEY_A, b"x").encode() == wire


def test_forward_packet_vector() -> None:
    wire = f.ForwardPacket(KEY_A, KEY_B, b"p").encode()
    assert wire[:5] == b"\x0a\x00\x00\x00\x41"
    assert decode_all(wire) == [f.ForwardPacket(KEY_A, KEY_B, b"p")]


def test_peer_present_full_layout_ipv4_mapped() -> None:
    frame = f.PeerPresent(KEY_A, ipaddress.IPv4Address("192.0.2.7"), 41641, f.PeerPresentFlags.PROBER)
    wire = frame.encode()
    assert len(wire) == 5 + KEY_LEN + 16 + 2 + 1
    assert wire[5 + KEY_LEN : 5 + KEY_LEN + 16] == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert wire[-3:] == b"\xa2\xa9\x04"  # port 41641, flags 4
    assert decode_all(wire) == [frame]


def test_peer_present_old_server_forms() -> None:
    # Old servers send only the key, or key+address without flags.
    just_key = bytes([9]) + (32).to_bytes(4, "big") + KEY_A
    assert decode_all(just_key) == [f.PeerPresent(KEY_A)]
    v6 = ipaddress.IPv6Address("2001:db8::1")
    no_flags = KEY_A + v6.packed + (443).to_bytes(2, "big")
    parsed = decode_all(bytes([9]) + len(no_flags).to_bytes(4, "big") + no_flags)
    assert parsed == [f.PeerPresent(KEY_A, v6, 443, f.PeerPresentFlags.NONE)]


def test_peer_gone_reason_optional_and_checked() -> None:
    assert decode_all(bytes([8]) + (32).to_bytes(4, "big") + KEY_A) == [f.PeerGone(KEY_A)]
    wire = f.PeerGone(KEY_A, f.PeerGoneReason.NOT_HERE).encode()
    assert wire[-1] == 0x01
    assert decode_all(wire) == [f.PeerGone(KEY_A, f.PeerGoneReason.NOT_HERE)]
    with pytest.raises(f.MalformedFrameError, match="unknown reason"):
        decode_all(bytes([8]) + (33).to_bytes(4, "big") + KEY_A + b"\x77")


def test_restarting_vector() -> None:
    wire = f.Restarting(1000, 30000).encode()
    assert wire == b"\x15\x00\x00\x00\x08" + (1000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    assert decode_all(wire) == [f.Restarting(1000, 30000)]


@pytest.mark.parametrize(
    ("frame_type", "payload", "message"),
    [
        (f.FrameType.NOTE_PREFERRED, b"", "must be 1 bytes"),
        (f.FrameType.WATCH_CONNS, b"x", "must be 0 bytes"),
        (f.FrameType.CLOSE_PEER, KEY_A[:31], "must be 32 bytes"),
        (f.FrameType.PING, b"1234567", "shorter than 8"),
        (f.FrameType.PING, bytes(1001), "over the 1000 limit"),
        (f.FrameType.SEND_PACKET, KEY_A[:10], "shorter than 32"),
        (f.FrameType.CLIENT_INFO, KEY_A, "shorter than 56"),
        (f.FrameType.SEND_PACKET, KEY_A + bytes(f.MAX_PACKET_SIZE + 1), "over the 65536 limit"),
    ],
)
def test_malformed_payloads_name_the_problem(frame_type: f.FrameType, payload: bytes, message: str) -> None:
    with pytest.raises(f.MalformedFrameError, match=message):
        f.parse_frame(frame_type, payload)


def test_unknown_frame_type_is_passed_through() -> None:
    assert decode_all(b"\x7f\x00\x00\x00\x02hi") == [f.UnknownFrame(0x7F, b"hi")]


def test_oversized_header_rejected_before_payload_arrives() -> None:
    decoder = f.FrameDecoder(f.MAX_SERVER_FRAME_LEN)
    decoder.receive_data(b"\x04\xff\xff\xff\xff")
    with pytest.raises(f.FrameTooLargeError, match="over the"):
        list(decoder.frames())


def test_maximum_send_packet_fits_the_server_limit() -> None:
    wire = f.SendPacket(KEY_B, bytes(f.MAX_PACKET_SIZE)).encode()
    assert decode_all(wire) == [f.SendPacket(KEY_B, bytes(f.MAX_PACKET_SIZE))]


def test_byte_by_byte_feeding_yields_same_frames() -> None:
    stream = b"".join(
        frame.encode()
        for frame in (f.Ping(b"12345678"), f.SendPacket(KEY_A, b"abc"), f.KeepAlive(), f.Health("dup"))
    )
    decoder = f.FrameDecoder(f.MAX_SERVER_FRAME_LEN)
    seen: list[f.Frame] = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        seen.extend(decoder.frames())
    assert seen == [f.Ping(b"12345678"), f.SendPacket(KEY_A, b"abc"), f.KeepAlive(), f.Health("dup")]
    assert decoder.buffered == 0


keys = st.binary(min_size=32, max_size=32)
packets = st.binary(max_size=2000)
any_frame = st.one_of(
    keys.map(f.ServerKey),
    st.builds(f.ClientInfo, keys, st.binary(min_size=24, max_size=200)),
    st.builds(f.ServerInfo, st.binary(min_size=24, max_size=200)),
    st.builds(f.SendPacket, keys, packets),
    st.builds(f.ForwardPacket, keys, keys, packets),
    st.builds(f.RecvPacket, keys, packets),
    st.just(f.KeepAlive()),
    st.booleans().map(f.NotePreferred),
    st.builds(f.PeerGone, keys, st.sampled_from(list(f.PeerGoneReason))),
    st.builds(
        f.PeerPresent,
        keys,
        # An IPv4-mapped IPv6 address comes back as the IPv4 address it maps.
        st.ip_addresses().filter(lambda a: not (a.version == 6 and a.ipv4_mapped)),
        st.integers(0, 65535),
        st.sampled_from(
            [f.PeerPresentFlags.REGULAR, f.PeerPresentFlags.MESH_PEER | f.PeerPresentFlags.PROBER]
        ),
    ),
    st.just(f.WatchConns()),
    keys.map(f.ClosePeer),
    st.binary(min_size=8, max_size=8).map(f.Ping),
    st.binary(min_size=8, max_size=8).map(f.Pong),
    st.text(max_size=50).map(f.Health),
    st.builds(f.Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)


@given(st.lists(any_frame, max_size=8))
def test_round_trip_any_sequence(sequence: list[f.Frame]) -> None:
    assert decode_all(b"".join(frame.encode() for frame in sequence)) == sequence


@given(
    st.lists(any_frame, max_size=8),
    st.lists(st.integers(1, 3000), max_size=12),
    st.lists(st.integers(0, 3), max_size=12),
)
def test_any_chunking_and_a_reader_that_stops_early_yield_the_same_frames(
    sequence: list[f.Frame], cuts: list[int], takes: list[int]
) -> None:
    """Frames split across chunks, and frames left unread when more bytes come
    (the relay stops reading to admit a client), come out whole and in order."""
    stream = b"".join(frame.encode() for frame in sequence)
    decoder = f.FrameDecoder(f.MAX_SERVER_FRAME_LEN)
    seen: list[f.Frame] = []
    at = 0
    for cut, take in zip(cuts, takes + [0] * len(cuts), strict=False):
        decoder.receive_data(stream[at : at + cut])
        at += cut
        seen.extend(itertools.islice(decoder.frames(), take))
        assert decoder.buffered == min(at, len(stream)) - sum(len(fr.encode()) for fr in seen)
    decoder.receive_data(stream[at:])
    seen.extend(decoder.frames())
    assert seen == sequence
    assert decoder.buffered == 0


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    decoder = f.FrameDecoder(1000)
    decoder.receive_data(data)
    with contextlib.suppress(f.ProtocolError):
        list(decoder.frames())


def test_client_info_json_round_trip_and_go_field_names() -> None:
    info = f.ClientInfoMessage(mesh_key="ab" * 32, can_ack_pings=True, is_prober=True)
    raw = info.to_json()
    assert b'"meshKey"' in raw and b'"CanAckPings":true' in raw and b'"version":2' in raw
    assert f.ClientInfoMessage.from_json(raw) == info


def test_client_info_json_type_errors_are_malformed() -> None:
    with pytest.raises(f.MalformedFrameError, match="version"):
        f.ClientInfoMessage.from_json(b'{"version": true}')
    with pytest.raises(f.MalformedFrameError, match="not an object"):
        f.ClientInfoMessage.from_json(b"[1]")
    with pytest.raises(f.MalformedFrameError, match="does not parse"):
        f.ServerInfoMessage.from_json(b"{")


def test_sealed_handshake_round_trip() -> None:
    server, client = NodePrivateKey.generate(), NodePrivateKey.generate()
    sealed = client.seal_to(server.public, f.ClientInfoMessage().to_json())
    frame = decode_all(f.ClientInfo(client.public, sealed).encode())[0]
    assert isinstance(frame, f.ClientInfo)
    opened = server.open_from(frame.public_key, frame.sealed_info)
    assert f.ClientInfoMessage.from_json(opened).version == f.PROTOCOL_VERSION
