"""The path between a relay's worker processes, against the path inside one worker and the mesh.

Starts ``derp-relay --workers 2`` on loopback, places client pairs by the
per-worker connection gauge, and floods each pair for a while: one whose
sender and receiver sit on the same worker, one whose sender and receiver sit
on different workers.  Then two single-process relays meshed with each other,
a sender on one and a receiver on the other.  For each path it reports
delivered packets/s and the CPU the relays spent per packet (utime+stime of
every relay process, from ``/proc``): the differences are what the
socketpair hop and the mesh hop cost.  Everything is TLS, as in production.
The clients are Python (``derprelay.client``) in this process, so packets/s
is bounded by them; CPU per packet is the relays' own figure.
Run: ``python bench/workerpath.py [--seconds 5] [--size 1200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from derprelay import frames as f
from derprelay.client import DerpClient, Endpoint, connect
from derprelay.keys import NodePrivateKey

IN_FLIGHT = 256
"""Packets a sender may have sent that its receiver has not yet counted."""

BURST = 32
"""SendPackets written per write: a busy client's stream, not one frame per system call."""

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


@dataclass
class Relay:
    status: dict[str, object]

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(str(self.status["url"]), cert_name=str(self.status["certName"]))

    @property
    def pids(self) -> list[int]:
        workers = self.status["workers"]
        assert isinstance(workers, list)
        return sorted(
            {int(str(self.status["pid"])), *(int(w) for w in workers)}
        )  # one process: pid is its worker

    def worker_connections(self) -> list[float]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = str(self.status["url"]).removesuffix("/derp") + "/metrics"
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            text = answer.read().decode()
        found = re.findall(r'^derp_worker_connections\{worker="(\d+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
        return [value for _, value in sorted((int(i), float(v)) for i, v in found)]


@contextlib.contextmanager
def running_relays(command: str, flags: list[list[str]]) -> Iterator[list[Relay]]:
    """Start one relay per flag list (TLS, self-signed), stop them all afterwards."""
    with tempfile.TemporaryDirectory(prefix="workerpath-") as tmp:
        processes: list[subprocess.Popen[bytes]] = []
        relays: list[Relay] = []
        try:
            for index, extra in enumerate(flags):
                status_file = Path(tmp) / f"status-{index}.json"
                files = ["--certdir", f"{tmp}/certs-{index}", "-c", f"{tmp}/key-{index}.json"]
                common = ["--no-stun", "--hostname", "127.0.0.1", "--status-file", str(status_file)]
                processes.append(subprocess.Popen([command, *common, *files, "--log-level", "error", *extra]))
                for _ in range(400):
                    if status_file.exists() or processes[-1].poll() is not None:
                        break
                    time.sleep(0.05)
                relays.append(Relay(json.loads(status_file.read_text())))
            yield relays
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(15)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def placed_client(relay: Relay) -> tuple[DerpClient, NodePrivateKey, int]:
    before = relay.worker_connections()
    key = NodePrivateKey.generate()
    client = await connect(relay.endpoint, key)
    for _ in range(100):
        after = relay.worker_connections()
        if sum(after) == sum(before) + 1:
            return client, key, next(i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b)
        await asyncio.sleep(0.02)
    raise RuntimeError("the new connection never showed in the per-worker gauge")


async def flood(sender: DerpClient, receiver: DerpClient, dest: bytes, size: int, seconds: float) -> int:
    """Send from sender to receiver for ``seconds``, at most IN_FLIGHT ahead; packets delivered."""
    burst = f.SendPacket(dest, os.urandom(size)).encode() * BURST
    received = 0
    sent = 0
    caught_up = asyncio.Event()

    async def receive() -> None:
        nonlocal received
        while True:
            await receiver.recv_packet()
            received += 1
            if sent - received < IN_FLIGHT - BURST:
                caught_up.set()

    reading = asyncio.create_task(receive())
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sent - received >= IN_FLIGHT - BURST:
                caught_up.clear()
                try:
                    await asyncio.wait_for(caught_up.wait(), 1.0)
                except TimeoutError:
                    received = sent  # lost packets: count them gone and go on
                continue
            await sender.send_raw(burst)
            sent += BURST
    finally:
        reading.cancel()
    return received


async def report(
    name: str, pair: tuple[DerpClient, DerpClient, bytes], pids: list[int], size: int, seconds: float
) -> None:
    sender, receiver, dest = pair
    while not await flood(sender, receiver, dest, size, 0.5):  # warm-up; the mesh learns the receiver
        pass
    cpu_before, wall_before = cpu_seconds(pids), time.monotonic()
    delivered = await flood(sender, receiver, dest, size, seconds)
    cpu, wall = cpu_seconds(pids) - cpu_before, time.monotonic() - wall_before
    if delivered == 0:
        raise RuntimeError(f"{name}: no packet delivered")
    print(
        f"{name:>15}: {delivered / wall:9.0f} packets/s, "
        f"relay CPU {cpu / delivered * 1e6:6.2f} µs per packet ({cpu / wall:.2f} cores), {size} B",
        flush=True,
    )


async def between_workers(relay: Relay, size: int, seconds: float) -> None:
    by_worker: dict[int, list[tuple[DerpClient, NodePrivateKey]]] = {0: [], 1: []}
    while len(by_worker[0]) < 2 or len(by_worker[1]) < 1:
        client, key, worker = await placed_client(relay)
        by_worker[worker].append((client, key))
    (a, _), (b, key_b) = by_worker[0][:2]
    (c, _) = by_worker[1][0]
    await report("same worker", (a, b, key_b.public), relay.pids, size, seconds)
    await report("across workers", (c, b, key_b.public), relay.pids, size, seconds)
    for clients in by_worker.values():
        for client, _ in clients:
            await client.close()


async def across_the_mesh(relays: list[Relay], size: int, seconds: float) -> None:
    receiver_key = NodePrivateKey.generate()
    sender = await connect(relays[0].endpoint, NodePrivateKey.generate())
    receiver = await connect(relays[1].endpoint, receiver_key)
    pids = [pid for relay in relays for pid in relay.pids]
    await report("across the mesh", (sender, receiver, receiver_key.public), pids, size, seconds)
    await sender.close()
    await receiver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement per pair")
    parser.add_argument("--size", type=int, default=1200, help="packet size in bytes")
    parser.add_argument("--relay", default="derp-relay", help="the relay's command")
    args = parser.parse_args()
    with running_relays(args.relay, [["-a", "127.0.0.1:0", "--workers", "2"]]) as (relay,):
        asyncio.run(between_workers(relay, args.size, args.seconds))
    with tempfile.TemporaryDirectory(prefix="workerpath-mesh-") as tmp:
        mesh_key = Path(tmp) / "mesh.key"
        mesh_key.write_text(os.urandom(32).hex() + "\n")
        ports = [free_port(), free_port()]
        members = ",".join(f"127.0.0.1:{port}" for port in ports)
        mesh = [
            "--workers",
            "1",
            "--mesh-psk-file",
            str(mesh_key),
            "--mesh-with",
            members,
            "--mesh-tls-insecure",
        ]
        flags = [["-a", f"127.0.0.1:{port}", *mesh] for port in ports]
        with running_relays(args.relay, flags) as relays:
            asyncio.run(across_the_mesh(relays, args.size, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
