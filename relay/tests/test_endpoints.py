"""Plain HTTP endpoints, the dev DERP map, and client admission through a real HTTP endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest
from derprelay import frames as f
from derprelay.client import DerpClientError, connect
from derprelay.keys import NodePrivateKey, public_key_text
from relayharness import RECV_TIMEOUT, RelayProcess, fetch, metric


def test_plain_endpoints(relay: RelayProcess) -> None:
    status, headers, _ = fetch(relay, "/generate_204", {"X-Tailscale-Challenge": "abc.123:Z"})
    assert status == 204 and headers["X-Tailscale-Response"] == "response abc.123:Z"
    status, headers, _ = fetch(relay, "/generate_204", {"X-Tailscale-Challenge": "bad challenge!"})
    assert status == 204 and "X-Tailscale-Response" not in headers
    status, headers, _ = fetch(relay, "/derp/probe")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert fetch(relay, "/derp/latency-check")[0] == 200
    status, _, body = fetch(relay, "/")
    assert status == 200 and b"DERP" in body
    assert fetch(relay, "/robots.txt")[2] == b"User-agent: *\nDisallow: /\n"
    assert json.loads(fetch(relay, "/bootstrap-dns")[2]) == {}
    assert fetch(relay, "/nope")[0] == 404


@pytest.mark.parametrize(
    ("home", "status", "location", "body"),
    [("blank", 200, None, b""), ("https://127.0.0.1/about", 302, "https://127.0.0.1/about", b"")],
)
def test_home_flag_serves_a_blank_page_or_a_redirect(
    relay_factory: Callable[..., RelayProcess], home: str, status: int, location: str | None, body: bytes
) -> None:
    relay = relay_factory("--home", home)
    got_status, headers, got_body = fetch(relay, "/")
    assert (got_status, headers.get("Location"), got_body) == (status, location, body)
    assert fetch(relay, "/derp/probe")[0] == 200  # only / changes


@pytest.mark.parametrize("home", ["ftp://127.0.0.1/", "elsewhere", "https://x/\r\nSet-Cookie: a=b"])
def test_a_bad_home_is_refused_at_start(relay_factory: Callable[..., RelayProcess], home: str) -> None:
    with pytest.raises(RuntimeError, match="--home must be empty, 'blank' or an http"):
        relay_factory("--home", home)


def test_status_file_pins_the_served_certificate(relay: RelayProcess) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", relay.status["derpPort"]), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        leaf = tls.getpeercert(binary_form=True)
    assert leaf is not None
    assert relay.status["certName"] == "sha256-raw:" + hashlib.sha256(leaf).hexdigest()


class _Admission(BaseHTTPRequestHandler):
    # Each fixture makes a subclass with fresh sets, so tests never share them.
    allowed: ClassVar[set[str]] = set()
    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        answer = json.dumps({"Allow": body["NodePublic"] in self.allowed}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admission_server() -> Iterator[tuple[str, type[_Admission]]]:
    handler = type("Admission", (_Admission,), {"allowed": set(), "seen": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/verify", handler
    finally:
        server.shutdown()
        server.server_close()


async def test_admission_allows_and_refuses(
    relay_factory: Callable[..., RelayProcess], admission_server: tuple[str, type[_Admission]]
) -> None:
    url, handler = admission_server
    relay = relay_factory("--verify-client-url", url, "--verify-client-url-fail-open=false")
    allowed, denied = NodePrivateKey.generate(), NodePrivateKey.generate()
    handler.allowed.add(public_key_text(allowed.public))
    async with await connect(relay.endpoint, allowed) as client:
        await client.send(allowed.public, b"to myself")
        got = await asyncio.wait_for(client.recv_packet(), RECV_TIMEOUT)
        assert got.packet == b"to myself"
    with pytest.raises(DerpClientError, match="closed"):
        await connect(relay.endpoint, denied)
    assert [seen["NodePublic"] for seen in handler.seen] == [
        public_key_text(allowed.public),
        public_key_text(denied.public),
    ]
    assert handler.seen[0]["Source"] == "127.0.0.1"
    assert metric(relay, "derp_connections_closed_total", 'reason="not_admitted"') == 1


@pytest.mark.parametrize(
    ("fail_open", "admitted"),
    [
        (["--verify-client-url-fail-open=true"], True),
        (["--verify-client-url-fail-open=false"], False),
        ([], False),
    ],
    ids=["fail-open", "fail-closed", "default-fail-closed"],
)
async def test_unreachable_admission_endpoint(
    relay_factory: Callable[..., RelayProcess], fail_open: list[str], admitted: bool
) -> None:
    relay = relay_factory("--verify-client-url", "http://127.0.0.1:9/verify", *fail_open)
    key = NodePrivateKey.generate()
    if admitted:
        async with await connect(relay.endpoint, key) as client:
            await client.ping(b"fail-opn")
            assert isinstance(await asyncio.wait_for(client.recv(), RECV_TIMEOUT), f.Pong | f.KeepAlive)
    else:
        with pytest.raises(DerpClientError, match="closed"):
            await connect(relay.endpoint, key)
        assert "admission endpoint unreachable" in relay.log()


async def test_accept_rate_limit_turns_away_the_excess(relay_factory: Callable[..., RelayProcess]) -> None:
    # One process: with N workers each takes 1/N of the limit, and the kernel picks the worker.
    relay = relay_factory(
        "--accept-connection-limit", "1", "--accept-connection-burst", "2", "--workers", "1"
    )
    key = NodePrivateKey.generate()
    kept = [await connect(relay.endpoint, key), await connect(relay.endpoint, key)]
    with pytest.raises(DerpClientError):
        await connect(relay.endpoint, key)
    for client in kept:
        await client.close()
    await asyncio.sleep(1.2)  # earn a token for the metrics request itself
    assert metric(relay, "derp_connections_closed_total", 'reason="accept_rate_limited"') == 1
