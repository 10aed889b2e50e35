"""The relay's accept loop: what every TCP connection goes through before its TLS handshake.

asyncio's ``create_server`` accepts every connection the kernel holds, all in
one go, and starts each one's TLS handshake at once.  A handshake is about a
millisecond of CPU on the event loop (OpenSSL's key exchange and signature),
so an accept storm of thousands of connections put thousands of handshakes
into the same few event-loop turns: established clients' packets waited for
seconds, and the handshakes, all progressing together, were so slow that
most clients gave up (measured: 336 DERP handshakes in a 10 s storm where
derper completed 2903).  Here instead:

* at most :data:`ACCEPT_BATCH` connections are accepted per turn;
* ``--accept-connection-limit`` applies at accept, before any TLS work, and
  a connection over it is closed at once, as derper does;
* at most ``handshakes_per_turn`` TLS handshakes start per turn, each only
  once its ClientHello is here (so its costly first step is in the next
  turn), and the reads of established connections run between batches;
* the rest wait, accepted but unread, oldest first; a connection is refused
  (closed) when ``max_pending`` already wait, or when it has waited
  ``max_wait`` seconds.  A prompt refusal is a clean answer the client
  retries with backoff; a handshake that times out is a hang.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from .metrics import RelayStats, ShedReason
from .ratelimit import TokenBucket

log = logging.getLogger("derprelay.listener")

LISTEN_BACKLOG = 1024
"""Connections the kernel may hold for us between two turns of the accept loop."""

ACCEPT_BATCH = 16
"""Connections accepted per event-loop turn: a refusal costs tens of µs, so a turn spends
about a millisecond at most on them; beyond, the kernel's backlog holds the storm."""

HANDSHAKES_PER_TURN = 1
"""Default TLS handshakes started per event-loop turn (``--handshakes-per-turn``)."""

MAX_PENDING_HANDSHAKES = 1024
"""Default connections that may wait for their handshake (``--max-pending-handshakes``)."""

PENDING_WAIT_MAX = 3.0
"""Seconds a connection may wait for its handshake to start before it is refused.

Tailscale clients give up on a relay after a few seconds; past this, the
handshake would most likely be done for a client that has already left.
"""

ACCEPT_ERROR_PAUSE = 0.1
"""Seconds accepting pauses after the process ran out of descriptors or memory."""

SHED_LOG_INTERVAL = 10.0
"""Seconds between log lines summing up refused connections (one per connection would flood)."""

_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    """How much handshake work one event-loop turn may take, and how long connections may wait for it."""

    handshakes_per_turn: int = HANDSHAKES_PER_TURN
    max_pending: int = MAX_PENDING_HANDSHAKES
    max_wait: float = PENDING_WAIT_MAX

    def __post_init__(self) -> None:
        if self.handshakes_per_turn < 1 or self.max_pending < 0 or self.max_wait <= 0:
            raise ValueError(
                "handshakes per turn must be at least 1, pending handshakes at least 0, "
                f"the wait positive; got {self.handshakes_per_turn}, {self.max_pending}, {self.max_wait}"
            )


class RelayListener:
    """Accepts on listening sockets and hands connections to asyncio, a bounded batch per turn."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        stats: RelayStats,
        limits: HandshakeLimits,
        accept_limit: TokenBucket | None = None,
    ) -> None:
        self.sockets = sockets
        self._factory = protocol_factory
        self._stats = stats
        self._limits = limits
        self._accept_limit = accept_limit
        self._loop = asyncio.get_running_loop()
        self._pending: deque[tuple[socket.socket, float]] = deque()
        """Accepted connections, oldest first, with when they were accepted."""
        self._silent: dict[int, tuple[socket.socket, float, asyncio.TimerHandle]] = {}
        """Accepted connections whose client has not spoken yet, by descriptor, with their deadline."""
        self._pump_handle: asyncio.Handle | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._shed_since_log: Counter[ShedReason] = Counter()
        self._shed_log_at = 0.0
        self._closed = False
        self._family = sockets[0].family
        for sock in sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    # --- accepting -----------------------------------------------------------------

    def _accept(self, listening: socket.socket) -> None:
        stats = self._stats
        limit = self._accept_limit
        now = self._loop.time()
        family, kind = self._family, socket.SOCK_STREAM
        for _ in range(ACCEPT_BATCH):
            try:
                # The bare descriptor: socket.accept() builds a socket object (two enum
                # look-ups), half the cost of a refusal, for a connection we may only close.
                fd, _ = listening._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    self._pause_accepting(listening, exc)
                    break
                continue  # the client left before we took it (ECONNABORTED): take the next
            if limit is not None and not limit.try_take(1, now):
                stats.connections_closed["accept_rate_limited"] += 1
                os.close(fd)
                continue
            stats.tcp_accepts += 1
            if len(self._pending) + len(self._silent) >= self._limits.max_pending:
                os.close(fd)
                self._count_shed(ShedReason.QUEUE_FULL)
                continue
            self._pending.append((socket.socket(family, kind, 0, fd), now))
        self._note_pending()
        if self._pending and self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _pause_accepting(self, listening: socket.socket, exc: OSError) -> None:
        """Out of descriptors or memory: a readable listener would spin, so stop listening a moment."""
        log.warning(
            "cannot accept connections for now: %s; retrying in %gs", exc.strerror, ACCEPT_ERROR_PAUSE
        )
        self._loop.remove_reader(listening.fileno())
        self._loop.call_later(ACCEPT_ERROR_PAUSE, self._resume_accepting, listening)

    def _resume_accepting(self, listening: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    # --- handshakes ------------------------------------------------------------------

    def _pump(self) -> None:
        """Start this turn's handshakes, oldest waiting first; come back next turn if more wait.

        Only a connection whose first bytes (the TLS ClientHello) are here is
        started, so that its costly first handshake step falls into the very
        next turn: handshakes started earlier whose clients were slow to
        speak cannot all land in one turn.  A silent one waits for its bytes
        aside, off the queue.
        """
        self._pump_handle = None
        pending = self._pending
        oldest_allowed = self._loop.time() - self._limits.max_wait
        started = 0
        while pending and started < self._limits.handshakes_per_turn:
            sock, accepted_at = pending.popleft()
            if accepted_at < oldest_allowed:
                self._shed(sock, ShedReason.WAITED_TOO_LONG)
                continue
            try:
                first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._await_first_bytes(sock, accepted_at)
                continue
            except OSError:
                first = b""
            if not first:  # the client hung up (or reset) before saying anything
                self._stats.connections_closed["client_left"] += 1
                sock.close()
                continue
            task = self._loop.create_task(self._handshake(sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            started += 1
        self._note_pending()
        if pending:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _note_pending(self) -> None:
        self._stats.handshakes_pending = len(self._pending) + len(self._silent)

    def _await_first_bytes(self, sock: socket.socket, accepted_at: float) -> None:
        fd = sock.fileno()
        deadline = self._loop.call_at(accepted_at + self._limits.max_wait, self._silent_too_long, fd)
        self._silent[fd] = (sock, accepted_at, deadline)
        self._loop.add_reader(fd, self._first_bytes_arrived, fd)

    def _stop_awaiting(self, fd: int) -> tuple[socket.socket, float]:
        sock, accepted_at, deadline = self._silent.pop(fd)
        self._loop.remove_reader(fd)
        deadline.cancel()
        return sock, accepted_at

    def _first_bytes_arrived(self, fd: int) -> None:
        self._pending.appendleft(self._stop_awaiting(fd))  # it has waited its turn already
        if self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _silent_too_long(self, fd: int) -> None:
        sock, _ = self._stop_awaiting(fd)
        self._shed(sock, ShedReason.WAITED_TOO_LONG)
        self._note_pending()

    async def _handshake(self, sock: socket.socket) -> None:
        """Hand the connection to asyncio and the protocol, which does the TLS handshake (tlsstream)."""
        try:
            await self._loop.connect_accepted_socket(self._factory, sock)
        except OSError as exc:  # gone before asyncio could take it
            self._stats.connections_closed["tls_handshake_failed"] += 1
            log.debug("connection lost before it could be served: %s", exc)

    def _shed(self, sock: socket.socket, reason: ShedReason) -> None:
        sock.close()
        self._count_shed(reason)

    def _count_shed(self, reason: ShedReason) -> None:
        self._stats.handshakes_shed[reason] += 1
        self._shed_since_log[reason] += 1
        now = self._loop.time()
        if now - self._shed_log_at >= SHED_LOG_INTERVAL:
            waited = self._shed_since_log[ShedReason.WAITED_TOO_LONG]
            log.warning(
                "refused %d new connections before their TLS handshake: %d because %d already waited "
                "(--max-pending-handshakes), %d because they waited over %gs",
                sum(self._shed_since_log.values()),
                self._shed_since_log[ShedReason.QUEUE_FULL],
                self._limits.max_pending,
                waited,
                self._limits.max_wait,
            )
            self._shed_since_log.clear()
            self._shed_log_at = now

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting; refuse the connections still waiting, abandon handshakes under way."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        while self._pending:
            self._pending.popleft()[0].close()
        for fd in list(self._silent):
            self._stop_awaiting(fd)[0].close()
        self._note_pending()
        for task in self._handshakes:
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._handshakes, return_exceptions=True)


def bind_sockets(host: str, port: int, kind: socket.SocketKind, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one port of ``host`` (SO_REUSEPORT if several); port 0 picks one for all.

    An empty host listens on IPv6 and IPv4 alike (or IPv4 alone, where there
    is no IPv6).  Stream sockets are listening when this returns.
    """
    if host:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)[0]
        candidates = [(family, address)]
    else:
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    error: OSError | None = None
    for family, address in candidates:
        group: list[socket.socket] = []
        try:
            group.append(_bind_one(family, kind, address, dual_stack=not host, reuse_port=count > 1))
            same_port = (address[0], group[0].getsockname()[1], *address[2:])  # port 0 chose one
            while len(group) < count:
                group.append(_bind_one(family, kind, same_port, dual_stack=not host, reuse_port=True))
            return group
        except OSError as exc:
            error = exc
            for sock in group:
                sock.close()
    assert error is not None
    raise error


def _bind_one(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    address: tuple[object, ...],
    *,
    dual_stack: bool,
    reuse_port: bool,
) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)  # before a fork: no connection is refused meanwhile
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
