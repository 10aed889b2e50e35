"""An asyncio DERP client: the tests, the mesh, the prober and the benchmark use it.

It speaks to any DERP server, ours or Tailscale's derper: TLS (verified by a
CA, pinned by the DERP map's ``sha256-raw:`` CertName, or unverified for
tests), the ``Upgrade: DERP`` handshake or DERP over WebSocket, then frames.
Parsing is :mod:`derprelay.frames`; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import frames as f
from . import websocket as ws
from .keys import MeshKey, NodePrivateKey

CONNECT_TIMEOUT = 10.0
"""Seconds for TCP, TLS, HTTP upgrade and the DERP handshake together."""

READ_CHUNK = 256 * 1024

PIN_PREFIX = "sha256-raw:"
"""DERP map CertName form that pins the SHA-256 of a server's leaf certificate."""


class DerpClientError(Exception):
    """Connecting to or talking with a DERP server failed; the message says where."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a DERP server is and how to trust it."""

    url: str
    """``https://host:port/derp`` or ``http://...``; ``wss``/``ws`` select WebSocket."""
    cert_name: str = ""
    """``sha256-raw:<hex>`` to pin a self-signed leaf, or the name to verify (default: URL host)."""
    insecure: bool = False
    """Skip certificate verification (the DERP map's InsecureForTests)."""
    dial_host: str = ""
    """Connect to this address instead of the URL's host (TLS still uses the URL's name)."""
    ssl_context: ssl.SSLContext | None = None
    """Trust anchors for CA-verified TLS; default is the system's."""
    other_pins: tuple[str, ...] = ()
    """With a ``cert_name`` pin: more ``sha256-raw:`` pins accepted (a certificate rotating out)."""


def _client_ssl_context(endpoint: Endpoint, host: str) -> tuple[ssl.SSLContext, str | None]:
    if endpoint.insecure or endpoint.cert_name.startswith(PIN_PREFIX):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context, host
    context = endpoint.ssl_context or ssl.create_default_context()
    return context, endpoint.cert_name or host


class DerpClient:
    """One DERP connection as a client.  Create with :func:`connect`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        websocket: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = f.FrameDecoder(f.MAX_CLIENT_FRAME_LEN)
        self._ws = ws.WebSocketDecoder(expect_masked=False) if websocket else None
        self._ready: deque[f.Frame] = deque()
        self.server_public_key = b""
        self.server_info = f.ServerInfoMessage()

    # --- handshake ------------------------------------------------------------

    async def _handshake(self, private_key: NodePrivateKey, info: f.ClientInfoMessage) -> None:
        first = await self._next_frame()
        if not isinstance(first, f.ServerKey):
            raise DerpClientError(f"expected SERVER_KEY from the server, got {type(first).__name__}")
        self.server_public_key = first.public_key
        try:
            box = private_key.box_with(first.public_key)
        except ValueError as exc:
            raise DerpClientError(f"unusable server key: {exc}") from None
        self._send_now(f.ClientInfo(private_key.public, box.seal(info.to_json())).encode())
        reply = await self._next_frame()
        if not isinstance(reply, f.ServerInfo):
            raise DerpClientError(f"expected SERVER_INFO from the server, got {type(reply).__name__}")
        try:
            plain = box.open(reply.sealed_info)
        except ValueError as exc:
            raise DerpClientError(f"server info does not open: {exc}") from None
        self.server_info = f.ServerInfoMessage.from_json(plain)

    # --- sending ---------------------------------------------------------------

    def _send_now(self, data: bytes) -> None:
        if self._ws is not None:
            data = ws.encode_frame(ws.OP_BINARY, data, mask=True)
        self._writer.write(data)

    async def _send(self, data: bytes) -> None:
        self._send_now(data)
        await self._writer.drain()

    async def send(self, destination: bytes, packet: bytes) -> None:
        await self._send(f.SendPacket(destination, packet).encode())

    async def forward(self, source: bytes, destination: bytes, packet: bytes) -> None:
        await self._send(f.ForwardPacket(source, destination, packet).encode())

    def forward_nowait(self, source: bytes, destination: bytes, packet: bytes, limit: int) -> bool:
        """Queue a ForwardPacket unless ``limit`` bytes already wait to be written."""
        if self._writer.transport.get_write_buffer_size() > limit or self._writer.is_closing():
            return False
        self._send_now(f.ForwardPacket(source, destination, packet).encode())
        return True

    async def ping(self, data: bytes) -> None:
        await self._send(f.Ping(data).encode())

    async def note_preferred(self, preferred: bool) -> None:
        await self._send(f.NotePreferred(preferred).encode())

    async def watch_conns(self) -> None:
        await self._send(f.WatchConns().encode())

    async def close_peer(self, peer: bytes) -> None:
        await self._send(f.ClosePeer(peer).encode())

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests use it to send malformed frames)."""
        await self._send(data)

    # --- receiving ----------------------------------------------------------------

    async def _next_frame(self) -> f.Frame:
        while not self._ready:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                raise DerpClientError("server closed the connection")
            if self._ws is not None:
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, ws.Data):
                        self._decoder.receive_data(event.payload)
                    elif isinstance(event, ws.CloseEvent):
                        raise DerpClientError(f"server closed the WebSocket: {event.code} {event.reason}")
            else:
                self._decoder.receive_data(data)
            self._ready.extend(self._decoder.frames())
        return self._ready.popleft()

    async def recv(self) -> f.Frame:
        """The next frame from the server; Pings are answered automatically."""
        frame = await self._next_frame()
        if isinstance(frame, f.Ping):
            await self._send(f.Pong(frame.data).encode())
        return frame

    async def recv_packet(self) -> f.RecvPacket:
        """The next relayed packet, skipping keep-alives and other notices."""
        while True:
            frame = await self.recv()
            if isinstance(frame, f.RecvPacket):
                return frame

    # --- lifecycle --------------------------------------------------------------------

    @property
    def is_closing(self) -> bool:
        return self._writer.is_closing()

    async def close(self) -> None:
        self._writer.close()
        # The server may close first; either way we are done.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    endpoint: Endpoint,
    private_key: NodePrivateKey,
    *,
    mesh_key: MeshKey | None = None,
    is_prober: bool = False,
    fast_start: bool = False,
    timeout: float = CONNECT_TIMEOUT,
) -> DerpClient:
    """Dial, upgrade and authenticate; raise :class:`DerpClientError` with the step that failed."""
    try:
        return await asyncio.wait_for(
            _connect(endpoint, private_key, mesh_key, is_prober, fast_start), timeout
        )
    except TimeoutError:
        raise DerpClientError(f"{endpoint.url}: no DERP handshake within {timeout:.0f}s") from None
    except (OSError, ssl.SSLError, EOFError) as exc:
        raise DerpClientError(f"{endpoint.url}: {exc or type(exc).__name__}") from None
    except f.ProtocolError as exc:
        raise DerpClientError(f"{endpoint.url}: server broke the DERP protocol: {exc}") from None


async def _connect(
    endpoint: Endpoint,
    private_key: NodePrivateKey,
    mesh_key: MeshKey | None,
    is_prober: bool,
    fast_start: bool,
) -> DerpClient:
    url = urlsplit(endpoint.url)
    use_tls = url.scheme in ("https", "wss")
    websocket = url.scheme in ("ws", "wss")
    if url.scheme not in ("https", "http", "wss", "ws") or not url.hostname:
        raise DerpClientError(f"unsupported DERP URL {endpoint.url!r}")
    host = url.hostname
    port = url.port or (443 if use_tls else 80)
    context, server_hostname = _client_ssl_context(endpoint, host) if use_tls else (None, None)
    reader, writer = await asyncio.open_connection(
        endpoint.dial_host or host,
        port,
        ssl=context,
        server_hostname=server_hostname if context else None,
        limit=READ_CHUNK,
    )
    try:
        if context is not None and endpoint.cert_name.startswith(PIN_PREFIX):
            _check_pin(writer, (endpoint.cert_name, *endpoint.other_pins))
        client = DerpClient(reader, writer, websocket=websocket)
        await _upgrade(
            reader,
            writer,
            netloc=url.netloc,
            path=url.path or "/derp",
            websocket=websocket,
            fast_start=fast_start,
        )
        info = f.ClientInfoMessage(
            mesh_key=mesh_key.text if mesh_key else "", can_ack_pings=True, is_prober=is_prober
        )
        await client._handshake(private_key, info)
    except BaseException:
        writer.close()
        raise
    return client


def _check_pin(writer: asyncio.StreamWriter, pins: tuple[str, ...]) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    leaf = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    wants = [pin.removeprefix(PIN_PREFIX).lower() for pin in pins]
    got = hashlib.sha256(leaf).hexdigest() if leaf else ""
    if not any(hmac.compare_digest(got, want) for want in wants):
        raise DerpClientError(
            f"server certificate sha256 {got or 'missing'} does not match pin {' or '.join(wants)}"
        )


async def _upgrade(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    netloc: str,
    path: str,
    websocket: bool,
    fast_start: bool,
) -> None:
    if websocket:
        key = base64.b64encode(os.urandom(16)).decode()
        headers = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {ws.SUBPROTOCOL}\r\n"
        )
    else:
        headers = "Upgrade: DERP\r\nConnection: Upgrade\r\n"
        if fast_start:
            headers += "Derp-Fast-Start: 1\r\n"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\n{headers}\r\n".encode())
    await writer.drain()
    if fast_start and not websocket:
        return
    head = await reader.readuntil(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise DerpClientError(f"server answered the upgrade with {status_line!r}")
    if websocket and ws.accept_token(key).encode() not in head:
        raise DerpClientError("server's Sec-WebSocket-Accept does not match our key")
