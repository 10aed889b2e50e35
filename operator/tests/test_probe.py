"""The prober against real relays on loopback: a healthy meshed pair, a dead relay, a broken mesh."""

from __future__ import annotations

import dataclasses
import datetime
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from derpoperator.credentials import PIN_ROTATION_GRACE, PinHistory
from derpoperator.probe import ProbeError, ProbeTarget, RegionProbe, probe_region, probe_stun
from derprelay.certs import generate_self_signed
from derprelay.keys import MeshKey
from relayharness import RelayProcess, free_port, start_mesh, start_pair

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)


def target(ordinal: int, relay: RelayProcess, stun: bool = True) -> ProbeTarget:
    return ProbeTarget(
        ordinal=ordinal,
        name=f"900{'abc'[ordinal]}",
        address="127.0.0.1",
        derp_port=int(relay.url.rsplit(":", 1)[1].split("/")[0]),
        stun_port=int(relay.status["stunPort"]) if stun else None,
        cert_name=str(relay.status["certName"]),
    )


@pytest.fixture
def meshed(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, mesh_key_file: Path
) -> tuple[RelayProcess, RelayProcess]:
    return start_pair(relay_factory, tmp_path, mesh_key_file, (free_port(), free_port()))


async def test_a_meshed_pair_passes_every_probe(
    meshed: tuple[RelayProcess, RelayProcess], mesh_key_file: Path
) -> None:
    mesh_key = MeshKey.from_text(mesh_key_file.read_text().strip())
    results = await probe_region(
        [target(0, meshed[0]), target(1, meshed[1])], mesh_key, mesh=True, clock=lambda: NOW
    )
    assert sorted(results) == [0, 1]
    for result in results.values():
        assert result.ok, result.message
        assert result.at == NOW
        assert result.rtt_ms is not None and result.rtt_ms > 0


async def test_a_stopped_relay_fails_alone(
    meshed: tuple[RelayProcess, RelayProcess], mesh_key_file: Path
) -> None:
    mesh_key = MeshKey.from_text(mesh_key_file.read_text().strip())
    targets = [target(0, meshed[0]), target(1, meshed[1], stun=False)]
    meshed[1].stop()
    results = await probe_region(targets, mesh_key, mesh=True)
    assert results[0].ok, results[0].message
    assert not results[1].ok
    assert results[1].message.startswith("DERP connect on 900b:")


async def test_a_relay_frozen_between_the_phases_is_blamed_not_its_neighbour(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, mesh_key_file: Path
) -> None:
    """900b stops after passing alone: the hop 900a -> 900b fails, and 900b owns it."""
    relays = start_mesh(
        relay_factory, tmp_path, mesh_key_file, [free_port() for _ in range(3)], "--workers", "1"
    )
    mesh_key = MeshKey.from_text(mesh_key_file.read_text().strip())
    probe = await RegionProbe.open([target(i, r) for i, r in enumerate(relays)], mesh_key)
    try:
        relays[1].process.send_signal(signal.SIGSTOP)
        try:
            await probe.probe_mesh()
        finally:
            relays[1].process.send_signal(signal.SIGCONT)
        results = probe.results()
    finally:
        await probe.close()
    assert results[0].ok, results[0].message
    assert results[2].ok, results[2].message
    assert not results[1].ok
    assert results[1].message.startswith("900b stopped answering during the mesh probe"), results[1].message


async def test_relays_that_share_a_key_but_not_a_mesh_fail_the_mesh_probe(
    relay_factory: Callable[..., RelayProcess], mesh_key_file: Path
) -> None:
    lonely = [relay_factory("--mesh-psk-file", str(mesh_key_file), name=name) for name in ("a", "b")]
    mesh_key = MeshKey.from_text(mesh_key_file.read_text().strip())
    results = await probe_region([target(i, r) for i, r in enumerate(lonely)], mesh_key, mesh=True)
    assert not results[0].ok and not results[1].ok
    assert "mesh forwarding to 900b on 900a" in results[0].message
    # Without the mesh switch the same relays pass: each works on its own.
    alone = await probe_region([target(i, r) for i, r in enumerate(lonely)], mesh_key, mesh=False)
    assert all(r.ok for r in alone.values())


async def test_stun_probe_names_a_closed_port_and_a_silent_one(relay: RelayProcess) -> None:
    await probe_stun("127.0.0.1", int(relay.status["stunPort"]))
    with pytest.raises(ProbeError, match=r"STUN 127\.0\.0\.1:\d+: Connection refused"):
        await probe_stun("127.0.0.1", free_port())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(ProbeError, match=r"STUN 127\.0\.0\.1:\d+: no answer within 1s"):
            await probe_stun("127.0.0.1", silent.getsockname()[1], timeout=1.0)


async def test_a_relay_serving_the_certificate_before_a_rotation_passes_while_it_rotates_out(
    relay: RelayProcess,
) -> None:
    """The operator read the new certificate; the relay has not taken it yet (the kubelet is slow)."""
    new_pin = generate_self_signed("127.0.0.1").cert_name
    served_pin = str(relay.status["certName"])
    rotating = dataclasses.replace(target(0, relay), cert_name=new_pin, other_pins=(served_pin,))
    assert (await probe_region([rotating], None, mesh=False))[0].ok
    done = dataclasses.replace(rotating, other_pins=())
    result = (await probe_region([done], None, mesh=False))[0]
    assert not result.ok
    assert f"does not match pin {new_pin.removeprefix('sha256-raw:')}" in result.message


def test_the_pin_before_a_rotation_is_accepted_for_the_grace_period_only() -> None:
    history = PinHistory("sha256-raw:aa").observe("sha256-raw:aa", NOW)
    assert history.rotating_out(NOW) == ()
    rotated = history.observe("sha256-raw:bb", NOW)
    assert (rotated.current, rotated.rotating_out(NOW)) == ("sha256-raw:bb", ("sha256-raw:aa",))
    assert rotated.observe("sha256-raw:bb", NOW + PIN_ROTATION_GRACE / 2) == rotated
    assert rotated.rotating_out(NOW + PIN_ROTATION_GRACE) == ()
    assert rotated.observe("sha256-raw:cc", NOW).rotating_out(NOW) == ("sha256-raw:bb",)
