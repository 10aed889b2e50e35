"""Memory: bounded per connection whatever the peer does, and given back after load.

Real relays (one process, so one RSS), real TLS, real DERP handshakes.  The
bounds are the relay's own constants (what README's Reliability section
states), with a generous margin for the allocator; nothing here is timed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from derprelay import frames as f
from derprelay import websocket as ws
from derprelay.client import DerpClient
from derprelay.http import WRITE_BUFFER_HIGH
from derprelay.keys import NodePrivateKey
from derprelay.server import CONTROL_QUEUE_BYTES, SEND_QUEUE_BYTES
from derprelay.tlsstream import RECEIVE_BUFFER_SIZE, RECORD_PLAINTEXT, WRITE_SLICE
from relayharness import RECV_TIMEOUT, RelayProcess, metric, new_client, wait_for

MIB = 1024 * 1024

PER_READER_BOUND = (
    SEND_QUEUE_BYTES
    + CONTROL_QUEUE_BYTES
    + WRITE_BUFFER_HIGH
    + SEND_QUEUE_BYTES
    + WRITE_SLICE
    + RECEIVE_BUFFER_SIZE
    + 2 * RECORD_PLAINTEXT
)
"""What a never-reading client may make the relay hold, as README states it: its queues, the
transport's buffer (its high-water mark, plus the one flush that can land on top of it) and
the TLS layer's two memory BIOs (a slice each, and a record)."""

ALLOCATOR_MARGIN = 1.5
"""Headroom for the allocator's own rounding and free lists on top of the bound."""

NEVER_READERS = 6
FLOOD_PACKET = bytes(f.MAX_PACKET_SIZE - 100)
PINGS_PER_READER = 4000
"""Pings each never-reader sends: 52 KB of Pongs owed, over three times what may be queued."""
SMALL_RCVBUF = 4096
"""The never-reading clients' receive buffer: the kernel holds little for them on their side."""


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def never_reading_client(relay: RelayProcess, websocket: bool) -> tuple[ssl.SSLSocket, bytes]:
    """A blocking TLS client that completes the DERP handshake, then never reads again.

    Blocking and read by hand so that nothing reads ahead: after ServerInfo the
    socket's small receive buffer fills and stays full.
    """
    key = NodePrivateKey.generate()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    raw.settimeout(RECV_TIMEOUT)
    raw.connect(("127.0.0.1", relay.status["derpPort"]))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
    if websocket:
        token = base64.b64encode(os.urandom(16)).decode()
        conn.sendall(
            "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {token}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {ws.SUBPROTOCOL}\r\n\r\n".encode()
        )
    else:
        conn.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(1)  # byte by byte: what follows the head is DERP (or WebSocket) data
    assert head.startswith(b"HTTP/1.1 101"), head
    decoder = f.FrameDecoder(f.MAX_CLIENT_FRAME_LEN)
    stream = ws.WebSocketDecoder(expect_masked=False) if websocket else None

    def next_frame() -> f.Frame:
        while True:
            for frame in decoder.frames():
                return frame
            data = conn.recv(4096)
            assert data, "relay closed the connection during the handshake"
            if stream is None:
                decoder.receive_data(data)
                continue
            stream.receive_data(data)
            for event in stream.events():
                assert isinstance(event, ws.Data), event
                decoder.receive_data(event.payload)

    def send(frame: bytes) -> None:
        conn.sendall(ws.encode_frame(ws.OP_BINARY, frame, mask=True) if websocket else frame)

    server_key = next_frame()
    assert isinstance(server_key, f.ServerKey)
    info = f.ClientInfoMessage(can_ack_pings=True).to_json()
    send(f.ClientInfo(key.public, key.seal_to(server_key.public_key, info)).encode())
    assert isinstance(next_frame(), f.ServerInfo)
    return conn, key.public


async def still_relaying(a: DerpClient, b: DerpClient, key_b: bytes) -> None:
    await a.send(key_b, b"innocent")
    got = await asyncio.wait_for(b.recv_packet(), RECV_TIMEOUT)
    assert got.packet == b"innocent"


@pytest.mark.parametrize("websocket", [False, True], ids=["derp", "websocket"])
@pytest.mark.timeout(180)
async def test_never_reading_clients_hold_at_most_the_stated_bound(
    relay_factory: Callable[..., RelayProcess], websocket: bool
) -> None:
    # A long write timeout keeps the never-readers connected: the bound must hold however long.
    relay = relay_factory("--workers", "1", "--tcp-write-timeout", "600", "--log-level", "info")
    pid = relay.process.pid
    sender, _ = await new_client(relay)
    a, _ = await new_client(relay)
    b, key_b = await new_client(relay)
    readers = [await asyncio.to_thread(never_reading_client, relay, websocket) for _ in range(NEVER_READERS)]
    try:
        await still_relaying(a, b, key_b.public)
        before = rss_bytes(pid)

        async def flood(rounds: int) -> None:
            for _ in range(rounds):
                for _, key in readers:
                    await sender.send(key, FLOOD_PACKET)

        async def flood_until_every_queue_dropped() -> None:
            # Each reader's kernel buffers are full and its queue overflows once the relay
            # drops at its queue's head; then the rest of the flood only replaces what is held.
            while metric(relay, "derp_packets_dropped_total", 'kind="other",reason="queue_head"') < (
                NEVER_READERS * 64
            ):
                await flood(16)

        await asyncio.wait_for(flood_until_every_queue_dropped(), 120)
        # They ping without reading the Pongs: those past the bound are dropped, not queued.
        pings = f.Ping(b"12345678").encode() * PINGS_PER_READER
        for conn, _ in readers:
            await asyncio.to_thread(
                conn.sendall, ws.encode_frame(ws.OP_BINARY, pings, mask=True) if websocket else pings
            )
        await flood(64)
        await still_relaying(a, b, key_b.public)
        grown = rss_bytes(pid) - before
        bound = NEVER_READERS * PER_READER_BOUND * ALLOCATOR_MARGIN
        print(f"RSS grew {grown / MIB:.1f} MiB for {NEVER_READERS} never-reading clients", end=" ")
        print(f"({grown / NEVER_READERS / MIB:.2f} MiB each; bound {PER_READER_BOUND / MIB:.2f} MiB each)")
        assert grown < bound, f"{grown / MIB:.1f} MiB held for {NEVER_READERS} never-reading clients"
        assert metric(relay, "derp_current_connections") == 3 + NEVER_READERS
        pongs_dropped = metric(relay, "derp_control_frames_dropped_total", 'frame="pong"')
        queued_at_most = CONTROL_QUEUE_BYTES // len(f.Pong(bytes(8)).encode())
        assert pongs_dropped >= NEVER_READERS * (PINGS_PER_READER - queued_at_most)
    finally:
        for conn, _ in readers:
            conn.close()
        for client in (sender, a, b):
            await client.close()


CHURN_ROUNDS = 5
CHURN_CLIENTS = 200
PLATEAU_MARGIN = 4 * MIB
"""How far a later round may end above the second: a few MiB of allocator noise, not per-round growth."""


async def churn_round(relay: RelayProcess) -> None:
    """Clients connect, each sends a full-size packet to the next, all leave."""
    sem = asyncio.Semaphore(32)

    async def connect() -> tuple[DerpClient, bytes]:
        async with sem:
            client, key = await new_client(relay)
            return client, key.public

    clients = await asyncio.gather(*(connect() for _ in range(CHURN_CLIENTS)))
    packet = os.urandom(f.MAX_PACKET_SIZE)
    for (client, _), (_, next_key) in zip(clients, clients[1:] + clients[:1], strict=True):
        await client.send(next_key, packet)
    for client, _ in clients:
        got = await asyncio.wait_for(client.recv_packet(), RECV_TIMEOUT)
        assert got.packet == packet
    await asyncio.gather(*(client.close() for client, _ in clients))


@pytest.mark.timeout(300)
async def test_memory_is_given_back_after_equal_churn_rounds(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    relay = relay_factory("--workers", "1", "--log-level", "info")
    pid = relay.process.pid
    after: list[int] = []
    for _ in range(CHURN_ROUNDS):
        await churn_round(relay)
        await wait_for(lambda: metric(relay, "derp_current_connections") == 0, "every client gone")
        after.append(rss_bytes(pid))
    print("RSS after each round (MiB):", " ".join(f"{rss / MIB:.1f}" for rss in after))
    for round_number, rss in enumerate(after[2:], start=3):
        assert rss <= after[1] + PLATEAU_MARGIN, (
            f"round {round_number} ended at {rss / MIB:.1f} MiB, round 2 at {after[1] / MIB:.1f} MiB"
        )
