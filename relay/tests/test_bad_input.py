"""Bad input and faults: each closes only the offending connection, with a reason and a count.

Every test keeps a healthy pair of clients talking through the same relay and
checks at the end that they were never disturbed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from derprelay import frames as f
from derprelay.client import DerpClient, DerpClientError, connect
from derprelay.keys import NodePrivateKey
from relayharness import RECV_TIMEOUT, RelayProcess, metric, new_client, recv_matching


@asynccontextmanager
async def healthy_pair(relay: RelayProcess) -> AsyncIterator[Callable[[], object]]:
    """Two clients; the yielded coroutine function proves they still relay."""
    a, key_a = await new_client(relay)
    b, key_b = await new_client(relay)

    async def still_relaying() -> None:
        await a.send(key_b.public, b"still here")
        got = await asyncio.wait_for(b.recv_packet(), RECV_TIMEOUT)
        assert (got.source, got.packet) == (key_a.public, b"still here")

    try:
        await still_relaying()
        yield still_relaying
    finally:
        await a.close()
        await b.close()


async def raw_tls(relay: RelayProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return await asyncio.open_connection("127.0.0.1", relay.status["derpPort"], ssl=context)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), RECV_TIMEOUT)


async def test_garbage_instead_of_http_gets_400(relay: RelayProcess) -> None:
    async with healthy_pair(relay) as still_relaying:
        reader, writer = await raw_tls(relay)
        writer.write(b"\x00\x01\x02 definitely not http\r\n\r\n")
        answer = await read_until_closed(reader)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request") and b"not an HTTP request" in answer
        writer.close()
        await still_relaying()  # type: ignore[operator]
    assert metric(relay, "derp_connections_closed_total", 'reason="bad_http"') == 1


async def test_derp_without_upgrade_is_426(relay: RelayProcess) -> None:
    reader, writer = await raw_tls(relay)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 426") and b"DERP requires connection upgrade" in answer
    writer.close()


async def derp_stream(relay: RelayProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A raw upgraded stream; returns the server key read from it."""
    reader, writer = await raw_tls(relay)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    header = await reader.readexactly(5)
    payload = await reader.readexactly(int.from_bytes(header[1:], "big"))
    frame = f.parse_frame(header[0], payload)
    assert isinstance(frame, f.ServerKey)
    return reader, writer, frame.public_key


async def test_bad_box_in_client_info_closes_that_connection(relay: RelayProcess) -> None:
    async with healthy_pair(relay) as still_relaying:
        reader, writer, _ = await derp_stream(relay)
        writer.write(f.ClientInfo(NodePrivateKey.generate().public, bytes(24) + b"not a real box").encode())
        assert await read_until_closed(reader) == b""
        await still_relaying()  # type: ignore[operator]
    assert metric(relay, "derp_connections_closed_total", 'reason="bad_client_info"') == 1
    assert "bad_client_info: box of" in relay.log()


async def test_wrong_first_frame_is_a_protocol_error(relay: RelayProcess) -> None:
    reader, writer, _ = await derp_stream(relay)
    writer.write(f.Ping(b"12345678").encode())
    assert await read_until_closed(reader) == b""
    assert "expected CLIENT_INFO first" in relay.log()


async def test_unknown_frame_type_is_skipped_like_derper(relay: RelayProcess) -> None:
    # derper skips unknown frame types so newer clients can talk to older servers.
    client, _ = await new_client(relay)
    async with client:
        await client.send_raw(f.UnknownFrame(0x7E, b"from the future").encode())
        await client.ping(b"after-uk")
        assert await recv_matching(client, f.Pong) == f.Pong(b"after-uk")


async def test_frame_over_the_limit_closes_the_connection(relay: RelayProcess) -> None:
    async with healthy_pair(relay) as still_relaying:
        client, _ = await new_client(relay)
        await client.send_raw(b"\x04" + (f.MAX_SERVER_FRAME_LEN + 1).to_bytes(4, "big"))
        with pytest.raises(DerpClientError, match="closed"):
            await asyncio.wait_for(client.recv(), RECV_TIMEOUT)
        await client.close()
        await still_relaying()  # type: ignore[operator]
    assert metric(relay, "derp_connections_closed_total", 'reason="protocol_error"') == 1
    assert "over the 65600-byte limit" in relay.log()


async def test_silent_clients_time_out(relay_factory: Callable[..., RelayProcess]) -> None:
    relay = relay_factory("--handshake-timeout", "0.5")
    async with healthy_pair(relay) as still_relaying:
        # One never sends HTTP; one upgrades but never sends ClientInfo.
        silent_reader, silent_writer = await raw_tls(relay)
        half_reader, half_writer, _ = await derp_stream(relay)
        assert await read_until_closed(silent_reader) == b""
        assert await read_until_closed(half_reader) == b""
        silent_writer.close()
        half_writer.close()
        await still_relaying()  # type: ignore[operator]
    assert metric(relay, "derp_connections_closed_total", 'reason="http_timeout"') == 1
    assert metric(relay, "derp_connections_closed_total", 'reason="handshake_timeout"') == 1


async def test_client_that_stops_reading_loses_packets_and_is_dropped(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory("--tcp-write-timeout", "1", "--send-queue-depth", "8")
    async with healthy_pair(relay) as still_relaying:
        flooder, _ = await new_client(relay)
        sleeper, sleeper_key = await new_client(relay)  # never calls recv()
        packet = bytes(16 * 1024)

        async def flood_until_sleeper_dropped() -> None:
            # Keep the relay's writes to the sleeper pending: once the flood
            # stops, the kernel's growing buffers may take the rest, and a
            # relay with nothing left to write has nothing to time out on.
            while metric(relay, "derp_connections_closed_total", 'reason="write_timeout"') < 1:
                for _ in range(64):  # 1 MiB between looks at the metric
                    await flooder.send(sleeper_key.public, packet)
                await still_relaying()  # type: ignore[operator]

        await asyncio.wait_for(flood_until_sleeper_dropped(), RECV_TIMEOUT)
        await still_relaying()  # type: ignore[operator]
        await flooder.close()
        await sleeper.close()
    assert metric(relay, "derp_packets_dropped_total", 'kind="other",reason="queue_head"') > 0
    assert "write_timeout: client stopped reading" in relay.log()


async def test_duplicate_key_gets_health_and_newest_wins(relay: RelayProcess) -> None:
    key = NodePrivateKey.generate()
    sender, _ = await new_client(relay)
    first = await connect(relay.endpoint, key)
    second = await connect(relay.endpoint, key)
    async with sender, first, second:
        for conn in (first, second):
            health = await recv_matching(conn, f.Health)
            assert isinstance(health, f.Health) and "more than once" in health.problem
        await sender.send(key.public, b"to-newest")
        got = await asyncio.wait_for(second.recv_packet(), RECV_TIMEOUT)
        assert got.packet == b"to-newest"
        # The older connection speaks: it becomes the active one (last writer wins).
        await first.ping(b"i-am-up!")
        await recv_matching(first, f.Pong)
        await sender.send(key.public, b"to-speaker")
        got = await asyncio.wait_for(first.recv_packet(), RECV_TIMEOUT)
        assert got.packet == b"to-speaker"
        await second.close()
        assert await recv_matching(first, f.Health) == f.Health("")


async def test_sigterm_sends_restarting_then_exits_cleanly(relay: RelayProcess) -> None:
    client, _ = await new_client(relay)
    async with client:
        relay.process.terminate()
        notice = await recv_matching(client, f.Restarting)
        assert notice == f.Restarting(1000, 30000)
    assert relay.stop() == 0


async def test_rate_limit_is_announced_in_server_info(relay_factory: Callable[..., RelayProcess]) -> None:
    relay = relay_factory("--per-client-rate-limit", "100000", "--per-client-rate-burst", "200000")
    client: DerpClient
    client, _ = await new_client(relay)
    async with client:
        assert client.server_info == f.ServerInfoMessage(
            token_bucket_bytes_per_second=100000, token_bucket_bytes_burst=200000
        )
