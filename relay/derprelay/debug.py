"""``/debug/`` and ``/metrics``: derper's debug handler, for derp-relay.

Who may look is decided as derper's ``tsweb.AllowDebugAccess`` does: requests
from loopback or a Tailscale address (100.64.0.0/10, fd7a:115c:a1e0::/48),
never a request that went through a proxy (``X-Forwarded-For``), plus an
explicit allow-list (``--debug-allow``, and derper's own ``TS_ALLOW_DEBUG_IP``
and ``TS_DEBUG_TRUSTED_CIDRS``) so Prometheus can scrape from a pod network.

Pages are produced by :meth:`DebugSite.serve` as complete :class:`Reply`
values; the HTTP layer only writes them.  With ``--workers`` the metrics pages
(``/metrics``, ``/debug/varz``, ``/debug/vars``) are the whole relay's, every
worker's figures added up; the other pages are the answering worker's, which
the index names.  The pure parts (access, the index,
traffic rounds, the consistency report) take plain values and are tested
without sockets.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from . import SPEEDUPS, http11, profiling
from .keys import public_key_text
from .mesh import Mesh, MeshViews
from .metrics import Identity, RelayMetrics
from .server import ConnectionTraffic, RelayServer
from .workerlinks import WorkerHub

log = logging.getLogger("derprelay.debug")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TAILSCALE_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),
)
"""Tailscale's address ranges: a tailnet peer may read the debug pages, as with derper."""

ALLOW_IP_ENV = "TS_ALLOW_DEBUG_IP"
TRUSTED_CIDRS_ENV = "TS_DEBUG_TRUSTED_CIDRS"
"""derper's environment knobs of the same meaning, honoured so a derper setup carries over."""

DEFAULT_PROFILE_SECONDS = 30
"""As pprof's default for ``/debug/pprof/profile``."""

TRAFFIC_INTERVAL = 2.0
"""Seconds between ``/debug/traffic`` rounds (derper's minimum between logs)."""

DEFAULT_TRAFFIC_SECONDS = 10
MAX_TRAFFIC_SECONDS = 120

CHECK_TIMEOUT = 5.0
"""Seconds to get each mesh peer's client list for ``/debug/check``."""


class DebugConfigError(ValueError):
    """An allow-list entry is not an IP address or CIDR."""


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``10.0.0.0/8,192.0.2.7`` (commas or spaces) into networks; a bare IP is a /32 or /128."""
    networks = []
    for item in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise DebugConfigError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return address


@dataclass(frozen=True, slots=True)
class DebugAccess:
    """Which peers may read ``/debug/`` and ``/metrics``."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, flag: str, environ: Mapping[str, str]) -> DebugAccess:
        """The ``--debug-allow`` list plus derper's two environment knobs."""
        text = " ".join((flag, environ.get(ALLOW_IP_ENV, ""), environ.get(TRUSTED_CIDRS_ENV, "")))
        return cls(parse_networks(text))

    def allows(self, peer: str, headers: Mapping[str, str]) -> bool:
        if headers.get("x-forwarded-for"):
            return False  # derper's rule: the proxy's address says nothing about the asker
        address = _address(peer)
        if address is None:
            return False
        if address.is_loopback:
            return True
        return any(address in network for network in TAILSCALE_NETWORKS + self.allowed)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    def encode(self, head_only: bool) -> bytes:
        return http11.response(
            self.status, [("Content-Type", self.content_type)], self.body, head_only=head_only
        )


def text(status: int, body: str) -> Reply:
    return Reply(status, body.encode())


# --- the index ---------------------------------------------------------------------

LINKS = (
    ("/debug/vars", "Metrics (JSON)"),
    ("/debug/varz", "Metrics (Prometheus, derper's names)"),
    ("/metrics", "Metrics (Prometheus, counters with _total)"),
    ("/debug/pprof/", "profiles (index)"),
    ("/debug/pprof/profile?seconds=30", "CPU profile, collapsed stacks"),
    ("/debug/pprof/goroutine", "asyncio tasks and threads"),
    ("/debug/pprof/heap", "heap summary (tracemalloc)"),
    ("/debug/gc", "force GC"),
    ("/debug/check", "Consistency check, with each mesh peer"),
    ("/debug/traffic", "Traffic check"),
)


def render_index(title: str, facts: Iterable[tuple[str, str]], links: Iterable[tuple[str, str]]) -> bytes:
    """derper's index layout: a title, ``<li><b>key:</b> value``, then the links."""
    items = [f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>" for k, v in facts]
    items += [
        f'<li><a href="{html.escape(u)}">{html.escape(u)}</a> ({html.escape(d)})</li>' for u, d in links
    ]
    return f"<html><body><h1>{html.escape(title)}</h1><ul>{''.join(items)}</ul></body></html>\n".encode()


def format_uptime(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s" if minutes else f"{secs}s"


# --- /debug/traffic ----------------------------------------------------------------


def traffic_round(
    previous: Mapping[str, ConnectionTraffic], now: Iterable[ConnectionTraffic]
) -> tuple[list[str], dict[str, ConnectionTraffic]]:
    """JSON lines for the connections whose counters moved since ``previous``."""
    current = {conn.remote: conn for conn in now}
    lines = []
    for remote, conn in sorted(current.items()):
        before = previous.get(remote)
        if before is None or before.sent < conn.sent or before.received < conn.received:
            line = {
                "Remote": remote,
                "Key": public_key_text(conn.key) if conn.key else "",
                "Sent": conn.sent,
                "Recv": conn.received,
                "UniqueSenders": conn.unique_senders,
            }
            lines.append(json.dumps(line))
    return lines, current


# --- /debug/check -------------------------------------------------------------------


def describe_views(views: MeshViews) -> list[str]:
    """What our link believes about a peer's clients but the peer does not, and the reverse."""
    problems = []
    unknown = views.reported - views.learned
    stale = views.learned - views.reported
    if unknown:
        problems.append(
            f"mesh {views.peer}: {len(unknown)} of its clients unknown to our link "
            f"(e.g. {public_key_text(min(unknown))})"
        )
    if stale:
        problems.append(
            f"mesh {views.peer}: our link still routes {len(stale)} clients it no longer has "
            f"(e.g. {public_key_text(min(stale))})"
        )
    return problems


# --- the site -------------------------------------------------------------------------


def _query_number(query: Mapping[str, list[str]], name: str, default: float, maximum: float) -> float:
    try:
        value = float(query.get(name, [str(default)])[0])
    except ValueError:
        return default
    return min(max(value, 0.0), maximum)


@dataclass
class DebugSite:
    """The debug pages of one relay process."""

    server: RelayServer
    metrics: RelayMetrics
    identity: Identity
    hostname: str
    access: DebugAccess = field(default_factory=DebugAccess)
    mesh: Callable[[], Mesh | None] = lambda: None
    profiler: profiling.CpuProfiler = field(default_factory=profiling.CpuProfiler)
    workers: WorkerHub | None = None
    """The other workers of this relay, whose metrics the metrics pages add up; None: one process."""

    def facts(self) -> list[tuple[str, str]]:
        server = self.server
        facts = [
            ("Uptime", format_uptime(time.monotonic() - self.identity.started)),
            ("Version", f"derp-relay {self.identity.version}"),
            ("Per-packet path", SPEEDUPS.describe()),
            ("Machine", socket.gethostname()),
            ("PID", str(os.getpid())),
            *(
                [("Worker", f"{self.workers.index} (this page's figures are this worker's)")]
                if self.workers
                else []
            ),
            ("TLS hostname", self.hostname),
            ("Server key", public_key_text(server.public_key)),
            ("Mesh key", str(server.mesh_key is not None).lower()),
        ]
        mesh = self.mesh()
        for state in mesh.states() if mesh else ():
            up = "up" if state.up else "down"
            facts.append((f"Mesh peer {state.name}", f"{up}, {state.clients} clients learned"))
        gauges = server.gauges()
        facts.append(("Connections", f"{gauges.current_connections} ({gauges.unique_client_keys} keys)"))
        return facts

    async def serve(self, request: http11.Request) -> Reply:
        """Answer one debug request (the caller has checked access)."""
        path = request.path
        query = parse_qs(urlsplit(request.target).query)
        if path == "/metrics":
            return Reply(200, await self.exposition("metrics"), "text/plain; version=0.0.4")
        if path == "/debug/varz":
            return Reply(200, await self.exposition("varz"), "text/plain; version=0.0.4")
        if path == "/debug/vars":
            return Reply(200, await self.exposition("vars"), "application/json")
        if path in ("/debug", "/debug/"):
            return Reply(
                200, render_index("derp-relay debug", self.facts(), LINKS), "text/html; charset=utf-8"
            )
        if path == "/debug/pprof/":
            pprof = [(u, d) for u, d in LINKS if u.startswith("/debug/pprof/") and u != path]
            return Reply(200, render_index("derp-relay profiles", [], pprof), "text/html; charset=utf-8")
        if path == "/debug/pprof/profile":
            seconds = _query_number(query, "seconds", DEFAULT_PROFILE_SECONDS, profiling.MAX_PROFILE_SECONDS)
            try:
                return text(200, await self.profiler.profile(seconds))
            except profiling.ProfilerBusyError as exc:
                return text(409, f"{exc}\n")
        if path == "/debug/pprof/goroutine":
            return text(200, profiling.task_dump())
        if path == "/debug/pprof/heap":
            return text(200, profiling.heap_summary(stop="stop" in query))
        if path == "/debug/gc":
            return text(200, profiling.collect_garbage())
        if path == "/debug/check":
            return await self.check()
        if path == "/debug/traffic":
            seconds = _query_number(query, "seconds", DEFAULT_TRAFFIC_SECONDS, MAX_TRAFFIC_SECONDS)
            return text(200, await self.traffic(seconds))
        return text(404, "not found\n")

    async def exposition(self, name: str) -> bytes:
        """The relay's metrics: this process's, or with workers every worker's added up."""
        if self.workers is None:
            return self.metrics.exposition(name)
        return await self.workers.relay_exposition(name)

    async def check(self) -> Reply:
        """derper's consistency check of the registry, and our view of each mesh peer against its own."""
        problems = self.server.consistency_problems()
        mesh = self.mesh()
        links = mesh.links if mesh else []
        compared = await asyncio.gather(
            *(link.compare_views(CHECK_TIMEOUT) for link in links), return_exceptions=True
        )
        for link, result in zip(links, compared, strict=True):
            if isinstance(result, BaseException):
                problems.append(
                    f"mesh {link.name}: cannot list its clients: {result or type(result).__name__}"
                )
            else:
                problems.extend(describe_views(result))
        if problems:
            return text(500, "\n".join(problems) + "\n")
        return text(200, f"derp-relay consistency check okay ({len(links)} mesh peers compared)\n")

    async def traffic(self, seconds: float) -> str:
        """Rounds of per-connection byte counts every TRAFFIC_INTERVAL, a blank line after each."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        previous: dict[str, ConnectionTraffic] = {}
        out: list[str] = []
        while True:
            lines, previous = traffic_round(previous, self.server.traffic())
            out.extend(lines)
            out.append("")
            if loop.time() + TRAFFIC_INTERVAL > deadline:
                return "\n".join(out) + "\n"
            await asyncio.sleep(TRAFFIC_INTERVAL)
