"""Probing a region's relays the way clients use them: STUN, a DERP round trip, and the mesh.

No Kubernetes here: the handlers say which relays exist and where, this
module answers whether each one works, as one :class:`ProbeResult` per
ordinal.  A relay passes when

* its STUN port answers a Binding Request with a mapped address;
* two DERP clients on it (TLS pinned or verified as the DERP map says) pass
  a packet from one to the other, and a ping measures the round trip;
* a packet from a client on it reaches a client on the next healthy relay of
  the ring: its mesh link forwards.  The sending relay owns that failure,
  since forwarding is its job, unless the next relay stopped answering
  meanwhile (see :class:`RegionProbe`).

The probing clients present the region's mesh key when there is one, so
client admission (``--verify-client-url``) does not turn them away.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from derprelay import frames
from derprelay import stun as stun_codec
from derprelay.client import DerpClient, DerpClientError, Endpoint, connect
from derprelay.keys import MeshKey, NodePrivateKey

from .observed import ProbeResult

STEP_TIMEOUT = 5.0
"""Seconds for each step (connect, STUN answer, packet delivery): generous for a loaded node."""
MESH_RESEND_INTERVAL = 0.25
"""A fresh mesh member learns its peers' clients within moments; resend until then."""
PROBE_PACKET_PREFIX = b"derpfleet-probe:"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One relay to probe, addressed as clients would address it."""

    ordinal: int
    name: str
    """DERP node name (900a…), for messages."""
    address: str
    """The IP the DERP map publishes."""
    derp_port: int
    stun_port: int | None
    cert_name: str = ""
    """``sha256-raw:…`` pin, or the hostname to verify the certificate for."""
    other_pins: tuple[str, ...] = ()
    """Pins also passed: the certificate before a rotation, which relays serve until they reload."""

    @property
    def endpoint(self) -> Endpoint:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return Endpoint(
            f"https://{host}:{self.derp_port}/derp", cert_name=self.cert_name, other_pins=self.other_pins
        )


class ProbeError(Exception):
    """One step of a probe failed; the message says which and why, for the status."""


class _StunReply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def probe_stun(address: str, port: int, timeout: float = STEP_TIMEOUT) -> None:
    """One Binding Request; the answer must be a Binding Success for our transaction.

    The mapped address is not compared with ours: NAT between the operator
    and a node (hostPort is DNAT) may rightly rewrite where we come from.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _StunReply, remote_addr=(address, port), family=family
    )
    try:
        txid = stun_codec.new_txid()
        transport.sendto(stun_codec.binding_request(txid))
        try:
            datagram = await asyncio.wait_for(protocol.answer, timeout)
        except TimeoutError:
            raise ProbeError(f"STUN {address}:{port}: no answer within {timeout:.0f}s") from None
        except OSError as exc:
            raise ProbeError(f"STUN {address}:{port}: {exc.strerror or exc}") from None
        try:
            answer = stun_codec.parse_binding_response(datagram)
        except stun_codec.StunError as exc:
            raise ProbeError(f"STUN {address}:{port}: bad answer: {exc}") from None
        if answer.txid != txid:
            raise ProbeError(f"STUN {address}:{port}: answered another transaction")
    finally:
        transport.close()


@dataclass(frozen=True, slots=True)
class _ProbeClient:
    """A DERP connection and the public key others address it by."""

    conn: DerpClient
    key: bytes


async def _deliver(sender: _ProbeClient, receiver: _ProbeClient, resend_every: float | None) -> None:
    """Send a marked packet (again every ``resend_every`` s) until the receiver sees it."""
    packet = PROBE_PACKET_PREFIX + os.urandom(16)

    async def send_until_delivered() -> None:
        while True:
            await sender.conn.send(receiver.key, packet)
            if resend_every is None:
                return
            await asyncio.sleep(resend_every)

    async def receive() -> None:
        while (await receiver.conn.recv_packet()).packet != packet:
            pass

    sending = asyncio.create_task(send_until_delivered())
    try:
        await asyncio.wait_for(receive(), STEP_TIMEOUT)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, DerpClientError, ConnectionError):
            await sending


async def _ping_rtt(client: _ProbeClient) -> float:
    """Milliseconds for a Ping to come back as a Pong."""
    data = os.urandom(frames.PING_LEN)
    started = time.perf_counter()
    await client.conn.ping(data)

    async def pong() -> None:
        while True:
            frame = await client.conn.recv()
            if isinstance(frame, frames.Pong) and frame.data == data:
                return

    await asyncio.wait_for(pong(), STEP_TIMEOUT)
    return (time.perf_counter() - started) * 1000


async def _step(what: str, target: ProbeTarget, action: Awaitable[T]) -> T:
    """Run one probe step; every failure becomes a :class:`ProbeError` naming the step."""
    try:
        return await action
    except TimeoutError:
        raise ProbeError(f"{what} on {target.name}: timed out after {STEP_TIMEOUT:.0f}s") from None
    except (DerpClientError, OSError, frames.ProtocolError) as exc:
        raise ProbeError(f"{what} on {target.name}: {exc}") from None


async def _connect(target: ProbeTarget, mesh_key: MeshKey | None) -> _ProbeClient:
    key = NodePrivateKey.generate()
    conn = await connect(target.endpoint, key, mesh_key=mesh_key, is_prober=True, timeout=STEP_TIMEOUT)
    return _ProbeClient(conn, key.public)


@dataclass(slots=True)
class _Session:
    """The two probe clients connected to one relay that passed on its own."""

    target: ProbeTarget
    sender: _ProbeClient
    receiver: _ProbeClient
    rtt_ms: float = 0.0

    async def close(self) -> None:
        await asyncio.gather(self.sender.conn.close(), self.receiver.conn.close(), return_exceptions=True)


async def _open_session(target: ProbeTarget, mesh_key: MeshKey | None) -> _Session:
    """STUN, then two clients, a packet between them and a ping: the relay works on its own."""
    if target.stun_port is not None:
        await probe_stun(target.address, target.stun_port)
    sender = await _step("DERP connect", target, _connect(target, mesh_key))
    try:
        receiver = await _step("DERP connect", target, _connect(target, mesh_key))
    except BaseException:
        await sender.conn.close()
        raise
    session = _Session(target, sender, receiver)
    try:
        await _step("DERP packet", target, _deliver(sender, receiver, None))
        session.rtt_ms = await _step("DERP ping", target, _ping_rtt(sender))
    except BaseException:
        await session.close()
        raise
    return session


async def _probe_mesh(origin: _Session, destination: _Session) -> None:
    await _step(
        f"mesh forwarding to {destination.target.name}",
        origin.target,
        _deliver(origin.sender, destination.receiver, MESH_RESEND_INTERVAL),
    )


async def _still_answers(session: _Session) -> bool:
    """Whether the relay behind a session still answers a ping, after a mesh probe towards it failed."""
    try:
        await _ping_rtt(session.receiver)
    except (TimeoutError, DerpClientError, OSError, frames.ProtocolError):
        return False
    return True


Clock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RegionProbe:
    """One probe round over a region, in its two phases.

    :meth:`open` probes every relay on its own; :meth:`probe_mesh` then sends
    a packet around the ring of those that passed.  A relay can stop between
    the phases (frozen, killed): the packet towards it is lost, yet the fault
    is not its sender's.  So a failed hop is blamed on its sender only when
    the destination still answers a ping; otherwise the destination fails,
    and a healthy relay never leaves the map for its neighbour's death.
    """

    def __init__(self, sessions: list[_Session], clock: Clock) -> None:
        self._sessions = sessions
        self._failed_alone: dict[int, ProbeResult] = {}
        self._mesh_failures: dict[int, str] = {}
        self._clock = clock

    @classmethod
    async def open(
        cls, targets: Sequence[ProbeTarget], mesh_key: MeshKey | None, clock: Clock = _utc_now
    ) -> RegionProbe:
        """Probe every relay alone, concurrently; keep the sessions of those that passed."""
        opened = await asyncio.gather(*(_open_session(t, mesh_key) for t in targets), return_exceptions=True)
        probe = cls([s for s in opened if isinstance(s, _Session)], clock)
        try:
            for target, outcome in zip(targets, opened, strict=True):
                if not isinstance(outcome, _Session):
                    probe._failed_alone[target.ordinal] = ProbeResult(
                        False, clock(), message=str(_expected(outcome))
                    )
        except BaseException:
            await probe.close()
            raise
        return probe

    async def probe_mesh(self) -> None:
        """Each relay that passed alone forwards a packet to the next one of the ring."""
        ring = list(zip(self._sessions, self._sessions[1:] + self._sessions[:1], strict=True))
        if len(ring) < 2:
            return
        outcomes = await asyncio.gather(*(_probe_mesh(a, b) for a, b in ring), return_exceptions=True)
        failed_hops = [
            (a, b, _expected(o)) for (a, b), o in zip(ring, outcomes, strict=True) if o is not None
        ]
        destinations_alive = await asyncio.gather(*(_still_answers(b) for _, b, _ in failed_hops))
        for (origin, destination, error), alive in zip(failed_hops, destinations_alive, strict=True):
            if alive:
                self._mesh_failures.setdefault(origin.target.ordinal, str(error))
            else:
                self._mesh_failures[destination.target.ordinal] = (
                    f"{destination.target.name} stopped answering during the mesh probe ({error})"
                )

    def results(self) -> dict[int, ProbeResult]:
        """The verdict on every target, keyed by ordinal."""
        results = dict(self._failed_alone)
        for session in self._sessions:
            failure = self._mesh_failures.get(session.target.ordinal)
            results[session.target.ordinal] = ProbeResult(
                failure is None, self._clock(), rtt_ms=session.rtt_ms, message=failure or ""
            )
        return results

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._sessions))


async def probe_region(
    targets: Sequence[ProbeTarget],
    mesh_key: MeshKey | None,
    *,
    mesh: bool,
    clock: Clock = _utc_now,
) -> dict[int, ProbeResult]:
    """Probe every relay concurrently, then (with ``mesh``) the ring among those that passed alone."""
    probe = await RegionProbe.open(targets, mesh_key, clock)
    try:
        if mesh:
            await probe.probe_mesh()
        return probe.results()
    finally:
        await probe.close()


def _expected(outcome: BaseException | None) -> ProbeError:
    """A probe step's failure; anything else is a bug in the prober and propagates."""
    if isinstance(outcome, ProbeError):
        return outcome
    if isinstance(outcome, BaseException):
        raise outcome
    raise TypeError("a failed probe step left no exception")
