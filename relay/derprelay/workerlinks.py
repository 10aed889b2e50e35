"""The Unix socketpairs between a relay's worker processes: this module only moves bytes.

Every pair of workers shares one socketpair (made by ``derprelay.supervisor``
before it forks them).  :class:`WorkerHub` is one worker's end of all of them:
the :class:`derprelay.server.WorkerPeers` its registry tells about its clients,
and the dispatcher that hands what the others say to the registry.  Messages
(``derprelay.workerwire``) queued during one event-loop turn leave in one
write per link, so a busy link costs a system call per turn, not per packet.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Callable
from typing import cast

from . import frames as f
from . import workerwire as ww
from .metrics import Family, MetricType
from .metricsum import sum_expositions, sum_vars
from .server import RelayServer

log = logging.getLogger("derprelay.workers")

LINK_BACKLOG_LIMIT = 4 << 20
"""Bytes a link may hold unwritten before packets to that worker are dropped (as the mesh's)."""

STATS_TIMEOUT = 2.0
"""Seconds a scrape waits for the other workers' metrics before answering with what came."""


class _WorkerLink(asyncio.Protocol):
    """One socketpair end: decodes what the other worker sends, batches what we send."""

    def __init__(self, hub: WorkerHub, peer: int) -> None:
        self._hub = hub
        self.peer = peer
        self._transport: asyncio.Transport | None = None
        self._decoder = ww.MessageDecoder()
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self.backlogged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=LINK_BACKLOG_LIMIT)

    def data_received(self, data: bytes) -> None:
        self._decoder.receive_data(data)
        try:
            for message in self._decoder.frames():
                self._hub.dispatch(self, message)
        except f.ProtocolError as exc:
            log.error("worker link %d: %s; closing it", self.peer, exc)
            assert self._transport is not None
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._hub.link_lost(self.peer)

    def pause_writing(self) -> None:
        self.backlogged = True

    def resume_writing(self) -> None:
        self.backlogged = False

    def send(self, *parts: bytes) -> None:
        """Queue message bytes; they leave with the rest of this turn's, in one write."""
        self._pending += parts
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class WorkerHub:
    """This worker's links to every other worker of the relay."""

    def __init__(self, index: int, server: RelayServer, exposition: Callable[[str], bytes]) -> None:
        self.index = index
        self._server = server
        self._exposition = exposition
        """This worker's own metrics by exposition name (``metrics``, ``varz``), in the Prometheus text format."""
        self._links: dict[int, _WorkerLink] = {}
        self._request_ids = itertools.count(1)
        self._stats_waiting: dict[int, tuple[asyncio.Future[None], dict[int, bytes]]] = {}
        self._syncs: dict[int, tuple[set[int], Callable[[], None]]] = {}
        """Callbacks of after_all_heard, with the workers yet to answer."""
        server.workers = self

    async def connect(self, sockets: dict[int, socket.socket]) -> None:
        """Take over this worker's ends of the socketpairs, keyed by the other worker's index."""
        loop = asyncio.get_running_loop()
        for peer, sock in sockets.items():
            link = _WorkerLink(self, peer)
            await loop.create_unix_connection(lambda link=link: link, sock=sock)  # type: ignore[misc]
            self._links[peer] = link

    def close(self) -> None:
        for link in self._links.values():
            link.close()

    # --- server.WorkerPeers ---------------------------------------------------------

    def _to_all(self, data: bytes) -> None:
        for link in self._links.values():
            link.send(data)

    def client_joined(self, present: f.PeerPresent) -> None:
        self._to_all(ww.ClientJoined(present).encode())

    def client_left(self, key: bytes) -> None:
        self._to_all(ww.ClientLeft(key).encode())

    def client_active(self, key: bytes) -> None:
        self._to_all(ww.ClientActive(key).encode())

    def close_peer(self, key: bytes) -> None:
        self._to_all(ww.ClosePeer(key).encode())

    def forward(self, worker: int, source: bytes, destination: bytes, packet: bytes) -> bool:
        link = self._links.get(worker)
        if link is None or link.backlogged:
            return False
        link.send(*ww.packet_parts(source, destination, packet))
        return True

    def after_all_heard(self, callback: Callable[[], None]) -> None:
        if not self._links:
            callback()
            return
        request_id = next(self._request_ids)
        self._syncs[request_id] = (set(self._links), callback)
        self._to_all(ww.Sync(request_id).encode())

    def _sync_answered(self, request_id: int, peer: int) -> None:
        waiting = self._syncs.get(request_id)
        if waiting is None:
            return
        peers, callback = waiting
        peers.discard(peer)
        if not peers:
            del self._syncs[request_id]
            callback()

    # --- what the other workers say ----------------------------------------------------

    def dispatch(self, link: _WorkerLink, message: ww.Message) -> None:
        server = self._server
        if isinstance(message, ww.Packet):
            server.worker_packet(message.source, message.destination, message.packet)
        elif isinstance(message, ww.ClientJoined):
            server.worker_client_joined(link.peer, message.present)
        elif isinstance(message, ww.ClientLeft):
            server.worker_client_left(link.peer, message.key)
        elif isinstance(message, ww.ClientActive):
            server.worker_client_active(link.peer, message.key)
        elif isinstance(message, ww.ClosePeer):
            server.close_local_peer(message.key)
        elif isinstance(message, ww.Sync):
            link.send(ww.SyncDone(message.request_id).encode())
        elif isinstance(message, ww.SyncDone):
            self._sync_answered(message.request_id, link.peer)
        elif isinstance(message, ww.StatsRequest):
            link.send(ww.StatsReply(message.request_id, self._exposition(message.exposition)).encode())
        else:
            waiting = self._stats_waiting.get(message.request_id)
            if waiting is not None:
                waiting[1][link.peer] = message.exposition
                self._stats_answered(waiting)

    def link_lost(self, peer: int) -> None:
        self._links.pop(peer, None)
        if not self._server.closing:
            log.info("worker link %d: closed; forgetting that worker's clients", peer)
        self._server.worker_lost(peer)
        for request_id in list(self._syncs):
            self._sync_answered(request_id, peer)
        for waiting in self._stats_waiting.values():
            self._stats_answered(waiting)

    def _stats_answered(self, waiting: tuple[asyncio.Future[None], dict[int, bytes]]) -> None:
        """Finish a scrape once every worker still linked has answered."""
        done, replies = waiting
        if set(self._links) <= set(replies) and not done.done():
            done.set_result(None)

    # --- metrics ---------------------------------------------------------------------------

    async def relay_exposition(self, name: str) -> bytes:
        """The relay's metrics (exposition ``name``): ours plus every other worker's, series by series."""
        request_id = next(self._request_ids)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        replies: dict[int, bytes] = {}
        self._stats_waiting[request_id] = (done, replies)
        try:
            if self._links:
                for link in self._links.values():
                    link.send(ww.StatsRequest(request_id, name).encode())
                try:
                    await asyncio.wait_for(done, STATS_TIMEOUT)
                except TimeoutError:
                    missing = sorted(set(self._links) - set(replies))
                    log.warning("metrics: no answer from workers %s; their figures are left out", missing)
        finally:
            del self._stats_waiting[request_id]
        mine = self._exposition(name)
        return (sum_vars if name == "vars" else sum_expositions)([mine, *replies.values()])


def worker_family(index: int, server: RelayServer) -> Family:
    """Per-worker connections, labelled by worker so that summing keeps them apart."""
    return Family(
        "derp_worker_connections",
        MetricType.GAUGE,
        "DERP connections on each worker process",
        ("worker",),
        (((str(index),), server.connection_count()),),
    )
