"""``--workers 2``: two processes on one port behave as one relay.

Which worker the kernel gives a connection is not ours to choose, so each
test connects, reads the per-worker connection gauge to see where the
connection landed, and connects more until it has what it needs on each.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from derprelay import frames as f
from derprelay.client import DerpClient, DerpClientError, connect
from derprelay.keys import MeshKey, NodePrivateKey
from relayharness import RECV_TIMEOUT, RelayProcess, exchange_every_size, metric, recv_matching, wait_for

WORKERS = 2
CLIENTS = 16
"""Enough that both workers get some (all on one: a 1 in 2**15 chance)."""


def worker_counts(relay: RelayProcess) -> list[float]:
    return [metric(relay, "derp_worker_connections", f'worker="{i}"') for i in range(WORKERS)]


async def placed(relay: RelayProcess, connecting: Awaitable[DerpClient]) -> tuple[DerpClient, int]:
    """Connect; return the client and the index of the worker that took it."""
    before = worker_counts(relay)
    client = await connecting
    after: list[float] = []

    def one_more() -> bool:
        after[:] = worker_counts(relay)
        return sum(after) == sum(before) + 1

    await wait_for(one_more, "the new connection in the per-worker gauge")
    return client, next(i for i in range(WORKERS) if after[i] > before[i])


class Clients:
    """Clients of one test by worker; all closed at the end."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.on: dict[int, list[tuple[DerpClient, NodePrivateKey]]] = {i: [] for i in range(WORKERS)}

    async def add(
        self, key: NodePrivateKey | None = None, **kwargs: object
    ) -> tuple[DerpClient, NodePrivateKey, int]:
        key = key or NodePrivateKey.generate()
        client, worker = await placed(self.relay, connect(self.relay.endpoint, key, **kwargs))  # type: ignore[arg-type]
        self.on[worker].append((client, key))
        return client, key, worker

    async def until_on(self, worker: int, **kwargs: object) -> tuple[DerpClient, NodePrivateKey]:
        """Connect clients until one lands on ``worker``."""
        for _ in range(64):
            client, key, landed = await self.add(**kwargs)
            if landed == worker:
                return client, key
        raise AssertionError(f"64 connections and none on worker {worker}")

    async def close(self) -> None:
        for clients in self.on.values():
            for client, _ in clients:
                await client.close()


@pytest.fixture
def workers(relay_factory: Callable[..., RelayProcess], mesh_key_file: Path) -> RelayProcess:
    return relay_factory("--workers", str(WORKERS), "--mesh-psk-file", str(mesh_key_file))


async def test_clients_on_different_workers_reach_each_other_and_metrics_add_up(
    workers: RelayProcess,
) -> None:
    assert len(workers.status["workers"]) == WORKERS
    clients = Clients(workers)
    try:
        for _ in range(CLIENTS):
            await clients.add()
        assert all(clients.on[i] for i in range(WORKERS)), "both workers took connections"
        assert worker_counts(workers) == [len(clients.on[i]) for i in range(WORKERS)]
        pairs = list(zip(clients.on[0], clients.on[1], strict=False))
        for (a, key_a), (b, key_b) in pairs:
            await exchange_every_size(a, key_a.public, b, key_b.public)
        sent = 6 * len(pairs)
        assert metric(workers, "derp_packets_to_workers_total") == sent
        assert metric(workers, "derp_packets_from_workers_total") == sent
        assert metric(workers, "derp_packets_sent_total") == sent
        assert metric(workers, "derp_packets_received_total") == sent
        assert metric(workers, "derp_current_connections") == CLIENTS
        assert metric(workers, "derp_accepts_total") == CLIENTS
    finally:
        await clients.close()


async def test_watcher_and_receivers_hear_of_clients_on_every_worker(
    workers: RelayProcess, mesh_key_file: Path
) -> None:
    mesh_key = MeshKey.from_text(mesh_key_file.read_text())
    clients = Clients(workers)
    try:
        watcher, watcher_key, here = await clients.add(mesh_key=mesh_key)
        other = 1 - here
        early, early_key = await clients.until_on(other)
        await watcher.watch_conns()
        expected = {key.public for group in clients.on.values() for _, key in group}
        flood: set[bytes] = set()
        while flood != expected:
            present = await recv_matching(watcher, f.PeerPresent)
            assert isinstance(present, f.PeerPresent) and present.peer in expected
            flood.add(present.peer)
        late, late_key = await clients.until_on(other, is_prober=True)
        while True:
            joined = await recv_matching(watcher, f.PeerPresent)
            assert isinstance(joined, f.PeerPresent)
            if joined.peer == late_key.public:
                break
        assert joined.flags == f.PeerPresentFlags.PROBER
        assert str(joined.address) == "127.0.0.1"
        # A receiver on this worker hears that a sender on the other one left.
        receiver, receiver_key = await clients.until_on(here)
        await late.send(receiver_key.public, b"from the other worker")
        assert (await asyncio.wait_for(receiver.recv_packet(), RECV_TIMEOUT)).source == late_key.public
        await late.close()
        assert await recv_matching(receiver, f.PeerGone) == f.PeerGone(late_key.public)
        while True:
            gone = await recv_matching(watcher, f.PeerGone)
            if gone == f.PeerGone(late_key.public):
                break
        assert early_key.public in flood and watcher_key.public in flood and early is not None
    finally:
        await clients.close()


async def test_a_key_on_two_workers_follows_the_duplicate_rules(workers: RelayProcess) -> None:
    clients = Clients(workers)
    key = NodePrivateKey.generate()
    try:
        sender, sender_key, _ = await clients.add()
        first, _, first_on = await clients.add(key)
        while True:  # the second connection of the key must land on the other worker
            second, _, second_on = await clients.add(key)
            if second_on != first_on:
                break
            clients.on[second_on].pop()
            await second.close()
            await wait_for(lambda: sum(worker_counts(workers)) == 2, "the extra connection closing")
        health = await recv_matching(second, f.Health)
        assert isinstance(health, f.Health) and "more than once" in health.problem
        await sender.send(key.public, b"to-newest")
        assert (await asyncio.wait_for(second.recv_packet(), RECV_TIMEOUT)).packet == b"to-newest"
        # The older connection speaks: it becomes the active one (last writer wins).
        await first.ping(b"i-am-up!")
        seen: list[f.Frame] = []
        while not seen or not isinstance(seen[-1], f.Pong):
            seen.append(await asyncio.wait_for(first.recv(), RECV_TIMEOUT))
        healths = [frame for frame in seen if isinstance(frame, f.Health)]
        assert healths and "more than once" in healths[-1].problem
        await sender.send(key.public, b"to-speaker")
        got = await asyncio.wait_for(first.recv_packet(), RECV_TIMEOUT)
        assert (got.source, got.packet) == (sender_key.public, b"to-speaker")
        await second.close()
        assert await recv_matching(first, f.Health) == f.Health("")
    finally:
        await clients.close()


async def test_close_peer_reaches_a_client_on_the_other_worker(
    workers: RelayProcess, mesh_key_file: Path
) -> None:
    clients = Clients(workers)
    try:
        watcher, _, here = await clients.add(mesh_key=MeshKey.from_text(mesh_key_file.read_text()))
        victim, victim_key = await clients.until_on(1 - here)
        await watcher.close_peer(victim_key.public)
        with pytest.raises(DerpClientError, match="closed"):
            while True:
                await asyncio.wait_for(victim.recv(), RECV_TIMEOUT)
        assert metric(workers, "derp_connections_closed_total", 'reason="closed_by_mesh_peer"') == 1
    finally:
        await clients.close()


async def restarting_everywhere(clients: Clients, stop: Callable[[], None]) -> None:
    for worker in range(WORKERS):
        await clients.until_on(worker)
    stop()
    for group in clients.on.values():
        for client, _ in group:
            assert await recv_matching(client, f.Restarting) == f.Restarting(1000, 30000)


async def test_sigterm_sends_restarting_from_every_worker_then_exits_cleanly(workers: RelayProcess) -> None:
    clients = Clients(workers)
    try:
        await restarting_everywhere(clients, workers.process.terminate)
    finally:
        await clients.close()
    assert workers.stop() == 0
    assert "got SIGTERM" in workers.log()


async def test_a_killed_worker_stops_the_relay_with_an_error(workers: RelayProcess) -> None:
    clients = Clients(workers)
    survivor_clients = Clients(workers)
    try:
        await clients.until_on(1)
        survivor, _ = await survivor_clients.until_on(0)
        os.kill(workers.status["workers"][1], signal.SIGKILL)
        assert await recv_matching(survivor, f.Restarting) == f.Restarting(1000, 30000)
        await asyncio.wait_for(asyncio.to_thread(workers.process.wait), RECV_TIMEOUT)
    finally:
        await clients.close()
        await survivor_clients.close()
    assert workers.process.returncode == 1
    assert "worker 1" in workers.log() and "died: signal SIGKILL" in workers.log()


async def test_the_workers_of_a_killed_supervisor_say_restarting_and_exit(workers: RelayProcess) -> None:
    """SIGKILL of the supervisor (an OOM kill, say): its workers say Restarting, then exit on their own."""
    clients = Clients(workers)
    try:
        await restarting_everywhere(clients, workers.process.kill)
    finally:
        await clients.close()
    worker_pids = workers.status["workers"]

    def all_gone() -> bool:
        gone = []
        for pid in worker_pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone.append(pid)
        return len(gone) == len(worker_pids)

    await wait_for(all_gone, "every worker to exit after its supervisor was killed", timeout=30)
    assert workers.log().count("the supervisor is gone; stopping this worker") == WORKERS
