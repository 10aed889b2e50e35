"""The relay's own TLS layer (derprelay.tlsstream) against a real relay: bad and silent handshakes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from derprelay import frames as f
from relayharness import RECV_TIMEOUT, RelayProcess, exchange_every_size, metric, new_client, wait_for


async def test_abandoned_and_garbage_tls_handshakes_close_only_themselves(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory("--handshake-timeout", "0.5")
    a, key_a = await new_client(relay)
    b, key_b = await new_client(relay)
    port = relay.status["derpPort"]
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
    garbage_reader, garbage_writer = await asyncio.open_connection("127.0.0.1", port)
    garbage_writer.write(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n")
    try:
        # Neither gets an HTTP answer: the garbage an alert at most, the silent one nothing.
        assert b"HTTP" not in await asyncio.wait_for(garbage_reader.read(), RECV_TIMEOUT)
        assert await asyncio.wait_for(silent_reader.read(), RECV_TIMEOUT) == b""
        await exchange_every_size(a, key_a.public, b, key_b.public)
        await wait_for(
            lambda: metric(relay, "derp_connections_closed_total", 'reason="tls_handshake_failed"') >= 1,
            "the refused TLS handshake counted",
        )
    finally:
        silent_writer.close()
        garbage_writer.close()
        await a.close()
        await b.close()


async def test_packets_larger_than_a_tls_record_arrive_whole(relay: RelayProcess) -> None:
    # Each RecvPacket is four TLS records' worth; a batch of them is cut into records on write.
    sender, _ = await new_client(relay)
    receiver, receiver_key = await new_client(relay)
    packets = [bytes([n]) * f.MAX_PACKET_SIZE for n in range(40)]

    async def receive_all() -> list[bytes]:
        return [(await receiver.recv_packet()).packet for _ in packets]

    receiving = asyncio.create_task(receive_all())
    await sender.send_raw(b"".join(f.SendPacket(receiver_key.public, p).encode() for p in packets))
    assert await asyncio.wait_for(receiving, RECV_TIMEOUT) == packets
    await sender.close()
    await receiver.close()
