"""The relay's counters, and their two expositions: derper's ``/debug/varz`` and ``/metrics``.

The hot path bumps plain integer attributes of :class:`RelayStats` (a
prometheus-client ``Counter.inc`` takes a lock per call, too dear per
packet).  At scrape time :func:`relay_families` turns them into metric
families named, labelled and typed as Tailscale's derper names them, so
dashboards and alerts written for derper work unchanged; figures derper has
no name for sit beside them under names of our own.  ``/debug/varz`` renders
the families exactly as derper does (counters without a ``_total`` suffix);
``/metrics`` renders the same families through prometheus-client, whose
counters end in ``_total``.
"""

from __future__ import annotations

import enum
import json
import os
import resource
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import SPEEDUPS

DISCO_MAGIC = "TS💬".encode()
DISCO_MIN_LEN = len(DISCO_MAGIC) + 32 + 24
"""A disco (path discovery) packet: magic, sender's disco key, nonce."""
DISCO_FIRST_BYTE = DISCO_MAGIC[0]


def looks_like_disco(packet: bytes) -> bool:
    """Disco packets are told apart in the drop counters, as derper's ``kind`` label does."""
    return len(packet) >= DISCO_MIN_LEN and packet.startswith(DISCO_MAGIC)


class DropReason(enum.StrEnum):
    """Why a packet was not delivered (derper's ``dropReason`` names, plus mesh_backlog)."""

    UNKNOWN_DEST = "unknown_dest"
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    GONE_DISCONNECTED = "gone_disconnected"
    QUEUE_HEAD = "queue_head"
    QUEUE_TAIL = "queue_tail"
    WRITE_ERROR = "write_error"
    DUP_CLIENT = "dup_client"
    MESH_BACKLOG = "mesh_backlog"
    WORKER_BACKLOG = "worker_backlog"


class ShedReason(enum.StrEnum):
    """Why the listener refused a connection before its TLS handshake (``derp_handshakes_shed``)."""

    QUEUE_FULL = "queue_full"
    """--max-pending-handshakes connections were already waiting."""
    WAITED_TOO_LONG = "waited_too_long"
    """It waited longer than a client is likely to."""


PACKET_KINDS = ("disco", "other")
"""derper's ``kind`` label: disco packets, and everything else (WireGuard)."""

TCP_RTT_BUCKETS: tuple[tuple[float, str], ...] = tuple(
    (ms / 1000, f"{ms}ms") for ms in (10, 20, 50, 100, 150, 250, 500)
)
"""derper's derp_tcp_rtt ``le`` labels: the smallest bound a sample fits under, else ``inf``."""

TCP_INFO_RTT = struct.Struct("=I")
TCP_INFO_RTT_OFFSET = 68
"""Linux struct tcp_info: 8 one-byte fields, then u32s of which tcpi_rtt (microseconds) is the 16th."""


def tcp_rtt_label(seconds: float) -> str:
    for bound, label in TCP_RTT_BUCKETS:
        if seconds <= bound:
            return label
    return "inf"


def tcp_info_rtt(info: bytes) -> float:
    """The smoothed round-trip time in seconds from a TCP_INFO ``getsockopt`` answer."""
    if len(info) < TCP_INFO_RTT_OFFSET + TCP_INFO_RTT.size:
        raise ValueError(f"tcp_info of {len(info)} bytes has no tcpi_rtt")
    (microseconds,) = TCP_INFO_RTT.unpack_from(info, TCP_INFO_RTT_OFFSET)
    return int(microseconds) / 1e6


QUEUE_AVERAGE_ALPHA = 0.1
"""Weight of the newest sample in derper's moving average of queue time."""


@dataclass(slots=True)
class RelayStats:
    """Counters of one relay process; mutated directly by the relay core."""

    accepts: int = 0
    tcp_accepts: int = 0
    packets_received: int = 0
    disco_packets_received: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_forwarded_in: int = 0
    packets_forwarded_out: int = 0
    packets_to_workers: int = 0
    packets_from_workers: int = 0
    pings_received: int = 0
    pongs_sent: int = 0
    home_moves_in: int = 0
    home_moves_out: int = 0
    unknown_frames: int = 0
    dup_client_conns_total: int = 0
    multiforwarder_created: int = 0
    multiforwarder_deleted: int = 0
    forwarder_delete_other: int = 0
    websocket_accepts: int = 0
    stun_requests: int = 0
    stun_malformed: int = 0
    queue_average_ms: float = 0.0
    queue_average_packets: int = 0
    """The queue-time average as of this packets_sent count (see :meth:`note_queue_time`)."""
    packets_dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    """By (reason, kind)."""
    bytes_dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    connections_closed: Counter[str] = field(default_factory=Counter)
    peer_gone_frames: Counter[str] = field(default_factory=Counter)
    control_frames_dropped: Counter[str] = field(default_factory=Counter)
    """Frames other than packets not sent to a client that stopped reading, by frame type."""
    http_requests: Counter[str] = field(default_factory=Counter)
    stun_families: Counter[str] = field(default_factory=Counter)
    tls_versions_requested: Counter[str] = field(default_factory=Counter)
    tls_versions_active: Counter[str] = field(default_factory=Counter)
    tcp_rtt: Counter[str] = field(default_factory=Counter)
    """RTT samples of client connections by derper's ``le`` label (see :func:`tcp_rtt_label`)."""
    handshakes_pending: int = 0
    """Accepted connections waiting for their TLS handshake to start (a gauge, kept by the listener)."""
    handshakes_shed: Counter[str] = field(default_factory=Counter)
    """Connections refused before their TLS handshake, by :class:`ShedReason`."""

    def drop(self, reason: str, packet: bytes) -> None:
        kind = "disco" if looks_like_disco(packet) else "other"
        self.packets_dropped[reason, kind] += 1
        self.bytes_dropped[reason, kind] += len(packet)

    def count_tls_handshake_failed(self) -> None:
        """A connection went before its TLS handshake was done: refused, timed out or dropped."""
        self.connections_closed["tls_handshake_failed"] += 1

    def note_queue_time(self, seconds: float, packets: int) -> None:
        """``packets`` just written waited ``seconds`` (call after counting them in packets_sent).

        derper folds every packet's queue time into a moving average.  Here
        only packets that waited for a paused transport are timed: the rest
        are written on the next event-loop turn, 0 ms as derper counts, and
        are folded in as zeros by arithmetic instead of one by one.
        """
        keep = 1 - QUEUE_AVERAGE_ALPHA
        waited_ms = seconds * 1000
        before = self.queue_average_ms * keep ** (self.packets_sent - packets - self.queue_average_packets)
        self.queue_average_ms = waited_ms + (before - waited_ms) * keep**packets
        self.queue_average_packets = self.packets_sent

    @property
    def average_queue_ms(self) -> float:
        """derper's average_queue_duration_ms: moving average of how long packets waited to be written."""
        unwaited = self.packets_sent - self.queue_average_packets
        return self.queue_average_ms * (1 - QUEUE_AVERAGE_ALPHA) ** unwaited


@dataclass(frozen=True, slots=True)
class Gauges:
    """Point-in-time values read from the relay core at scrape time."""

    current_connections: int
    current_home_connections: int
    notideal_connections: int
    unique_client_keys: int
    duplicate_client_keys: int
    duplicate_client_conns: int
    watchers: int
    remote_client_keys: int
    """Keys reachable only through a mesh peer (not connected here)."""
    mesh_peers_connected: int


@dataclass(frozen=True, slots=True)
class MeshPeerState:
    """One configured mesh peer as this relay sees it."""

    name: str
    up: bool
    clients: int
    """Client keys learned from the peer over its link."""


class MetricType(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name, type, help and samples (label values, value)."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    samples: tuple[tuple[tuple[str, ...], float], ...] = ()


def _one(name: str, type_: MetricType, help_: str, value: float) -> Family:
    return Family(name, type_, help_, (), (((), value),))


def _labelled(
    name: str, type_: MetricType, help_: str, label: str, counts: Iterable[tuple[str, float]]
) -> Family:
    return Family(name, type_, help_, (label,), tuple(((key,), value) for key, value in sorted(counts)))


def _drops(name: str, help_: str, counts: Counter[tuple[str, str]]) -> Family:
    """Every reason x kind, zeros included, as derper shows them (an alert can rate() a zero)."""
    samples = tuple(((reason, kind), counts[reason, kind]) for reason in DropReason for kind in PACKET_KINDS)
    return Family(name, MetricType.COUNTER, help_, ("reason", "kind"), samples)


UNLIMITED = float(2**64 - 1)
"""How Go's process collector (derper) shows an unlimited address space."""


def parse_ip_octets(netstat: str) -> tuple[int, int]:
    """InOctets and OutOctets from /proc/<pid>/net/netstat: the network namespace's IP bytes."""
    rows = [line.split() for line in netstat.splitlines() if line.startswith("IpExt:")]
    if len(rows) != 2 or len(rows[0]) != len(rows[1]):
        raise ValueError("no IpExt header and value lines")
    values = dict(zip(rows[0][1:], rows[1][1:], strict=True))
    return int(values["InOctets"]), int(values["OutOctets"])


def process_families() -> list[Family]:
    """The process figures derper's Go collector has and Python's prometheus-client lacks."""
    c, gauge = MetricType.COUNTER, MetricType.GAUGE
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    families = [
        _one(
            "process_virtual_memory_max_bytes",
            gauge,
            "Address space limit",
            UNLIMITED if limit == resource.RLIM_INFINITY else limit,
        )
    ]
    try:
        received, sent = parse_ip_octets(Path("/proc/self/net/netstat").read_text())
    except (OSError, ValueError, KeyError):
        return families
    return [
        *families,
        _one(
            "process_network_receive_bytes_total",
            c,
            "IP bytes received in the relay's network namespace",
            received,
        ),
        _one(
            "process_network_transmit_bytes_total", c, "IP bytes sent in the relay's network namespace", sent
        ),
    ]


def open_file_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class Identity:
    """What the relay is and since when: derper's ``version`` and ``uptime_sec``."""

    version: str
    started: float = field(default_factory=time.monotonic)
    started_unix: float = field(default_factory=time.time)


def relay_families(
    stats: RelayStats, gauges: Gauges, mesh: list[MeshPeerState], identity: Identity
) -> list[Family]:
    """All of the relay's own metrics: derper's names first, then ours."""
    s, g = stats, gauges
    c, gauge = MetricType.COUNTER, MetricType.GAUGE
    closed = s.connections_closed
    return [
        # --- derper's names -------------------------------------------------
        _one("derp_accepts", c, "DERP connections accepted (handshake done)", s.accepts),
        _one("derp_bytes_received", c, "Packet bytes received from clients", s.bytes_received),
        _one("derp_bytes_sent", c, "Packet bytes written to clients", s.bytes_sent),
        _one("derp_packets_received", c, "Packets received from clients", s.packets_received),
        _labelled(
            "derp_packets_received_kind",
            c,
            "Packets received from clients, by kind",
            "kind",
            (
                ("disco", s.disco_packets_received),
                ("other", s.packets_received - s.disco_packets_received),
            ),
        ),
        _one("derp_packets_sent", c, "Packets written to clients", s.packets_sent),
        _drops("derp_packets_dropped", "DERP packets dropped by reason and by kind", s.packets_dropped),
        _drops("derp_bytes_dropped", "DERP bytes dropped by reason and by kind", s.bytes_dropped),
        _one("derp_packets_forwarded_in", c, "Packets received from mesh peers", s.packets_forwarded_in),
        _one("derp_packets_forwarded_out", c, "Packets forwarded to mesh peers", s.packets_forwarded_out),
        _one(
            "derp_packets_to_workers",
            c,
            "Packets handed to another worker process of this relay",
            s.packets_to_workers,
        ),
        _one(
            "derp_packets_from_workers",
            c,
            "Packets another worker process of this relay handed to this one",
            s.packets_from_workers,
        ),
        _one("derp_got_ping", c, "Ping frames received", s.pings_received),
        _one("derp_sent_pong", c, "Pong frames sent", s.pongs_sent),
        _one("derp_home_moves_in", c, "Clients that made this relay their home", s.home_moves_in),
        _one("derp_home_moves_out", c, "Clients that stopped calling this relay home", s.home_moves_out),
        _one("derp_unknown_frames", c, "Frames of unknown type skipped", s.unknown_frames),
        _one(
            "derp_peer_gone_disconnected_frames",
            c,
            "PeerGone(disconnected) frames sent",
            s.peer_gone_frames["disconnected"],
        ),
        _one(
            "derp_peer_gone_not_here_frames",
            c,
            "PeerGone(not here) frames sent",
            s.peer_gone_frames["not_here"],
        ),
        _one("derp_sclient_write_timeouts", c, "Clients closed for not reading", closed["write_timeout"]),
        _one(
            "derp_total_dup_client_conns",
            c,
            "Connections of a key already connected",
            s.dup_client_conns_total,
        ),
        _one(
            "derp_multiforwarder_created",
            c,
            "Keys that became reachable via two mesh peers",
            s.multiforwarder_created,
        ),
        _one("derp_multiforwarder_deleted", c, "Keys back to a single mesh peer", s.multiforwarder_deleted),
        _one(
            "derp_packet_forwarder_delete_other_value",
            c,
            "PeerGone from a mesh peer that was not forwarding the key",
            s.forwarder_delete_other,
        ),
        _labelled(
            "derp_tcp_rtt",
            c,
            "TCP round-trip samples of DERP connections, by bucket",
            "le",
            s.tcp_rtt.items(),
        ),
        _one("derp_websocket_accepts", c, "DERP-over-WebSocket connections", s.websocket_accepts),
        _one(
            "derp_average_queue_duration_ms", gauge, "Moving average of packet queue time", s.average_queue_ms
        ),
        _one("derp_current_connections", gauge, "Connected DERP clients", g.current_connections),
        _one(
            "derp_current_home_connections",
            gauge,
            "Clients whose home is this relay",
            g.current_home_connections,
        ),
        _one(
            "derp_current_notideal_connections",
            gauge,
            "Clients that told us another node is their ideal one",
            g.notideal_connections,
        ),
        _one("derp_current_dup_client_keys", gauge, "Keys connected more than once", g.duplicate_client_keys),
        _one(
            "derp_current_dup_client_conns",
            gauge,
            "Connections of keys connected more than once",
            g.duplicate_client_conns,
        ),
        _one("derp_clients_local", gauge, "Distinct client keys connected here", g.unique_client_keys),
        _one(
            "derp_clients_remote",
            gauge,
            "Client keys reachable only through mesh peers",
            g.remote_client_keys,
        ),
        _one(
            "derp_clients_total",
            gauge,
            "Client keys in the region as this relay knows it",
            g.unique_client_keys + g.remote_client_keys,
        ),
        _one("derp_watchers", gauge, "Mesh peers watching this relay's clients", g.watchers),
        _one("derp_current_file_descriptors", gauge, "Open file descriptors", open_file_descriptors()),
        _labelled(
            "stun_requests",
            c,
            "STUN datagrams, by disposition",
            "disposition",
            (("success", s.stun_requests), ("not_stun", s.stun_malformed)),
        ),
        _labelled(
            "stun_addrfamily",
            c,
            "STUN requests answered, by address family",
            "family",
            ((family, s.stun_families[family]) for family in ("ipv4", "ipv6")),
        ),
        _one(
            "tls_listener_accepted_connections",
            c,
            "TCP connections accepted (those over --accept-connection-limit not counted)",
            s.tcp_accepts,
        ),
        _one(
            "tls_listener_rejected_connections",
            c,
            "TCP connections refused by --accept-connection-limit",
            closed["accept_rate_limited"],
        ),
        _labelled(
            "derper_tls_request_version",
            c,
            "TLS connections, by negotiated version",
            "version",
            s.tls_versions_requested.items(),
        ),
        _labelled(
            "derper_tls_active_version",
            gauge,
            "Open TLS connections, by negotiated version",
            "version",
            ((v, n) for v, n in s.tls_versions_active.items() if n),
        ),
        _one("bootstrap_dns_requests", c, "/bootstrap-dns requests", s.http_requests["bootstrap_dns"]),
        _one("uptime_sec", c, "Seconds since the relay started", int(time.monotonic() - identity.started)),
        _one(
            "process_start_unix_time",
            gauge,
            "When the relay started, Unix seconds",
            int(identity.started_unix),
        ),
        Family(
            "version",
            gauge,
            "The relay's version",
            ("version", "binary"),
            (((identity.version, "derp-relay"), 1),),
        ),
        # --- ours -------------------------------------------------------------
        Family(
            "derp_relay_speedups_info",
            gauge,
            "1, labelled with the per-packet path this relay runs: compiled (mypyc) or pure (Python)",
            ("path",),
            (((SPEEDUPS.path,), 1),),
        ),
        _labelled("derp_connections_closed", c, "Connections closed, by reason", "reason", closed.items()),
        _labelled("derp_http_requests", c, "HTTP requests, by route", "route", s.http_requests.items()),
        _labelled(
            "derp_handshakes_shed",
            c,
            "Connections refused before their TLS handshake, as too many waited or one waited too long",
            "reason",
            ((reason, s.handshakes_shed[reason]) for reason in ShedReason),
        ),
        _one(
            "derp_handshakes_pending",
            gauge,
            "Accepted connections waiting for their TLS handshake to start",
            s.handshakes_pending,
        ),
        _labelled(
            "derp_control_frames_dropped",
            c,
            "Frames other than packets dropped for a client that is not reading, by frame type",
            "frame",
            s.control_frames_dropped.items(),
        ),
        _one("derp_mesh_peers_connected", gauge, "Outgoing mesh links that are up", g.mesh_peers_connected),
        _labelled(
            "derp_mesh_peer_up",
            gauge,
            "1 while the link to this mesh peer is up",
            "peer",
            ((p.name, int(p.up)) for p in mesh),
        ),
        _labelled(
            "derp_mesh_peer_clients",
            gauge,
            "Client keys learned from this mesh peer",
            "peer",
            ((p.name, p.clients) for p in mesh),
        ),
        *process_families(),
    ]


# --- /debug/varz: derper's text --------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_varz_families(families: Iterable[Family]) -> bytes:
    """Prometheus text as derper writes it: HELP, TYPE, then ``name{labels} value``."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for values, value in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(family.labels, values, strict=True))
            lines.append(
                f"{family.name}{{{labels}}} {_number(value)}" if labels else f"{family.name} {_number(value)}"
            )
    return ("\n".join(lines) + "\n").encode()


def vars_json(families: Iterable[Family]) -> bytes:
    """``/debug/vars``: every figure as JSON; labelled ones keyed by ``label=value,…``."""
    doc: dict[str, object] = {}
    for family in families:
        if family.labels:
            doc[family.name] = {
                ",".join(f"{k}={v}" for k, v in zip(family.labels, values, strict=True)): value
                for values, value in family.samples
            }
        else:
            doc[family.name] = family.samples[0][1]
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


# --- prometheus-client ---------------------------------------------------------------


def to_prometheus(family: Family) -> Metric:
    """The same family as a prometheus-client metric (its counters gain ``_total``)."""
    labels = list(family.labels)
    metric: CounterMetricFamily | GaugeMetricFamily
    if family.type is MetricType.COUNTER:
        metric = CounterMetricFamily(family.name, family.help, labels=labels)
    else:
        metric = GaugeMetricFamily(family.name, family.help, labels=labels)
    for values, value in family.samples:
        metric.add_metric(list(values), value)
    return metric


class RelayCollector(Collector):
    """Exposes the relay's families to prometheus-client."""

    def __init__(self, families: Callable[[], list[Family]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield to_prometheus(family)


@dataclass(slots=True)
class RelayMetrics:
    """Both expositions of one relay: ``/debug/varz`` (derper's names) and ``/metrics``.

    Registries of our own, so several relays in one process (tests) don't clash.
    The runtime registry holds the process_* and python_* figures (derper's
    process_* and go_* peers); ``/metrics`` shows them too.
    """

    families: Callable[[], list[Family]]
    runtime: CollectorRegistry = field(init=False)
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        runtime = (ProcessCollector(registry=None), PLATFORM_COLLECTOR, GC_COLLECTOR)
        self.runtime = CollectorRegistry(auto_describe=False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(self.families))
        for collector in runtime:
            self.runtime.register(collector)
            self.registry.register(collector)

    def varz(self) -> bytes:
        return render_varz_families(self.families()) + generate_latest(self.runtime)

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def exposition(self, name: str) -> bytes:
        """``metrics`` (``/metrics``), ``varz`` (``/debug/varz``) or ``vars``, for another worker to add up."""
        if name == "vars":
            return self.vars()
        return self.varz() if name == "varz" else self.prometheus()

    def vars(self) -> bytes:
        return vars_json(self.families())
