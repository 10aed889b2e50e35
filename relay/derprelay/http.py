"""The relay's listener: one asyncio protocol per TCP (or TLS) connection.

A connection starts as HTTP/1.1.  ``GET /derp`` with ``Upgrade: DERP`` (or a
WebSocket upgrade with subprotocol ``derp``) turns it into a DERP connection
handed to :class:`derprelay.server.ClientConnection`; every other path gets a
small response and the connection is closed.  This module only moves bytes:
parsing lives in ``http11``, ``websocket`` and ``frames``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from . import http11
from . import websocket as ws
from .debug import DebugSite, Reply
from .frames import PROTOCOL_VERSION
from .heaptrim import HeapTrimmer
from .listener import HandshakeLimits, RelayListener, bind_sockets
from .metrics import RelayStats, tcp_info_rtt, tcp_rtt_label
from .ratelimit import TokenBucket
from .server import ClientConnection, RelayServer
from .tlsstream import tls_protocol_factory

log = logging.getLogger("derprelay.http")

FAST_START_HEADER = "derp-fast-start"
"""With value 1 the client skips reading our 101 and speaks DERP at once."""

IDEAL_NODE_HEADER = "ideal-node"
"""Sent by clients connected to a node that is not first in their region."""

CHALLENGE_HEADER = "x-tailscale-challenge"
RESPONSE_HEADER = "X-Tailscale-Response"
MAX_CHALLENGE_LEN = 64
_CHALLENGE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:")

TCP_RTT_INTERVAL = 10.0
"""Seconds between samples of a DERP connection's TCP round-trip time, as derper."""

TCP_INFO_LEN = 104
"""Bytes of struct tcp_info to ask for: enough for tcpi_rtt on every Linux since 2.6."""

WRITE_BUFFER_HIGH = 256 * 1024
"""Transport buffer above which a client counts as not reading (pause_writing)."""

HOME_PAGE = b"""<!doctype html>
<html><head><title>DERP relay</title></head><body>
<h1>DERP</h1>
<p>This is a <a href="https://tailscale.com/kb/1232/derp-servers">DERP</a> relay
(derp-relay, part of derpfleet). It relays encrypted WireGuard packets for
Tailscale and Headscale clients that cannot reach each other directly.</p>
</body></html>
"""
ROBOTS = b"User-agent: *\nDisallow: /\n"


@dataclass(frozen=True, slots=True)
class HomePage:
    """What ``/`` answers (derper's ``-home``): the default page, a blank one, or a redirect.

    A blank page keeps a relay from being found by scanners that look for the
    DERP home page; clients never ask for ``/``.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def from_flag(cls, home: str) -> HomePage:
        """``""`` (the default page), ``"blank"``, or an http(s) URL to redirect to."""
        if home == "":
            return cls(200, (("Content-Type", "text/html; charset=utf-8"),), HOME_PAGE)
        if home == "blank":
            return cls(200, (("Content-Type", "text/html; charset=utf-8"),), b"")
        if re.fullmatch(r"https?://\S+", home):
            return cls(302, (("Location", home),), b"")
        raise ValueError(f"--home must be empty, 'blank' or an http(s) URL to redirect to, not {home!r}")


DEFAULT_HOME = HomePage.from_flag("")


@dataclass(slots=True)
class HttpSite:
    """Everything the HTTP layer serves besides the DERP server itself."""

    server: RelayServer
    debug: DebugSite | None = None
    """``/debug/`` and ``/metrics``; None answers 404 there."""
    bootstrap_dns: Callable[[], bytes] = lambda: b"{}"
    home: HomePage = DEFAULT_HOME
    heap: HeapTrimmer = field(default_factory=HeapTrimmer)
    """Gives freed memory back to the kernel after bursts of connections (see heaptrim)."""
    stats: RelayStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = self.server.stats


class _Phase(enum.Enum):
    HTTP = 1
    DERP = 2
    WEBSOCKET = 3
    RESPONDING = 4
    """A slow answer (a profile, a mesh check) is being made; input is ignored."""
    CLOSED = 5


class RelayHttpProtocol(asyncio.Protocol):
    """Reads one HTTP request, then either answers it or becomes a DERP stream."""

    __slots__ = (  # one per client: no instance dict
        "_answer",
        "_conn",
        "_head",
        "_head_deadline",
        "_peer",
        "_phase",
        "_rtt_timer",
        "_site",
        "_tls_version",
        "_transport",
        "_writing_paused",
        "_ws",
    )

    def __init__(self, site: HttpSite) -> None:
        self._site = site
        self._transport: asyncio.Transport | None = None
        self._phase = _Phase.HTTP
        self._head = bytearray()
        self._conn: ClientConnection | None = None
        self._ws: ws.WebSocketDecoder | None = None
        self._peer: tuple[str, int] = ("", 0)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._tls_version = ""
        self._answer: asyncio.Task[None] | None = None
        self._rtt_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._site.heap.opened()
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        stats = self._site.stats
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls_version = str(ssl_object.version()).removeprefix("TLSv")
            stats.tls_versions_requested[self._tls_version] += 1
            stats.tls_versions_active[self._tls_version] += 1
        timeout = self._site.server.handshake_timeout
        self._head_deadline = asyncio.get_running_loop().call_later(timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is _Phase.DERP:
            assert self._conn is not None
            self._conn.receive_data(data)
        elif phase is _Phase.WEBSOCKET:
            self._websocket_data(data)
        elif phase is _Phase.HTTP:
            self._http_data(data)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._site.heap.closed()
        self._phase = _Phase.CLOSED
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        if self._tls_version:
            self._site.stats.tls_versions_active[self._tls_version] -= 1
        if self._answer is not None:
            self._answer.cancel()
        if self._rtt_timer is not None:
            self._rtt_timer.cancel()
        if self._conn is not None:
            self._conn.connection_lost()
        # Break the cycles (us, the connection, the transport) so that refcounting frees
        # the connection and its TLS state now, not at the next full garbage collection.
        self._conn = None
        self._transport = None

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._conn is not None:
            self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._conn is not None:
            self._conn.resume_writing()

    # --- FrameSink for ClientConnection -------------------------------------------

    def write_frames(self, data: list[bytes]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._phase is _Phase.WEBSOCKET:
            transport.write(ws.encode_stream(b"".join(data)))
        else:
            transport.write(b"".join(data) if len(data) > 1 else data[0])

    def close(self) -> None:
        """Close after a flush; a client that is not reading gets no flush, and frees its buffers now."""
        if self._transport is not None:
            if self._writing_paused:
                self._transport.abort()
            else:
                self._transport.close()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # --- HTTP phase -----------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._phase is _Phase.HTTP:
            timeout = self._site.server.handshake_timeout
            self._reject("http_timeout", f"no HTTP request within {timeout:g}s", None)

    def _http_data(self, data: bytes) -> None:
        self._head += data
        try:
            parsed = http11.parse_request_head(self._head)
        except http11.HttpError as exc:
            self._reject("bad_http", str(exc), exc.status)
            return
        if parsed is None:
            return
        request, used = parsed
        rest = bytes(self._head[used:])
        self._head.clear()
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        self._route(request, rest)

    def _reject(self, reason: str, detail: str, status: int | None) -> None:
        """Answer a bad request (when there is a status to send), count, log, close."""
        self._site.stats.connections_closed[reason] += 1
        log.warning("%s:%d: closed: %s: %s", *self._peer, reason, detail)
        if self._transport is not None:
            if status is not None:
                self._transport.write(http11.response(status, [], (detail + "\n").encode()))
            self._transport.close()
        self._phase = _Phase.CLOSED

    def _reply(
        self, request: http11.Request, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        assert self._transport is not None
        head_only = request.method == "HEAD"
        self._transport.write(http11.response(status, headers, body, head_only=head_only))
        self._transport.close()
        self._phase = _Phase.CLOSED

    def _route(self, request: http11.Request, rest: bytes) -> None:
        path = request.path
        stats = self._site.stats
        if path == "/derp":
            stats.http_requests["derp"] += 1
            self._derp_upgrade(request, rest)
            return
        if path in ("/derp/probe", "/derp/latency-check"):
            stats.http_requests["probe"] += 1
            if request.method not in ("GET", "HEAD"):
                self._reply(request, 405, [], b"bogus probe method\n")
                return
            self._reply(request, 200, [("Access-Control-Allow-Origin", "*")], b"")
            return
        if request.method not in ("GET", "HEAD"):
            stats.http_requests["other"] += 1
            self._reply(request, 405, [("Allow", "GET, HEAD")], b"method not allowed\n")
            return
        if path == "/generate_204":
            stats.http_requests["generate_204"] += 1
            self._reply(request, 204, _no_content_headers(request.header(CHALLENGE_HEADER)), b"")
        elif path == "/":
            stats.http_requests["home"] += 1
            home = self._site.home
            self._reply(request, home.status, list(home.headers), home.body)
        elif path == "/robots.txt":
            stats.http_requests["robots"] += 1
            self._reply(request, 200, [("Content-Type", "text/plain")], ROBOTS)
        elif path == "/bootstrap-dns":
            stats.http_requests["bootstrap_dns"] += 1
            self._reply(request, 200, [("Content-Type", "application/json")], self._site.bootstrap_dns())
        elif path in ("/metrics", "/debug") or path.startswith("/debug/"):
            self._debug(request)
        else:
            stats.http_requests["not_found"] += 1
            self._reply(request, 404, [("Content-Type", "text/plain")], b"not found\n")

    def _debug(self, request: http11.Request) -> None:
        debug = self._site.debug
        stats = self._site.stats
        if debug is None:
            stats.http_requests["not_found"] += 1
            self._reply(request, 404, [("Content-Type", "text/plain")], b"not found\n")
            return
        if not debug.access.allows(self._peer[0], request.headers):
            stats.http_requests["debug_denied"] += 1
            log.info("%s:%d: debug access denied to %s", *self._peer, request.path)
            self._reply(request, 403, [("Content-Type", "text/plain")], b"debug access denied\n")
            return
        stats.http_requests["debug"] += 1
        self._phase = _Phase.RESPONDING
        self._answer = asyncio.get_running_loop().create_task(self._answer_debug(debug, request))

    async def _answer_debug(self, debug: DebugSite, request: http11.Request) -> None:
        try:
            reply = await debug.serve(request)
        except Exception as exc:  # a broken page must not take the relay down
            log.exception("debug page %s failed", request.path)
            reply = Reply(500, f"{request.path}: {exc}\n".encode())
        self._answer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply.encode(head_only=request.method == "HEAD"))
            self._transport.close()
        self._phase = _Phase.CLOSED

    def _derp_upgrade(self, request: http11.Request, rest: bytes) -> None:
        assert self._transport is not None
        upgrade = request.header("upgrade").lower()
        if upgrade == "websocket" and "derp" in request.header("sec-websocket-protocol"):
            self._websocket_upgrade(request, rest)
            return
        if upgrade not in ("derp", "websocket"):
            self._reply(request, 426, [("Content-Type", "text/plain")], b"DERP requires connection upgrade\n")
            return
        if self._site.server.closing:
            self._reply(request, 503, [], b"relay is shutting down\n")
            return
        if request.header(FAST_START_HEADER) != "1":
            self._transport.write(
                http11.response(
                    101,
                    [
                        ("Upgrade", "DERP"),
                        ("Connection", "Upgrade"),
                        ("Derp-Version", str(PROTOCOL_VERSION)),
                        ("Derp-Public-Key", self._site.server.public_key.hex()),
                    ],
                    close=False,
                )
            )
        self._phase = _Phase.DERP
        self._start_derp(request, rest)

    def _websocket_upgrade(self, request: http11.Request, rest: bytes) -> None:
        assert self._transport is not None
        key = request.header("sec-websocket-key")
        if not key or request.header("sec-websocket-version") != "13":
            self._reply(request, 400, [], b"WebSocket upgrade needs Sec-WebSocket-Key and version 13\n")
            return
        self._transport.write(
            http11.response(
                101,
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", ws.accept_token(key)),
                    ("Sec-WebSocket-Protocol", ws.SUBPROTOCOL),
                ],
                close=False,
            )
        )
        self._site.stats.websocket_accepts += 1
        self._phase = _Phase.WEBSOCKET
        self._ws = ws.WebSocketDecoder(expect_masked=True)
        self._start_derp(request, b"")
        if rest:
            self._websocket_data(rest)

    def _start_derp(self, request: http11.Request, rest: bytes) -> None:
        self._conn = ClientConnection(
            self._site.server,
            self,
            self._peer,
            not_ideal=bool(request.header(IDEAL_NODE_HEADER)),
        )
        self._sample_tcp_rtt()
        if rest:
            self._conn.receive_data(rest)

    def _sample_tcp_rtt(self) -> None:
        """derper's derp_tcp_rtt: at connect (ours), then every TCP_RTT_INTERVAL while open."""
        self._rtt_timer = None
        if self._transport is None or self._transport.is_closing():
            return
        sock = self._transport.get_extra_info("socket")
        try:
            rtt = tcp_info_rtt(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))
        except (OSError, AttributeError, ValueError):
            self._site.stats.tcp_rtt["error"] += 1  # derper's label when TCP_INFO is unavailable
            return
        self._site.stats.tcp_rtt[tcp_rtt_label(rtt)] += 1
        self._rtt_timer = asyncio.get_running_loop().call_later(TCP_RTT_INTERVAL, self._sample_tcp_rtt)

    def _websocket_data(self, data: bytes) -> None:
        assert self._ws is not None and self._conn is not None and self._transport is not None
        self._ws.receive_data(data)
        try:
            for event in self._ws.events():
                if isinstance(event, ws.Data):
                    if event.payload:
                        self._conn.receive_data(event.payload)
                elif isinstance(event, ws.PingEvent):
                    self._transport.write(ws.encode_frame(ws.OP_PONG, event.payload))
                else:
                    self._transport.write(ws.encode_close(ws.CLOSE_NORMAL))
                    self._transport.close()
                    return
                if self._phase is not _Phase.WEBSOCKET:
                    return
        except ws.WebSocketError as exc:
            self._site.stats.connections_closed["bad_websocket"] += 1
            log.warning("%s:%d: closed: bad_websocket: %s", *self._peer, exc)
            self._transport.write(ws.encode_close(exc.code, str(exc)))
            self._transport.close()


def _no_content_headers(challenge: str) -> list[tuple[str, str]]:
    """Captive-portal check: echo a well-formed challenge as derper does."""
    headers = [("Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0")]
    if challenge and len(challenge) <= MAX_CHALLENGE_LEN and set(challenge) <= _CHALLENGE_CHARS:
        headers.append((RESPONSE_HEADER, "response " + challenge))
    return headers


def start_listener(
    site: HttpSite,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    sock: socket.socket | None = None,
    limits: HandshakeLimits | None = None,
    accept_limit: TokenBucket | None = None,
) -> RelayListener:
    """Listen for relay connections (TLS when ``ssl_context`` is given), or serve a bound ``sock``."""
    factory: Callable[[], asyncio.Protocol] = lambda: RelayHttpProtocol(site)  # noqa: E731
    if ssl_context is not None:
        # Our own TLS layer (derprelay.tlsstream), not the loop's: its buffers are shared.
        factory = tls_protocol_factory(  # type: ignore[assignment]
            factory, ssl_context, site.server.handshake_timeout, site.stats.count_tls_handshake_failed
        )
    return RelayListener(
        [sock] if sock is not None else bind_sockets(host, port, socket.SOCK_STREAM, 1),
        factory,
        stats=site.stats,
        limits=limits or HandshakeLimits(),
        accept_limit=accept_limit,
    )
