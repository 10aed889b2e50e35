"""The relay's UDP STUN responder: answers Binding Requests, ignores everything else.

A bad datagram is counted and dropped without a reply: STUN has no error
channel worth using against spoofable UDP, and answering garbage would make
the relay a reflector.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import cast

from . import stun
from .metrics import RelayStats

log = logging.getLogger("derprelay.stun")


class StunServerProtocol(asyncio.DatagramProtocol):
    """Answers each valid Binding Request with the sender's address."""

    def __init__(self, stats: RelayStats) -> None:
        self._stats = stats
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            txid = stun.parse_binding_request(data)
            host = str(addr[0]).split("%", 1)[0]
            address = ipaddress.ip_address(host)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
            reply = stun.binding_response(txid, address, int(addr[1]))
        except (stun.StunError, ValueError) as exc:
            self._stats.stun_malformed += 1
            log.debug("STUN from %s ignored: %s", addr[0], exc)
            return
        self._stats.stun_requests += 1
        self._stats.stun_families["ipv4" if address.version == 4 else "ipv6"] += 1
        assert self._transport is not None
        self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("STUN socket error: %s", exc)


async def start_stun_server(
    host: str, port: int, stats: RelayStats, *, sock: socket.socket | None = None
) -> asyncio.DatagramTransport:
    """Bind the STUN socket (or serve a bound ``sock``); an empty host or ``::`` serves IPv4 and IPv6 alike."""
    loop = asyncio.get_running_loop()
    if sock is None:
        family = socket.AF_INET6 if not host or ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and host in ("", "::"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host or "::", port))
        except OSError:
            sock.close()
            raise
    transport, _ = await loop.create_datagram_endpoint(lambda: StunServerProtocol(stats), sock=sock)
    return transport
