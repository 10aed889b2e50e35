"""Region mesh: keep a link to every other relay and forward packets across it.

Each relay of a region dials every other member (``--mesh-with``) as a DERP
client holding the mesh key, subscribes with WatchConns, and learns from the
PeerPresent/PeerGone stream which clients sit where.  A packet for a client on
another member goes down that member's link as a ForwardPacket.  When a link
drops, everything learned through it is forgotten and the link is redialled
with backoff; on reconnect the watcher flood re-teaches it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from . import frames as f
from .client import DerpClient, DerpClientError, Endpoint, connect
from .keys import NodePrivateKey
from .metrics import MeshPeerState
from .server import RelayServer
from .tasks import cancel_and_wait

log = logging.getLogger("derprelay.mesh")

MESH_BACKLOG_LIMIT = 4 << 20
"""Bytes of unsent ForwardPackets a link may hold before new ones are dropped."""

SNAPSHOT_SETTLE = 0.2
"""Seconds to keep listening after the Pong that follows a peer's watch snapshot."""

RECONNECT_MIN = 0.25
RECONNECT_MAX = 5.0
"""Redial backoff bounds, in seconds: fast first retry, capped so a region heals quickly."""


class MeshConfigError(ValueError):
    """``--mesh-with`` or the mesh TLS settings are malformed."""


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """One ``--mesh-with`` entry: the name to connect to, and optionally where to dial."""

    host: str
    """``host`` or ``host:port``, used in the URL and for TLS verification."""
    dial_host: str = ""
    """Address to dial instead of resolving ``host`` (derper's ``host/dialhost``)."""

    @property
    def url(self) -> str:
        return f"https://{self.host}/derp"


def parse_mesh_with(value: str) -> list[MeshPeer]:
    """Parse derper's ``--mesh-with`` list: ``host[:port][/dialhost]``, comma-separated."""
    peers = []
    for item in value.split(","):
        entry = item.strip()
        if not entry:
            continue
        parts = entry.split("/")
        if len(parts) > 2 or not all(parts):
            raise MeshConfigError(f"mesh peer {entry!r} must be host[:port] or host[:port]/dialhost")
        peers.append(MeshPeer(parts[0], parts[1] if len(parts) == 2 else ""))
    return peers


@dataclass(frozen=True, slots=True)
class MeshViews:
    """Two views of one peer's clients, for ``/debug/check``."""

    peer: str
    learned: frozenset[bytes]
    """What our long-lived link was told (PeerPresent minus PeerGone)."""
    reported: frozenset[bytes]
    """What the peer lists to a new watcher right now."""


class MeshLink:
    """The link to one other region member; a :class:`PacketForwarder` for its clients."""

    def __init__(self, server: RelayServer, peer: MeshPeer, tls: ssl.SSLContext | None, insecure: bool):
        self.server = server
        self.peer = peer
        self.name = peer.host
        self._endpoint = Endpoint(peer.url, dial_host=_dial_address(peer), ssl_context=tls, insecure=insecure)
        self._client: DerpClient | None = None
        self._learned: set[bytes] = set()

    @property
    def state(self) -> MeshPeerState:
        return MeshPeerState(self.name, self._client is not None, len(self._learned))

    async def compare_views(self, timeout: float) -> MeshViews:
        """The peer's clients as our link learned them, and as the peer lists them now.

        The peer's list comes over a fresh watching connection.

        Our relay sends the whole list before it answers a Ping sent after
        WatchConns; a short settle time covers peers that send it from
        another goroutine (derper).
        """
        server = self.server
        assert server.mesh_key is not None, "mesh links need the mesh key"
        present: set[bytes] = set()
        # A key of its own: with the relay's key the peer would see our link's
        # key connected twice and make this connection the active one.
        observer = NodePrivateKey.generate()
        client = await asyncio.wait_for(connect(self._endpoint, observer, mesh_key=server.mesh_key), timeout)
        try:
            await client.watch_conns()
            await client.ping(b"snapshot")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            settle_until = deadline
            while (now := loop.time()) < settle_until:
                try:
                    frame = await asyncio.wait_for(client.recv(), settle_until - now)
                except TimeoutError:
                    break
                if isinstance(frame, f.PeerPresent):
                    present.add(frame.peer)
                elif isinstance(frame, f.PeerGone):
                    present.discard(frame.peer)
                elif isinstance(frame, f.Pong):
                    settle_until = min(deadline, loop.time() + SNAPSHOT_SETTLE)
        finally:
            await client.close()
        return MeshViews(
            self.name,
            learned=frozenset(self._learned - {observer.public}),
            reported=frozenset(present - {observer.public}),
        )

    def forward_packet(self, source: bytes, destination: bytes, packet: bytes) -> bool:
        client = self._client
        if client is None:
            return False
        return client.forward_nowait(source, destination, packet, MESH_BACKLOG_LIMIT)

    async def run(self) -> None:
        """Keep the link up until cancelled."""
        delay = RECONNECT_MIN
        while True:
            try:
                await self._serve_once()
                delay = RECONNECT_MIN
            except (DerpClientError, OSError, f.ProtocolError) as exc:
                log.warning("mesh %s: %s; redialling in %.2fs", self.name, exc, delay)
            finally:
                self._forget_all()
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX, delay * 2)

    async def _serve_once(self) -> None:
        server = self.server
        mesh_key = server.mesh_key
        assert mesh_key is not None, "mesh links need the mesh key"
        client = await connect(self._endpoint, server.private_key, mesh_key=mesh_key)
        if client.server_public_key == server.public_key:
            log.info("mesh %s: that is this relay; not meshing with ourselves", self.name)
            await client.close()
            await asyncio.Event().wait()  # stay idle: nothing to learn from ourselves
        self._client = client
        server.mesh_links_up += 1
        log.info("mesh %s: connected; watching its clients", self.name)
        try:
            await client.watch_conns()
            while True:
                frame = await client.recv()
                if isinstance(frame, f.PeerPresent):
                    self._learned.add(frame.peer)
                    server.add_forwarder(frame.peer, self)
                elif isinstance(frame, f.PeerGone):
                    self._learned.discard(frame.peer)
                    server.remove_forwarder(frame.peer, self)
        finally:
            server.mesh_links_up -= 1
            self._client = None
            await client.close()

    def _forget_all(self) -> None:
        for key in self._learned:
            self.server.remove_forwarder(key, self)
        if self._learned:
            log.info("mesh %s: forgot %d clients learned over the link", self.name, len(self._learned))
        self._learned.clear()

    def __repr__(self) -> str:
        return f"MeshLink({self.name}, {len(self._learned)} clients)"


def _dial_address(peer: MeshPeer) -> str:
    """The host part to dial; a dial host carries no port (the URL's port is used)."""
    if not peer.dial_host:
        return ""
    host = peer.dial_host
    if host.startswith("[") and "]" in host:
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


MESH_FILE_POLL = 5.0
"""Seconds between looks at ``--mesh-with-file`` (a mounted ConfigMap changes in place)."""


class Mesh:
    """Every link of this relay: started, stopped and re-planned as the peer list changes."""

    def __init__(
        self,
        server: RelayServer,
        tls: ssl.SSLContext | None,
        *,
        insecure: bool,
        own_hosts: frozenset[str],
    ) -> None:
        self._server = server
        self._tls = tls
        self._insecure = insecure
        self._own_hosts = own_hosts
        self._links: dict[MeshPeer, asyncio.Task[None]] = {}
        self._link_of: dict[MeshPeer, MeshLink] = {}
        self._hangups: set[asyncio.Task[None]] = set()
        """Links being cancelled after their peer left the list."""

    @property
    def peers(self) -> list[MeshPeer]:
        return list(self._links)

    @property
    def links(self) -> list[MeshLink]:
        return list(self._link_of.values())

    def states(self) -> list[MeshPeerState]:
        return [link.state for link in self._link_of.values()]

    def set_peers(self, peers: list[MeshPeer]) -> None:
        """Dial new peers, hang up on the ones no longer listed; keep the rest as they are."""
        wanted = {peer for peer in peers if peer.host not in self._own_hosts}
        for peer in set(self._links) - wanted:
            log.info("mesh %s: no longer a peer; hanging up", peer.host)
            del self._link_of[peer]
            hangup = asyncio.create_task(
                cancel_and_wait([self._links.pop(peer)]), name=f"hang up {peer.host}"
            )
            self._hangups.add(hangup)
            hangup.add_done_callback(self._hangups.discard)
        for peer in wanted - set(self._links):
            link = MeshLink(self._server, peer, self._tls, self._insecure)
            self._link_of[peer] = link
            self._links[peer] = asyncio.create_task(link.run(), name=f"mesh {peer.host}")

    async def follow_file(self, path: Path, extra: list[MeshPeer]) -> None:
        """Keep the links in step with ``path`` (plus ``extra``) until cancelled."""
        last: str | None = None
        while True:
            try:
                text = path.read_text()
            except OSError as exc:
                log.warning("mesh peers file %s: %s; keeping %d links", path, exc.strerror, len(self._links))
            else:
                if text != last:
                    try:
                        self.set_peers(extra + parse_mesh_with(text.replace("\n", ",")))
                        last = text
                    except MeshConfigError as exc:
                        log.warning("mesh peers file %s: %s; keeping %d links", path, exc, len(self._links))
            await asyncio.sleep(MESH_FILE_POLL)

    async def close(self) -> None:
        tasks = list(self._links.values())
        self._links.clear()
        self._link_of.clear()
        await cancel_and_wait([*tasks, *self._hangups])
