"""The accept loop's rules, on real loopback sockets: who waits, who is refused, who is served.

The listener is driven here with a plain protocol (no TLS: what it decides
happens before the handshake, whatever the protocol) so that every rule can
be watched from the client's side of a real TCP connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from derprelay.listener import HandshakeLimits, RelayListener, bind_sockets
from derprelay.metrics import RelayStats, ShedReason

STEP_TIMEOUT = 5.0


class Echo(asyncio.Protocol):
    """Answers every read with the same bytes: proof that the connection was handed on."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@asynccontextmanager
async def listening(limits: HandshakeLimits) -> AsyncIterator[tuple[RelayListener, RelayStats, int]]:
    stats = RelayStats()
    listener = RelayListener(
        bind_sockets("127.0.0.1", 0, socket.SOCK_STREAM, 1),
        Echo,
        stats=stats,
        limits=limits,
    )
    try:
        yield listener, stats, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await listener.wait_closed()


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {STEP_TIMEOUT}s: {what}"
        await asyncio.sleep(0.01)


async def refused(reader: asyncio.StreamReader) -> bool:
    """The relay closed the connection without a word (EOF or reset)."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bool:
    writer.write(data)
    async with asyncio.timeout(STEP_TIMEOUT):
        return await reader.readexactly(len(data)) == data


async def test_silent_connections_wait_aside_and_the_excess_is_refused() -> None:
    """Silent clients wait without a handshake; past --max-pending-handshakes a new one is closed at once."""
    limits = HandshakeLimits(handshakes_per_turn=1, max_pending=2, max_wait=30)
    async with listening(limits) as (_, stats, port):
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await until(lambda: stats.handshakes_pending == 2, "two silent connections waiting")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await refused(reader)
        assert stats.handshakes_shed[ShedReason.QUEUE_FULL] == 1
        assert stats.tcp_accepts == 3
        # A silent one that speaks at last is served; that frees a place for a newcomer.
        assert await echoed(*silent[0], b"hello")
        assert stats.handshakes_pending == 1
        newcomer = await asyncio.open_connection("127.0.0.1", port)
        assert await echoed(*newcomer, b"served")
        for _, w in [*silent, newcomer, (reader, writer)]:
            w.close()


async def test_a_connection_that_waits_too_long_is_refused() -> None:
    """One that said nothing for max_wait is closed and counted; the next is served as usual."""
    async with listening(HandshakeLimits(max_wait=0.3)) as (_, stats, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await refused(reader)
        assert stats.handshakes_shed[ShedReason.WAITED_TOO_LONG] == 1
        assert stats.handshakes_pending == 0
        speaker = await asyncio.open_connection("127.0.0.1", port)
        assert await echoed(*speaker, b"in time")
        for _, w in (speaker, (reader, writer)):
            w.close()


async def test_a_burst_is_served_a_batch_per_turn() -> None:
    """More speaking connections than one turn starts: all are served, over several turns."""
    async with listening(HandshakeLimits(handshakes_per_turn=2, max_pending=64)) as (_, stats, port):
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for _, writer in clients:
            writer.write(b"x")
        for reader, _ in clients:
            async with asyncio.timeout(STEP_TIMEOUT):
                assert await reader.readexactly(1) == b"x"
        assert stats.handshakes_shed.total() == 0
        assert stats.tcp_accepts == 20
        for _, writer in clients:
            writer.close()


async def test_closing_refuses_the_waiting() -> None:
    """At shutdown the connections still waiting for a handshake are closed, not left open."""
    async with listening(HandshakeLimits(max_wait=30)) as (listener, stats, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: stats.handshakes_pending == 1, "one waiting")
        listener.close()
        assert await refused(reader)
        assert stats.handshakes_pending == 0
        writer.close()
