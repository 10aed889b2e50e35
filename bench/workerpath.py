"""The path between a relay's worker processes, against the path inside one worker.

Starts ``derp-relay --workers 2`` on loopback (plain HTTP, so the clients'
TLS does not hide the relay's cost), places client pairs by the per-worker
connection gauge, and floods each pair for a while: one pair whose sender and
receiver sit on the same worker, one whose sender and receiver sit on
different workers.  For each it reports delivered packets/s and the CPU the
relay's workers spent per packet (utime+stime of both worker processes, from
``/proc``): the difference is what the socketpair hop costs.  The clients are
Python (``derprelay.client``) in this process, so packets/s is bounded by
them; CPU per packet is the relay's own figure.
Run: ``python bench/workerpath.py [--seconds 5] [--size 1200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def worker_connections(base: str) -> list[float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.findall(r'^derp_worker_connections\{worker="(\d+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return [value for _, value in sorted((int(i), float(v)) for i, v in found)]


async def placed_client(endpoint: Endpoint, base: str) -> tuple[DerpClient, NodePrivateKey, int]:
    before = worker_connections(base)
    key = NodePrivateKey.generate()
    client = await connect(endpoint, key)
    for _ in range(100):
        after = worker_connections(base)
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


async def measure(base: str, endpoint: Endpoint, pids: list[int], size: int, seconds: float) -> None:
    by_worker: dict[int, list[tuple[DerpClient, NodePrivateKey]]] = {0: [], 1: []}
    while len(by_worker[0]) < 2 or len(by_worker[1]) < 1:
        client, key, worker = await placed_client(endpoint, base)
        by_worker[worker].append((client, key))
    pairs = {
        "same worker": (by_worker[0][0], by_worker[0][1]),
        "across workers": (by_worker[1][0], by_worker[0][0]),
    }
    for name, ((sender, _), (receiver, receiver_key)) in pairs.items():
        await flood(sender, receiver, receiver_key.public, size, 0.5)  # warm-up
        cpu_before, wall_before = cpu_seconds(pids), time.monotonic()
        delivered = await flood(sender, receiver, receiver_key.public, size, seconds)
        cpu, wall = cpu_seconds(pids) - cpu_before, time.monotonic() - wall_before
        if delivered == 0:
            raise RuntimeError(f"{name}: no packet delivered")
        print(
            f"{name:>15}: {delivered / wall:9.0f} packets/s, "
            f"relay CPU {cpu / delivered * 1e6:6.2f} µs per packet ({cpu / wall:.2f} cores), {size} B",
            flush=True,
        )
    for clients in by_worker.values():
        for client, _ in clients:
            await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement per pair")
    parser.add_argument("--size", type=int, default=1200, help="packet size in bytes")
    parser.add_argument("--relay", default="derp-relay", help="the relay's command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="workerpath-") as tmp:
        status_file = Path(tmp) / "status.json"
        command = [args.relay, "-a", "127.0.0.1:0", "--no-stun", "--certmode", "none", "--workers", "2"]
        command += ["-c", f"{tmp}/key.json", "--status-file", str(status_file), "--log-level", "warning"]
        relay = subprocess.Popen(command, stderr=sys.stderr)
        try:
            for _ in range(200):
                if status_file.exists() or relay.poll() is not None:
                    break
                time.sleep(0.05)
            status = json.loads(status_file.read_text())
            base = status["url"].removesuffix("/derp")
            asyncio.run(measure(base, Endpoint(status["url"]), status["workers"], args.size, args.seconds))
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
