"""Two relays meshed with one key: their clients reach each other, across restarts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from derprelay.client import connect
from derprelay.keys import NodePrivateKey
from relayharness import RelayProcess, deliver, free_port, start_pair, write_ca_bundle


async def test_meshed_relays_forward_both_ways_and_survive_a_restart(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, mesh_key_file: Path
) -> None:
    ports = (free_port(), free_port())
    relay_a, relay_b = start_pair(relay_factory, tmp_path, mesh_key_file, ports)
    key_1, key_2 = NodePrivateKey.generate(), NodePrivateKey.generate()
    client_1 = await connect(relay_a.endpoint, key_1)
    client_2 = await connect(relay_b.endpoint, key_2)
    try:
        await deliver(client_1, client_2, key_2.public, b"a-to-b")
        await deliver(client_2, client_1, key_1.public, b"b-to-a")
        # Relay B goes away and comes back on the same address: forwarding resumes.
        assert relay_b.stop() == 0
        await client_2.close()
        relay_b.restart()
        client_2 = await connect(relay_b.endpoint, key_2)
        await deliver(client_1, client_2, key_2.public, b"after-restart")
        await deliver(client_2, client_1, key_1.public, b"and-back")
    finally:
        await client_1.close()
        await client_2.close()


async def test_mesh_peers_file_is_followed(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, mesh_key_file: Path
) -> None:
    """Peers listed in --mesh-with-file are dialled once the file names them."""
    ports = (free_port(), free_port())
    bundle = write_ca_bundle(tmp_path)
    peers_file = tmp_path / "peers"
    peers_file.write_text("")  # nobody yet: a region of one
    relays = [
        relay_factory(
            "-a",
            f"127.0.0.1:{port}",
            "--mesh-psk-file",
            str(mesh_key_file),
            "--mesh-with-file",
            str(peers_file),
            "--mesh-ca-file",
            str(bundle),
            name=name,
        )
        for name, port in zip(("a", "b"), ports, strict=True)
    ]
    key_1, key_2 = NodePrivateKey.generate(), NodePrivateKey.generate()
    async with (
        await connect(relays[0].endpoint, key_1) as client_1,
        await connect(relays[1].endpoint, key_2) as client_2,
    ):
        peers_file.write_text("".join(f"127.0.0.1:{port}\n" for port in ports))
        await deliver(client_1, client_2, key_2.public, b"via-file")
        await deliver(client_2, client_1, key_1.public, b"and-back")
