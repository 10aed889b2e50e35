"""The relay as a real process on loopback TLS, driven by our DERP client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from derprelay import frames as f
from derprelay.client import DerpClientError, Endpoint, connect
from derprelay.keys import MeshKey, NodePrivateKey
from relayharness import RECV_TIMEOUT, RelayProcess, exchange_every_size, metric, new_client, recv_matching


def endpoint_variant(relay: RelayProcess, transport: str) -> tuple[Endpoint, bool]:
    if transport == "websocket":
        return Endpoint(relay.url.replace("https://", "wss://"), cert_name=relay.endpoint.cert_name), False
    return relay.endpoint, transport == "fast-start"


@pytest.mark.parametrize("transport", ["upgrade", "fast-start", "websocket"])
async def test_two_clients_exchange_packets_of_every_size(relay: RelayProcess, transport: str) -> None:
    endpoint, fast_start = endpoint_variant(relay, transport)
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    async with (
        await connect(endpoint, key_a, fast_start=fast_start) as a,
        await connect(endpoint, key_b, fast_start=fast_start) as b,
    ):
        assert a.server_public_key == relay.public_key
        assert a.server_info.version == f.PROTOCOL_VERSION
        await exchange_every_size(a, key_a.public, b, key_b.public)
    assert metric(relay, "derp_packets_sent_total") >= 6


async def test_peer_gone_when_sender_leaves(relay: RelayProcess) -> None:
    a, key_a = await new_client(relay)
    b, key_b = await new_client(relay)
    async with b:
        await a.send(key_b.public, b"hello")
        await asyncio.wait_for(b.recv_packet(), RECV_TIMEOUT)
        await a.close()
        gone = await recv_matching(b, f.PeerGone)
        assert gone == f.PeerGone(key_a.public, f.PeerGoneReason.DISCONNECTED)


async def test_ping_is_answered_with_the_same_bytes(relay: RelayProcess) -> None:
    client, _ = await new_client(relay)
    async with client:
        await client.ping(b"derp-png")
        assert await recv_matching(client, f.Pong) == f.Pong(b"derp-png")
        await client.note_preferred(True)
        await client.ping(b"again!!!")
        assert await recv_matching(client, f.Pong) == f.Pong(b"again!!!")
    assert metric(relay, "derp_got_ping_total") == 2


async def test_watcher_sees_present_and_gone(
    relay_factory: Callable[..., RelayProcess], mesh_key_file: Path
) -> None:
    relay = relay_factory("--mesh-psk-file", str(mesh_key_file))
    mesh_key = MeshKey.from_text(mesh_key_file.read_text())
    early, early_key = await new_client(relay)
    async with early:
        watcher_key = NodePrivateKey.generate()
        watcher = await connect(relay.endpoint, watcher_key, mesh_key=mesh_key)
        async with watcher:
            await watcher.watch_conns()
            # The initial flood names everyone connected, the watcher itself included.
            flood = [await recv_matching(watcher, f.PeerPresent) for _ in range(2)]
            by_key = {p.peer: p for p in flood if isinstance(p, f.PeerPresent)}
            assert by_key.keys() == {early_key.public, watcher_key.public}
            assert str(by_key[early_key.public].address) == "127.0.0.1"
            assert by_key[early_key.public].flags == f.PeerPresentFlags.REGULAR
            assert by_key[watcher_key.public].flags == f.PeerPresentFlags.MESH_PEER
            late, late_key = await new_client(relay, is_prober=True)
            joined = await recv_matching(watcher, f.PeerPresent)
            assert isinstance(joined, f.PeerPresent) and joined.peer == late_key.public
            assert joined.flags == f.PeerPresentFlags.PROBER
            await late.close()
            assert await recv_matching(watcher, f.PeerGone) == f.PeerGone(late_key.public)


async def test_non_mesh_client_may_not_use_mesh_frames(relay: RelayProcess) -> None:
    bystander, key_by = await new_client(relay)
    async with bystander:
        for frame in (
            f.WatchConns(),
            f.ClosePeer(key_by.public),
            f.ForwardPacket(key_by.public, key_by.public, b"x"),
        ):
            rogue, _ = await new_client(relay)
            await rogue.send_raw(frame.encode())
            with pytest.raises(DerpClientError, match="closed"):
                await asyncio.wait_for(rogue.recv(), RECV_TIMEOUT)
            await rogue.close()
        # The bystander was neither closed nor disturbed.
        await bystander.ping(b"stillok!")
        assert await recv_matching(bystander, f.Pong) == f.Pong(b"stillok!")
    assert metric(relay, "derp_connections_closed_total", 'reason="not_permitted"') == 3
