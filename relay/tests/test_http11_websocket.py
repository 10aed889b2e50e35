"""HTTP request heads, WebSocket framing and the token bucket, with bytes only."""

from __future__ import annotations

import contextlib

import pytest
from derprelay import http11
from derprelay import websocket as ws
from derprelay.ratelimit import TokenBucket
from hypothesis import given
from hypothesis import strategies as st

DERP_REQUEST = (
    b"GET /derp HTTP/1.1\r\nHost: derp.example\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
    b"Derp-Fast-Start: 1\r\n\r\n"
)


def test_parse_derp_upgrade_and_leave_the_rest() -> None:
    parsed = http11.parse_request_head(DERP_REQUEST + b"\x02frame")
    assert parsed is not None
    request, used = parsed
    assert (request.method, request.path) == ("GET", "/derp")
    assert request.header("upgrade") == "DERP" and request.header("derp-fast-start") == "1"
    assert request.header_has_token("connection", "upgrade")
    assert (DERP_REQUEST + b"\x02frame")[used:] == b"\x02frame"


def test_incomplete_head_needs_more() -> None:
    assert http11.parse_request_head(DERP_REQUEST[:20]) is None


def test_repeated_headers_are_joined() -> None:
    parsed = http11.parse_request_head(b"GET /x?y=1 HTTP/1.1\r\nA: 1\r\na: 2\r\n\r\n")
    assert parsed is not None and parsed[0].headers["a"] == "1, 2" and parsed[0].path == "/x"


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"\x16\x03\x01\x02\x00", 400, "not an HTTP request"),
        (b"GET /derp\r\n\r\n", 400, "bad request line"),
        (b"GET /derp SPDY/3\r\n\r\n", 400, "bad request line"),
        (b"GET /derp HTTP/1.1\r\nno colon\r\n\r\n", 400, "bad header line"),
        (b"GET http://x/derp HTTP/1.1\r\n\r\n", 400, "absolute path"),
        (b"GET /" + b"a" * (http11.MAX_REQUEST_HEAD + 1), 431, "over"),
    ],
)
def test_bad_heads_are_refused_with_a_reason(data: bytes, status: int, message: str) -> None:
    with pytest.raises(http11.HttpError, match=message) as caught:
        http11.parse_request_head(data)
    assert caught.value.status == status


@given(st.binary(max_size=400))
def test_random_heads_only_raise_http_errors(data: bytes) -> None:
    with contextlib.suppress(http11.HttpError):
        http11.parse_request_head(data)


def test_response_has_length_and_close() -> None:
    wire = http11.response(200, [("X-A", "b")], b"hi")
    assert wire == b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    assert http11.response(200, [], b"hi", head_only=True).endswith(b"\r\n\r\n")


def test_websocket_accept_token_rfc6455_example() -> None:
    assert ws.accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 100_000])
def test_websocket_masked_round_trip(size: int) -> None:
    payload = bytes(i % 256 for i in range(size))
    decoder = ws.WebSocketDecoder(expect_masked=True)
    wire = ws.encode_frame(ws.OP_BINARY, payload, mask=True)
    for i in range(0, len(wire), 7000):
        decoder.receive_data(wire[i : i + 7000])
    assert list(decoder.events()) == [ws.Data(payload)]


def test_websocket_rfc6455_masked_hello_vector() -> None:
    decoder = ws.WebSocketDecoder(expect_masked=True)
    decoder.receive_data(bytes.fromhex("818537fa213d7f9f4d5158"))
    with pytest.raises(ws.WebSocketError, match="binary"):
        list(decoder.events())  # a text "Hello": DERP refuses text frames


def test_websocket_stream_is_split_into_small_messages() -> None:
    data = bytes(i % 256 for i in range(70_000))
    decoder = ws.WebSocketDecoder(expect_masked=False)
    decoder.receive_data(ws.encode_stream(data))
    events = list(decoder.events())
    assert all(isinstance(e, ws.Data) and len(e.payload) <= ws.MAX_SENT_MESSAGE for e in events)
    assert b"".join(e.payload for e in events if isinstance(e, ws.Data)) == data


def test_websocket_control_frames_and_rules() -> None:
    decoder = ws.WebSocketDecoder(expect_masked=True)
    decoder.receive_data(ws.encode_frame(ws.OP_PING, b"p", mask=True))
    decoder.receive_data(ws.encode_frame(ws.OP_CLOSE, b"\x03\xe8bye", mask=True))
    assert list(decoder.events()) == [ws.PingEvent(b"p"), ws.CloseEvent(1000, "bye")]
    unmasked = ws.WebSocketDecoder(expect_masked=True)
    unmasked.receive_data(ws.encode_frame(ws.OP_BINARY, b"x"))
    with pytest.raises(ws.WebSocketError, match="must be masked") as caught:
        list(unmasked.events())
    assert caught.value.code == ws.CLOSE_PROTOCOL_ERROR
    huge = ws.WebSocketDecoder(expect_masked=False)
    huge.receive_data(bytes([0x82, 127]) + (ws.MAX_MESSAGE_FRAME + 1).to_bytes(8, "big"))
    with pytest.raises(ws.WebSocketError, match="over") as caught:
        list(huge.events())
    assert caught.value.code == ws.CLOSE_TOO_BIG


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.try_take(1, 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.try_take(1, 0.1)
    assert not bucket.try_take(1, 0.1)


def test_token_bucket_debt_tells_how_long_to_pause() -> None:
    bucket = TokenBucket(rate=1000, burst=1000, now=0.0)
    assert bucket.take_debt(500, 0.0) == 0.0
    assert bucket.take_debt(1500, 0.0) == pytest.approx(1.0)
    assert bucket.take_debt(0, 1.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, 1, 0.0)
