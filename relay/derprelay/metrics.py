"""The relay's counters and their Prometheus exposition.

The hot path bumps plain integer attributes of :class:`RelayStats` (a
prometheus-client ``Counter.inc`` takes a lock per call, too dear per
packet); :class:`RelayCollector` turns them into metric families only when
someone scrapes ``/debug/varz`` or ``/metrics``.  Metric names follow
derper's expvar names where the meaning is the same, with a ``derp_`` prefix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class DropReason:
    """Why a packet was not delivered (derper's ``dropReason`` names)."""

    UNKNOWN_DEST = "unknown_dest"
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    GONE_DISCONNECTED = "gone_disconnected"
    QUEUE_HEAD = "queue_head"
    QUEUE_TAIL = "queue_tail"
    WRITE_ERROR = "write_error"
    DUP_CLIENT = "dup_client"
    MESH_BACKLOG = "mesh_backlog"


@dataclass(slots=True)
class RelayStats:
    """Counters of one relay process; mutated directly by the relay core."""

    accepts: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_forwarded_in: int = 0
    packets_forwarded_out: int = 0
    pings_received: int = 0
    pongs_sent: int = 0
    home_moves_in: int = 0
    websocket_accepts: int = 0
    stun_requests: int = 0
    stun_malformed: int = 0
    packets_dropped: Counter[str] = field(default_factory=Counter)
    bytes_dropped: Counter[str] = field(default_factory=Counter)
    connections_closed: Counter[str] = field(default_factory=Counter)
    peer_gone_frames: Counter[str] = field(default_factory=Counter)
    http_requests: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str, size: int) -> None:
        self.packets_dropped[reason] += 1
        self.bytes_dropped[reason] += size


@dataclass(frozen=True, slots=True)
class Gauges:
    """Point-in-time values read from the relay core at scrape time."""

    current_connections: int
    current_home_connections: int
    unique_client_keys: int
    duplicate_client_keys: int
    watchers: int
    mesh_forwarded_keys: int
    mesh_peers_connected: int


class RelayCollector(Collector):
    """Exposes :class:`RelayStats` and the live gauges to prometheus-client."""

    def __init__(self, stats: RelayStats, gauges: Callable[[], Gauges]) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        simple = (
            ("derp_accepts", "DERP connections accepted (HTTP upgrade done)", s.accepts),
            ("derp_packets_received", "Packets received from clients", s.packets_received),
            ("derp_bytes_received", "Packet bytes received from clients", s.bytes_received),
            ("derp_packets_sent", "Packets written to clients", s.packets_sent),
            ("derp_bytes_sent", "Packet bytes written to clients", s.bytes_sent),
            (
                "derp_packets_forwarded_in",
                "Packets received from mesh peers",
                s.packets_forwarded_in,
            ),
            (
                "derp_packets_forwarded_out",
                "Packets forwarded to mesh peers",
                s.packets_forwarded_out,
            ),
            ("derp_got_ping", "Ping frames received", s.pings_received),
            ("derp_sent_pong", "Pong frames sent", s.pongs_sent),
            ("derp_home_moves_in", "Clients that made this relay their home", s.home_moves_in),
            ("derp_websocket_accepts", "DERP-over-WebSocket connections", s.websocket_accepts),
            ("derp_stun_requests", "STUN binding requests answered", s.stun_requests),
            ("derp_stun_malformed", "Malformed STUN datagrams ignored", s.stun_malformed),
        )
        for name, doc, value in simple:
            yield CounterMetricFamily(name, doc, value=value)
        labelled = (
            ("derp_packets_dropped", "Packets dropped, by reason", "reason", s.packets_dropped),
            ("derp_bytes_dropped", "Packet bytes dropped, by reason", "reason", s.bytes_dropped),
            (
                "derp_connections_closed",
                "Connections closed, by reason",
                "reason",
                s.connections_closed,
            ),
            (
                "derp_peer_gone_frames",
                "PeerGone frames sent, by reason",
                "reason",
                s.peer_gone_frames,
            ),
            ("derp_http_requests", "HTTP requests, by route", "route", s.http_requests),
        )
        for name, doc, label, counts in labelled:
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(counts.items()):
                family.add_metric([key], value)
            yield family
        g = self._gauges()
        for name, doc, value in (
            ("derp_current_connections", "Connected DERP clients", g.current_connections),
            (
                "derp_current_home_connections",
                "Clients whose home is this relay",
                g.current_home_connections,
            ),
            ("derp_clients_local", "Distinct client keys connected here", g.unique_client_keys),
            (
                "derp_duplicate_client_keys",
                "Keys connected more than once",
                g.duplicate_client_keys,
            ),
            ("derp_watchers", "Mesh peers watching this relay's clients", g.watchers),
            (
                "derp_clients_remote",
                "Client keys reachable through mesh peers",
                g.mesh_forwarded_keys,
            ),
            (
                "derp_mesh_peers_connected",
                "Outgoing mesh links that are up",
                g.mesh_peers_connected,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


def build_registry(collector: RelayCollector) -> CollectorRegistry:
    """A registry of our own, so several relays in one process (tests) don't clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
