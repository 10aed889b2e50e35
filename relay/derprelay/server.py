"""The relay core: who is connected, where each packet goes, what each client is owed.

:class:`RelayServer` is the registry (clients by key, duplicate connections,
mesh watchers, mesh forwarders, PeerGone bookkeeping).
:class:`ClientConnection` is one DERP connection's state machine: handshake,
frame handling, a bounded send queue and keep-alives.  Neither does socket I/O:
a connection talks to its transport through the small :class:`FrameSink`
interface, which ``derprelay.http`` implements for raw DERP and WebSocket.

Semantics follow Tailscale's derper (``derp/derpserver``): a per-client send
queue of bounded depth that drops the oldest packet when the client is not
reading, the last-active-wins policy for one key connected twice, PeerGone to
everyone who received from a client that left the region, WatchConns and
ClosePeer for holders of the mesh key only.

With ``--workers N`` each worker process runs its own :class:`RelayServer`,
and these rules hold for the relay as a whole: a worker learns the other
workers' clients through :class:`WorkerPeers` (``derprelay.workerlinks``) and
keeps them apart from its own, in ``_elsewhere``.  A packet goes to a client
here, else to the worker holding the key, else through the mesh.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from . import frames as f
from .keys import KEY_LEN, BoxOpenError, MeshKey, NodePrivateKey, SharedBox, short_key
from .metrics import (
    DISCO_FIRST_BYTE,
    DISCO_MAGIC,
    DISCO_MIN_LEN,
    DropReason,
    Gauges,
    RelayStats,
    looks_like_disco,
)
from .ratelimit import TokenBucket

log = logging.getLogger("derprelay")

SEND_QUEUE_DEPTH = 32
"""Packets buffered for a client that is not keeping up (derper's default)."""

SEND_QUEUE_BYTES = 512 * 1024
"""Packet bytes buffered for such a client: 32 of 16 KiB, but only 8 of the largest."""

CONTROL_QUEUE_BYTES = 16 * 1024
"""Other frames (Pong, PeerGone, Health) buffered for a client that is not reading; more are dropped."""

MESH_CONTROL_QUEUE_BYTES = 4 * 1024 * 1024
"""The same for a mesh peer (PeerPresent/PeerGone for every client); past it the link is closed."""

WRITE_TIMEOUT = 2.0
"""Seconds a client may leave its socket unread before we drop the connection."""

MESH_WRITE_TIMEOUT = 30.0
"""Mesh peers and monitors get longer: their initial PeerPresent flood is big."""

HANDSHAKE_TIMEOUT = 10.0
"""Seconds from connection to a complete ClientInfo (derper's deadline)."""

KEEP_ALIVE_JITTER = 5.0
"""Keep-alives go out every KeepAlive interval plus up to this much jitter."""

KEEP_ALIVE_INTERVAL = 60.0
"""derp.KeepAlive: clients treat two missed keep-alives as a dead server."""

PEER_GONE_NOT_HERE_RATE = 1.0
PEER_GONE_NOT_HERE_BURST = 3
"""At most 3 (then 1/s) "not here" PeerGones per client, answering disco only."""

DUPLICATE_KEY_HEALTH = (
    "this node key is connected to the relay more than once; "
    "only the most recently active connection receives packets"
)
"""Health text sent to every connection of a key that is connected twice."""

RESTART_RECONNECT_IN_MS = 1_000
RESTART_TRY_FOR_MS = 30_000
"""What the Restarting frame advises on graceful shutdown."""


class CloseReason(enum.StrEnum):
    """Why the relay closed a connection: the label of the metric and log line."""

    CLIENT_LEFT = "client_left"
    PROTOCOL_ERROR = "protocol_error"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    BAD_CLIENT_INFO = "bad_client_info"
    NOT_ADMITTED = "not_admitted"
    NOT_PERMITTED = "not_permitted"
    WRITE_TIMEOUT = "write_timeout"
    MESH_BACKLOG = "mesh_backlog"
    CLOSED_BY_PEER = "closed_by_mesh_peer"
    SHUTDOWN = "shutdown"


class FrameSink(Protocol):
    """What a connection needs from its transport (raw TCP/TLS or WebSocket)."""

    def write_frames(self, data: list[bytes]) -> None:
        """Write these frames (or parts of frames), in order, as one batch."""

    def close(self) -> None:
        """Flush what was written, then close."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class PacketForwarder(Protocol):
    """A mesh link that can carry a packet to a client on another relay."""

    name: str

    def forward_packet(self, source: bytes, destination: bytes, packet: bytes) -> bool:
        """Queue the packet; False if it had to be dropped."""


class WorkerPeers(Protocol):
    """The relay's other worker processes, as one worker's registry sees them."""

    def client_joined(self, present: f.PeerPresent) -> None:
        """A connection of ``present.peer`` registered here."""

    def client_left(self, key: bytes) -> None:
        """A connection of ``key`` here is gone."""

    def client_active(self, key: bytes) -> None:
        """A connection of ``key`` here sent last, so it should get the key's packets."""

    def close_peer(self, key: bytes) -> None:
        """Close the others' connections of ``key``."""

    def forward(self, worker: int, source: bytes, destination: bytes, packet: bytes) -> bool:
        """Queue the packet to ``worker``; False if it had to be dropped."""

    def after_all_heard(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every other worker has handled what we told it so far."""


Admission = Callable[[bytes, str], Coroutine[Any, Any, None]]
"""Checks (client key, client IP) and raises AdmissionDenied to refuse."""


class AdmissionDeniedError(Exception):
    """An admission check refused the client; the message says why."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Per-client receive limit, announced to the client in ServerInfo."""

    bytes_per_second: int
    burst_bytes: int


@dataclass(frozen=True, slots=True)
class ConnectionTraffic:
    """One connection's cumulative packet bytes, as ``/debug/traffic`` lists it."""

    remote: str
    key: bytes
    sent: int
    received: int
    unique_senders: int


class _KeySet:
    """All connections of one client key, and which of them gets its packets.

    The common case is one connection.  When a key connects more than once
    (a roaming client's old socket not yet dead, or a cloned key), the most
    recently connected or most recently sending connection is active: derper's
    ``lastWriterIsActive`` policy.
    """

    __slots__ = ("active", "connections")

    def __init__(self, first: ClientConnection) -> None:
        self.connections: list[ClientConnection] = [first]
        self.active: ClientConnection | None = first


class _Elsewhere:
    """A client key's connections on the other workers of this relay (it may be here too)."""

    __slots__ = ("active_worker", "connections", "present")

    def __init__(self, worker: int, present: f.PeerPresent) -> None:
        self.connections: dict[int, int] = {worker: 1}
        """Connections of the key on each worker, in the order the workers got their first."""
        self.active_worker = worker
        """Where packets for the key go: the newest connection, or the last to send."""
        self.present = present
        """The latest PeerPresent, for the watcher flood."""

    @property
    def total(self) -> int:
        return sum(self.connections.values())


class RelayServer:
    """The registry and router shared by every connection of one relay process."""

    def __init__(
        self,
        private_key: NodePrivateKey,
        *,
        mesh_key: MeshKey | None = None,
        admission: Admission | None = None,
        rate_limit: RateLimit | None = None,
        send_queue_depth: int = SEND_QUEUE_DEPTH,
        send_queue_bytes: int = SEND_QUEUE_BYTES,
        write_timeout: float = WRITE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        stats: RelayStats | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.mesh_key = mesh_key
        self.admission = admission
        self.rate_limit = rate_limit
        self.send_queue_depth = send_queue_depth
        self.send_queue_bytes = send_queue_bytes
        self.write_timeout = write_timeout
        self.handshake_timeout = handshake_timeout
        self.stats = stats or RelayStats()
        self._clients: dict[bytes, _KeySet] = {}
        self._watchers: set[ClientConnection] = set()
        self._forwarders: dict[bytes, list[PacketForwarder]] = {}
        self._received_from: dict[bytes, set[ClientConnection]] = {}
        self._connections: set[ClientConnection] = set()
        self._elsewhere: dict[bytes, _Elsewhere] = {}
        self.workers: WorkerPeers | None = None
        """The other workers of this relay; None when it is one process."""
        self.mesh_links_up = 0
        self.closing = False

    # --- registry ---------------------------------------------------------

    def gauges(self) -> Gauges:
        return Gauges(
            current_connections=len(self._connections),
            current_home_connections=sum(1 for c in self._connections if c.preferred),
            notideal_connections=sum(1 for c in self._connections if c.not_ideal),
            unique_client_keys=len(self._clients),
            duplicate_client_keys=sum(1 for s in self._clients.values() if len(s.connections) > 1),
            duplicate_client_conns=sum(
                len(s.connections) for s in self._clients.values() if len(s.connections) > 1
            ),
            watchers=len(self._watchers),
            remote_client_keys=sum(1 for key in self._forwarders if key not in self._clients),
            mesh_peers_connected=self.mesh_links_up,
        )

    def traffic(self) -> list[ConnectionTraffic]:
        return [
            ConnectionTraffic(c.remote, c.key, c.bytes_sent, c.bytes_received, len(c.sources_seen))
            for c in self._connections
        ]

    def consistency_problems(self) -> list[str]:
        """derper's ConsistencyCheck, for our registry: every index agrees with the others."""
        problems = []
        registered = [conn for key_set in self._clients.values() for conn in key_set.connections]
        if stray := sum(1 for conn in registered if conn not in self._connections):
            problems.append(f"{stray} registered connections are not open")
        if empty := sum(1 for key_set in self._clients.values() if not key_set.connections):
            problems.append(f"{empty} client keys have no connection")
        if wrong := sum(
            1 for key, s in self._clients.items() if s.active is not None and s.active.key != key
        ):
            problems.append(f"{wrong} client keys route to another key's connection")
        if lost := sum(1 for watcher in self._watchers if watcher not in self._connections):
            problems.append(f"{lost} mesh watchers are not open connections")
        if dangling := sum(
            1 for receivers in self._received_from.values() for r in receivers if r not in self._connections
        ):
            problems.append(f"{dangling} PeerGone subscriptions belong to closed connections")
        return problems

    def is_connected(self, key: bytes) -> bool:
        """Whether ``key`` is connected to this relay, here or on another worker."""
        return key in self._clients or key in self._elsewhere

    def connection_started(self, conn: ClientConnection) -> None:
        self._connections.add(conn)

    def register(self, conn: ClientConnection) -> None:
        """Make ``conn`` the active connection for its key and tell the watchers."""
        key_set = self._clients.get(conn.key)
        elsewhere = self._elsewhere.get(conn.key)
        if key_set is None:
            key_set = self._clients[conn.key] = _KeySet(conn)
        else:
            key_set.connections.append(conn)
            key_set.active = conn
        if len(key_set.connections) > 1 or elsewhere is not None:
            self.stats.dup_client_conns_total += 1
            for dup in key_set.connections:
                dup.send_health(DUPLICATE_KEY_HEALTH)
            log.info(
                "client %s connected %d times; newest is active",
                short_key(conn.key),
                len(key_set.connections) + (elsewhere.total if elsewhere else 0),
            )
        present = f.PeerPresent(conn.key, conn.address, conn.port, conn.present_flags)
        if self.workers is not None:
            self.workers.client_joined(present)
        self._broadcast(present)

    def unregister(self, conn: ClientConnection) -> None:
        """Forget ``conn``; if its key is gone from the region, send PeerGones."""
        self._connections.discard(conn)
        self._watchers.discard(conn)
        for source in conn.sources_seen:
            receivers = self._received_from.get(source)
            if receivers is not None:
                receivers.discard(conn)
                if not receivers:
                    del self._received_from[source]
        key_set = self._clients.get(conn.key)
        if key_set is None or conn not in key_set.connections:
            return
        key_set.connections.remove(conn)
        if self.workers is not None:
            self.workers.client_left(conn.key)
        elsewhere = self._elsewhere.get(conn.key)
        if key_set.connections:
            if key_set.active is not None or elsewhere is None:
                key_set.active = key_set.connections[-1]
            if len(key_set.connections) == 1 and elsewhere is None:
                key_set.connections[0].send_health("")
            return
        del self._clients[conn.key]
        if elsewhere is None:
            self._gone(conn.key)

    def _gone(self, key: bytes) -> None:
        """``key``'s last connection to this relay (every worker of it) is gone."""
        self._broadcast(f.PeerGone(key))
        if key not in self._forwarders:
            self._note_gone_from_region(key)

    def note_activity(self, conn: ClientConnection) -> None:
        """Last writer is active: a duplicate that speaks takes the key's packets."""
        key_set = self._clients.get(conn.key)
        if key_set is not None and key_set.active is not conn:
            key_set.active = conn
            # A mesh peer's links (one per worker of that relay) all write; nobody sends to its key.
            if self.workers is not None and conn.key in self._elsewhere and not conn.can_mesh:
                self.workers.client_active(conn.key)
                conn.hold_until_all_heard(self.workers)

    def add_watcher(self, conn: ClientConnection) -> None:
        """Subscribe a mesh peer to PeerPresent/PeerGone, starting with everyone now here."""
        if conn.key == self.public_key:
            return  # our own mesh link looped back to us
        self._watchers.add(conn)
        here = [
            f.PeerPresent(
                k, s.connections[-1].address, s.connections[-1].port, s.connections[-1].present_flags
            )
            for k, s in self._clients.items()
        ]
        others = [e.present for k, e in self._elsewhere.items() if k not in self._clients]
        conn.queue_control([present.encode() for present in here + others])

    def close_peer(self, key: bytes) -> int:
        """Close every connection of ``key`` (a mesh peer asked); returns how many here."""
        if self.workers is not None and key in self._elsewhere:
            self.workers.close_peer(key)
        return self.close_local_peer(key)

    def close_local_peer(self, key: bytes) -> int:
        """Close this worker's connections of ``key``; returns how many."""
        key_set = self._clients.get(key)
        if key_set is None:
            return 0
        victims = list(key_set.connections)
        for victim in victims:
            victim.close(CloseReason.CLOSED_BY_PEER)
        return len(victims)

    def _broadcast(self, frame: f.PeerPresent | f.PeerGone) -> None:
        if self._watchers:
            data = frame.encode()
            for watcher in list(self._watchers):  # one too far behind is closed, and leaves the set
                watcher.queue_control([data])

    def _note_gone_from_region(self, key: bytes) -> None:
        for receiver in self._received_from.pop(key, ()):
            receiver.sources_seen.discard(key)
            receiver.send_peer_gone(key, f.PeerGoneReason.DISCONNECTED)

    # --- mesh forwarders ---------------------------------------------------

    def add_forwarder(self, key: bytes, forwarder: PacketForwarder) -> None:
        """``key`` is reachable through ``forwarder`` (a mesh peer saw it connect)."""
        present = self._forwarders.setdefault(key, [])
        if forwarder not in present:
            present.append(forwarder)
            if len(present) == 2:
                self.stats.multiforwarder_created += 1

    def remove_forwarder(self, key: bytes, forwarder: PacketForwarder) -> None:
        present = self._forwarders.get(key)
        if present is None or forwarder not in present:
            self.stats.forwarder_delete_other += 1
            return
        present.remove(forwarder)
        if len(present) == 1:
            self.stats.multiforwarder_deleted += 1
        if present:
            return
        del self._forwarders[key]
        if not self.is_connected(key):
            self._note_gone_from_region(key)

    # --- routing ------------------------------------------------------------

    def route(
        self,
        sender: ClientConnection,
        source: bytes,
        dest: bytes,
        packet: bytes,
        *,
        forwarded: bool = False,
    ) -> None:
        """Deliver a packet locally, or through a mesh peer, or drop it and say why.

        A packet that a mesh peer ``forwarded`` to us is never forwarded again,
        so two relays that disagree about a client cannot bounce it forever.
        """
        key_set = self._clients.get(dest)
        if key_set is not None and key_set.active is not None:
            key_set.active.deliver_packet(source, packet)
            return
        elsewhere = self._elsewhere.get(dest)
        if elsewhere is not None:
            assert self.workers is not None
            if self.workers.forward(elsewhere.active_worker, source, dest, packet):
                self.stats.packets_to_workers += 1
            else:
                self.stats.drop(DropReason.WORKER_BACKLOG, packet)
            return
        if key_set is not None:
            self.stats.drop(DropReason.DUP_CLIENT, packet)
            return
        forwarders = None if forwarded else self._forwarders.get(dest)
        if forwarders:
            if forwarders[0].forward_packet(source, dest, packet):
                self.stats.packets_forwarded_out += 1
            else:
                self.stats.drop(DropReason.MESH_BACKLOG, packet)
            return
        reason = DropReason.UNKNOWN_DEST_ON_FWD if forwarded else DropReason.UNKNOWN_DEST
        self.stats.drop(reason, packet)
        if looks_like_disco(packet):
            sender.send_peer_gone_limited(dest)

    def note_received_from(self, source: bytes, receiver: ClientConnection) -> None:
        self._received_from.setdefault(source, set()).add(receiver)

    # --- the other workers of this relay ------------------------------------------

    def worker_packet(self, source: bytes, dest: bytes, packet: bytes) -> None:
        """Another worker sends us a packet for a client of ours; never passed on again."""
        self.stats.packets_from_workers += 1
        key_set = self._clients.get(dest)
        if key_set is None:
            self.stats.drop(DropReason.GONE_DISCONNECTED, packet)
            return
        (key_set.active or key_set.connections[-1]).deliver_packet(source, packet)

    def worker_client_joined(self, worker: int, present: f.PeerPresent) -> None:
        """A client connected to ``worker``: it is the newest, so it gets the key's packets."""
        key = present.peer
        elsewhere = self._elsewhere.get(key)
        if elsewhere is None:
            self._elsewhere[key] = _Elsewhere(worker, present)
        else:
            elsewhere.connections[worker] = elsewhere.connections.get(worker, 0) + 1
            elsewhere.active_worker = worker
            elsewhere.present = present
        key_set = self._clients.get(key)
        if key_set is not None:
            key_set.active = None
            for dup in key_set.connections:
                dup.send_health(DUPLICATE_KEY_HEALTH)
        self._broadcast(present)

    def worker_client_left(self, worker: int, key: bytes) -> None:
        """One of ``worker``'s connections of ``key`` is gone."""
        elsewhere = self._elsewhere.get(key)
        if elsewhere is None or worker not in elsewhere.connections:
            return
        elsewhere.connections[worker] -= 1
        left_the_worker = elsewhere.connections[worker] == 0
        if left_the_worker:
            del elsewhere.connections[worker]
        active_left = left_the_worker and elsewhere.active_worker == worker
        if not elsewhere.connections:
            del self._elsewhere[key]
        elif active_left:
            elsewhere.active_worker = next(reversed(elsewhere.connections))
        key_set = self._clients.get(key)
        if key_set is None:
            if key not in self._elsewhere:
                self._gone(key)
            return
        if active_left and key_set.active is None:
            key_set.active = key_set.connections[-1]  # ours before another worker's
        if key not in self._elsewhere and len(key_set.connections) == 1:
            key_set.connections[0].send_health("")

    def worker_client_active(self, worker: int, key: bytes) -> None:
        """``worker``'s connection of ``key`` sent last: packets go there now."""
        elsewhere = self._elsewhere.get(key)
        if elsewhere is None or worker not in elsewhere.connections:
            return
        elsewhere.active_worker = worker
        key_set = self._clients.get(key)
        if key_set is not None:
            key_set.active = None

    def worker_lost(self, worker: int) -> None:
        """The link to ``worker`` broke: its clients are gone (unless we are stopping too)."""
        if self.closing:
            return
        for key in [k for k, e in self._elsewhere.items() if worker in e.connections]:
            for _ in range(self._elsewhere[key].connections[worker]):
                self.worker_client_left(worker, key)

    def connection_count(self) -> int:
        """DERP connections on this worker (the worker metrics' per-worker figure)."""
        return len(self._connections)

    # --- lifecycle -------------------------------------------------------------

    async def shutdown(self, grace: float = 1.0) -> None:
        """Tell every client we are restarting, give the frames a moment, close all."""
        self.closing = True
        notice = f.Restarting(RESTART_RECONNECT_IN_MS, RESTART_TRY_FOR_MS).encode()
        for conn in list(self._connections):
            conn.queue_control([notice])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(c.has_backlog for c in self._connections):
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.close(CloseReason.SHUTDOWN)


class _State(enum.Enum):
    AWAIT_CLIENT_INFO = 1
    ADMITTING = 2
    RUNNING = 3
    CLOSED = 4


class ClientConnection:
    """One DERP connection, from ServerKey to close.

    Bytes arrive through :meth:`receive_data`; frames leave through the sink in
    batches, once per event-loop turn.  While the transport's buffer is full
    (``pause_writing``), packets wait in a queue of ``send_queue_depth`` and
    the oldest is dropped to make room, as derper does; if the client stays
    unreadable for the write timeout, the connection is closed.
    """

    # Slots: a relay holds one of these per idle client, and an instance dict is 1.2 KB more.
    __slots__ = (
        "_box",
        "_control",
        "_control_bytes",
        "_decoder",
        "_flush_scheduled",
        "_handshake_deadline",
        "_holds",
        "_keep_alive",
        "_label",
        "_loop",
        "_packet_bytes",
        "_packets",
        "_peer_gone_limit",
        "_queued_since",
        "_recv_limit",
        "_state",
        "_write_deadline",
        "_writing_paused",
        "address",
        "bytes_received",
        "bytes_sent",
        "can_mesh",
        "is_prober",
        "key",
        "not_ideal",
        "port",
        "preferred",
        "remote",
        "server",
        "sink",
        "sources_seen",
    )

    def __init__(
        self,
        server: RelayServer,
        sink: FrameSink,
        remote: tuple[str, int],
        *,
        not_ideal: bool = False,
    ) -> None:
        self.server = server
        self.sink = sink
        self.address = _parse_ip(remote[0])
        self.port = remote[1]
        self.remote = f"{remote[0]}:{remote[1]}"
        self.key = b""
        self.can_mesh = False
        self.is_prober = False
        self.not_ideal = not_ideal
        self.preferred = False
        self.sources_seen: set[bytes] = set()
        self.bytes_received = 0
        """DERP stream bytes read from the client (frames, counted per read), for /debug/traffic."""
        self.bytes_sent = 0
        """Packet bytes written to the client, for /debug/traffic."""
        self._state = _State.AWAIT_CLIENT_INFO
        self._decoder = f.FrameDecoder(KEY_LEN + f.MAX_UNTRUSTED_CLIENT_INFO_LEN)
        self._control: list[bytes] = []
        self._packets: list[tuple[bytes, bytes]] = []
        """(source, packet) pairs not yet written; framed at flush time, in the batch.

        A list, not a deque: an empty deque is 600 bytes per idle client, and
        the head is dropped only while paused, from at most 32.
        """
        self._packet_bytes = 0
        """Bytes of the packets in ``_packets``."""
        self._control_bytes = 0
        """Bytes of the frames in ``_control``."""
        self._flush_scheduled = False
        self._writing_paused = False
        self._queued_since = 0.0
        """When the oldest packet queued while writing was paused arrived (0: none waits)."""
        self._holds = 0
        """Frames wait while other workers may not know yet what we told them (see ``hold_until_all_heard``)."""
        self._loop = asyncio.get_running_loop()
        self._write_deadline: asyncio.TimerHandle | None = None
        self._keep_alive: asyncio.TimerHandle | None = None
        self._handshake_deadline: asyncio.TimerHandle | None = self._loop.call_later(
            server.handshake_timeout, self._handshake_timed_out
        )
        self._recv_limit: TokenBucket | None = None
        self._box: SharedBox | None = None
        """The key agreement with the client, from opening its ClientInfo to sealing our ServerInfo."""
        self._peer_gone_limit = TokenBucket(
            PEER_GONE_NOT_HERE_RATE, PEER_GONE_NOT_HERE_BURST, self._loop.time()
        )
        self._label = self.remote
        server.connection_started(self)
        self.queue_control([f.ServerKey(server.public_key).encode()])

    # --- properties -------------------------------------------------------------

    @property
    def present_flags(self) -> f.PeerPresentFlags:
        flags = f.PeerPresentFlags.NONE
        if self.is_prober:
            flags |= f.PeerPresentFlags.PROBER
        if self.can_mesh:
            flags |= f.PeerPresentFlags.MESH_PEER
        if self.not_ideal:
            flags |= f.PeerPresentFlags.NOT_IDEAL
        return flags or f.PeerPresentFlags.REGULAR

    @property
    def has_backlog(self) -> bool:
        return bool(self._control or self._packets) and self._state is not _State.CLOSED

    # --- input --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the transport; handles every complete frame."""
        if self._state is _State.CLOSED:
            return
        self.bytes_received += len(data)
        self._decoder.receive_data(data)
        self._process_frames()
        if self._recv_limit is not None and self._state is _State.RUNNING:
            self._charge_receive_limit(len(data))

    def _process_frames(self) -> None:
        try:
            for frame in self._decoder.frames():
                if self._state is _State.RUNNING:
                    self._handle(frame)
                elif self._state is _State.AWAIT_CLIENT_INFO and not self._handle_client_info(frame):
                    return  # the rest waits in the decoder until admitted
                if self._state is _State.CLOSED:
                    return
        except f.ProtocolError as exc:
            self.close(CloseReason.PROTOCOL_ERROR, str(exc))

    def connection_lost(self) -> None:
        """The transport is gone (peer hung up, or we closed it)."""
        if self._state is not _State.CLOSED:
            self._finish(CloseReason.CLIENT_LEFT, "")

    # --- handshake ------------------------------------------------------------------

    def _handle_client_info(self, frame: f.Frame) -> bool:
        """Authenticate the client; False while frames must wait (admission, or closed)."""
        if not isinstance(frame, f.ClientInfo):
            raise f.MalformedFrameError(f"expected CLIENT_INFO first, got {type(frame).__name__}")
        try:
            box = self.server.private_key.box_with(frame.public_key)
            plain = box.open(frame.sealed_info)
            info = f.ClientInfoMessage.from_json(plain)
        except (BoxOpenError, f.MalformedFrameError) as exc:
            self.close(CloseReason.BAD_CLIENT_INFO, str(exc))
            return False
        self.key = frame.public_key
        self._box = box
        self._label = f"{self.remote}{short_key(self.key)}"
        mesh_key = self.server.mesh_key
        self.can_mesh = bool(info.mesh_key) and mesh_key is not None and mesh_key.matches(info.mesh_key)
        self.is_prober = info.is_prober
        self._decoder.max_frame_len = f.MAX_SERVER_FRAME_LEN
        admission = self.server.admission
        if admission is None or self.can_mesh:
            self._admitted()
            return True
        self._state = _State.ADMITTING
        self.sink.pause_reading()
        task = self._loop.create_task(admission(self.key, str(self.address or "")))
        task.add_done_callback(self._admission_done)
        return False

    def _admission_done(self, task: asyncio.Task[None]) -> None:
        if self._state is not _State.ADMITTING:
            return
        exc = task.exception()
        if exc is not None:
            self.close(CloseReason.NOT_ADMITTED, str(exc))
            return
        self.sink.resume_reading()
        self._admitted()
        self._process_frames()

    def _admitted(self) -> None:
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
            self._handshake_deadline = None
        server = self.server
        info = f.ServerInfoMessage()
        if server.rate_limit is not None and not self.can_mesh:
            limit = server.rate_limit
            info = f.ServerInfoMessage(
                token_bucket_bytes_per_second=limit.bytes_per_second,
                token_bucket_bytes_burst=limit.burst_bytes,
            )
            self._recv_limit = TokenBucket(limit.bytes_per_second, limit.burst_bytes, self._loop.time())
        self._state = _State.RUNNING
        assert self._box is not None
        self.queue_control([f.ServerInfo(self._box.seal(info.to_json())).encode()])
        self._box = None  # the handshake's only use of it is over
        server.stats.accepts += 1
        server.register(self)
        if server.workers is not None:
            # ServerInfo tells the client it may be reached: with workers, once all know it.
            self.hold_until_all_heard(server.workers)
        self._schedule_keep_alive()
        log.debug("%s: connected (mesh=%s prober=%s)", self._label, self.can_mesh, self.is_prober)

    def _handshake_timed_out(self) -> None:
        self._handshake_deadline = None
        if self._state in (_State.AWAIT_CLIENT_INFO, _State.ADMITTING):
            self.close(
                CloseReason.HANDSHAKE_TIMEOUT,
                f"no complete handshake within {self.server.handshake_timeout:g}s",
            )

    # --- steady state -------------------------------------------------------------

    def _handle(self, frame: f.Frame) -> None:
        server = self.server
        server.note_activity(self)
        if isinstance(frame, f.SendPacket):
            stats = server.stats
            packet = frame.packet
            size = len(packet)
            stats.packets_received += 1
            stats.bytes_received += size
            # The first byte settles it for WireGuard packets (types 1-4): cheaper than startswith.
            if size >= DISCO_MIN_LEN and packet[0] == DISCO_FIRST_BYTE and packet.startswith(DISCO_MAGIC):
                stats.disco_packets_received += 1
            server.route(self, self.key, frame.destination, frame.packet)
        elif isinstance(frame, f.ForwardPacket):
            if self._permitted(frame):
                server.stats.packets_forwarded_in += 1
                server.route(self, frame.source, frame.destination, frame.packet, forwarded=True)
        elif isinstance(frame, f.Ping):
            server.stats.pings_received += 1
            server.stats.pongs_sent += 1
            self.queue_control([f.Pong(frame.data).encode()])
        elif isinstance(frame, f.NotePreferred):
            if frame.preferred and not self.preferred:
                server.stats.home_moves_in += 1
            elif self.preferred and not frame.preferred:
                server.stats.home_moves_out += 1
            self.preferred = frame.preferred
        elif isinstance(frame, f.WatchConns):
            if self._permitted(frame):
                server.add_watcher(self)
        elif isinstance(frame, f.ClosePeer):
            if self._permitted(frame):
                closed = server.close_peer(frame.peer)
                log.info(
                    "%s: ClosePeer %s closed %d connections",
                    self._label,
                    short_key(frame.peer),
                    closed,
                )
        elif isinstance(frame, (f.Pong, f.KeepAlive)):
            pass
        elif isinstance(frame, f.UnknownFrame):
            server.stats.unknown_frames += 1  # skipped for forward compatibility
        else:
            raise f.MalformedFrameError(f"a client may not send {type(frame).__name__}")

    def _permitted(self, frame: f.Frame) -> bool:
        """Mesh-only frames from a client without the mesh key close its connection."""
        if not self.can_mesh:
            self.close(
                CloseReason.NOT_PERMITTED,
                f"{type(frame).__name__} needs the mesh key, and this client has none",
            )
        return self.can_mesh

    def _charge_receive_limit(self, size: int) -> None:
        """Charge received bytes to the bucket; pause the socket until the debt is paid."""
        assert self._recv_limit is not None
        wait = self._recv_limit.take_debt(size, self._loop.time())
        if wait > 0:
            self.sink.pause_reading()
            self._loop.call_later(wait, self._resume_after_limit)

    def _resume_after_limit(self) -> None:
        if self._state is _State.RUNNING:
            self.sink.resume_reading()

    # --- output -------------------------------------------------------------------

    def deliver_packet(self, source: bytes, packet: bytes) -> None:
        """Queue a RecvPacket; remember the source so we can report it gone."""
        if self._state is not _State.RUNNING:
            self.server.stats.drop(DropReason.GONE_DISCONNECTED, packet)
            return
        if source not in self.sources_seen:
            self.sources_seen.add(source)
            self.server.note_received_from(source, self)
        packets = self._packets
        if self._writing_paused:
            if not packets:
                self._queued_since = self._loop.time()
            else:
                server = self.server
                limit = server.send_queue_bytes - len(packet)
                while packets and (len(packets) >= server.send_queue_depth or self._packet_bytes > limit):
                    _, dropped = packets.pop(0)
                    self._packet_bytes -= len(dropped)
                    server.stats.drop(DropReason.QUEUE_HEAD, dropped)
        packets.append((source, packet))
        self._packet_bytes += len(packet)
        self._schedule_flush()

    def queue_control(self, data: list[bytes]) -> None:
        """Queue non-packet frames; bounded while the client is not reading.

        A client past :data:`CONTROL_QUEUE_BYTES` loses the frame (counted);
        a mesh peer past :data:`MESH_CONTROL_QUEUE_BYTES` is disconnected
        instead, since a lost PeerPresent/PeerGone would leave it wrong about
        who is here; it reconnects and is sent everyone afresh.
        """
        if self._state is _State.CLOSED or not data:
            return
        size = sum(map(len, data))
        if self._writing_paused:
            if self.can_mesh:
                if self._control_bytes + size > MESH_CONTROL_QUEUE_BYTES:
                    self.close(CloseReason.MESH_BACKLOG, "mesh peer is not reading its PeerPresent/PeerGone")
                    return
            elif self._control_bytes + size > CONTROL_QUEUE_BYTES:
                self.server.stats.control_frames_dropped[f.FrameType(data[0][0]).name.lower()] += len(data)
                return
        self._control.extend(data)
        self._control_bytes += size
        self._schedule_flush()

    def send_peer_gone(self, peer: bytes, reason: f.PeerGoneReason) -> None:
        self.server.stats.peer_gone_frames[reason.name.lower()] += 1
        self.queue_control([f.PeerGone(peer, reason).encode()])

    def send_peer_gone_limited(self, peer: bytes) -> None:
        if self._peer_gone_limit.try_take(1, self._loop.time()):
            self.send_peer_gone(peer, f.PeerGoneReason.NOT_HERE)

    def send_health(self, problem: str) -> None:
        self.queue_control([f.Health(problem).encode()])

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._writing_paused and not self._holds:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def hold_until_all_heard(self, workers: WorkerPeers) -> None:
        """Write nothing more until every worker has heard what this one told them so far.

        Call it after telling them (the sync goes down the same links, behind the news).
        Whatever the client does after our next frame (send to a peer that just
        connected elsewhere, expect packets once it spoke last) then finds
        every worker up to date, as it would find one process.
        """
        self._holds += 1
        workers.after_all_heard(self._release)

    def _release(self) -> None:
        self._holds -= 1
        self._schedule_flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._state is _State.CLOSED or self._writing_paused or self._holds:
            return
        batch = self._control
        self._control = []
        self._control_bytes = 0
        if self._packets:
            header = f.recv_packet_header
            sent_bytes = 0
            for source, packet in self._packets:
                sent_bytes += len(packet)
                batch += (header(len(packet)), source, packet)
            stats = self.server.stats
            stats.packets_sent += len(self._packets)
            stats.bytes_sent += sent_bytes
            self.bytes_sent += sent_bytes
            if self._queued_since:
                stats.note_queue_time(self._loop.time() - self._queued_since, len(self._packets))
                self._queued_since = 0.0
            self._packets.clear()
            self._packet_bytes = 0
        if batch:
            self.sink.write_frames(batch)

    def pause_writing(self) -> None:
        """The transport's buffer is full: hold frames, start the write clock."""
        self._writing_paused = True
        timeout = MESH_WRITE_TIMEOUT if self.can_mesh else self.server.write_timeout
        if self._write_deadline is None:
            self._write_deadline = self._loop.call_later(timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        self._schedule_flush()

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        self.close(CloseReason.WRITE_TIMEOUT, "client stopped reading")

    def _schedule_keep_alive(self) -> None:
        delay = KEEP_ALIVE_INTERVAL + random.uniform(0, KEEP_ALIVE_JITTER)
        self._keep_alive = self._loop.call_later(delay, self._send_keep_alive)

    def _send_keep_alive(self) -> None:
        if self._state is _State.RUNNING:
            self.queue_control([f.KEEP_ALIVE_FRAME])
            self._schedule_keep_alive()

    # --- closing ------------------------------------------------------------------

    def close(self, reason: CloseReason, detail: str = "") -> None:
        """Close this connection, flushing what is queued, and say why in the log."""
        if self._state is _State.CLOSED:
            return
        self._flush()
        self._finish(reason, detail)
        self.sink.close()

    def _finish(self, reason: CloseReason, detail: str) -> None:
        self._state = _State.CLOSED
        for timer in (self._handshake_deadline, self._write_deadline, self._keep_alive):
            if timer is not None:
                timer.cancel()
        self._handshake_deadline = self._write_deadline = self._keep_alive = None
        for _, packet in self._packets:
            self.server.stats.drop(DropReason.GONE_DISCONNECTED, packet)
        self._packets.clear()
        self._control.clear()
        self._packet_bytes = self._control_bytes = 0
        self.server.stats.connections_closed[reason.value] += 1
        self.server.unregister(self)
        quiet = reason in (CloseReason.CLIENT_LEFT, CloseReason.SHUTDOWN)
        level = logging.DEBUG if quiet else logging.WARNING
        log.log(level, "%s: closed: %s%s", self._label, reason.value, f": {detail}" if detail else "")


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
