"""Curve25519 node keys, the mesh pre-shared key, and the NaCl boxes DERP seals.

DERP identifies every client by its WireGuard-style Curve25519 public key and
authenticates the handshake with NaCl ``crypto_box`` (XSalsa20-Poly1305): the
client seals its ClientInfo JSON to the server's public key, the server seals
its ServerInfo JSON back.  A sealed box on the wire is ``nonce || box``, which
is exactly what PyNaCl's ``Box.encrypt`` returns.

Keys travel as raw 32-byte strings inside the relay (cheap dict keys on the hot
path); the text forms below are for config files, logs and status output.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils

KEY_LEN: Final = 32
"""Length of every Curve25519 key and of the mesh key."""

NONCE_LEN: Final = 24
"""Length of the random nonce that prefixes every sealed box."""

PUBLIC_KEY_PREFIX = "nodekey:"
"""Text prefix of a node public key, as Tailscale prints it."""

PRIVATE_KEY_PREFIX = "privkey:"
"""Text prefix of a node private key, as derper stores it in its config file."""


class KeyFormatError(ValueError):
    """A key in text or raw form is malformed."""


class BoxOpenError(ValueError):
    """A sealed box did not authenticate: wrong key, or tampered bytes."""


def _parse_hex(text: str, prefix: str, what: str) -> bytes:
    body = text.strip()
    if prefix and body.startswith(prefix):
        body = body[len(prefix) :]
    try:
        raw = bytes.fromhex(body)
    except ValueError:
        raise KeyFormatError(f"{what} is not hexadecimal: {text!r}") from None
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"{what} must be {KEY_LEN} bytes ({2 * KEY_LEN} hex digits), got {len(raw)}")
    return raw


def public_key_text(raw: bytes) -> str:
    """Return ``nodekey:<hex>``, the form Tailscale logs and APIs use."""
    return PUBLIC_KEY_PREFIX + raw.hex()


def short_key(raw: bytes) -> str:
    """Return a short key for log lines, like Tailscale's ``ShortString``."""
    return "[" + raw.hex()[:5] + "]"


def parse_public_key(text: str) -> bytes:
    """Parse ``nodekey:<hex>`` or bare hex into raw public key bytes."""
    return _parse_hex(text, PUBLIC_KEY_PREFIX, "node public key")


@dataclass(frozen=True, slots=True)
class NodePrivateKey:
    """A node's Curve25519 private key; the relay's identity and a client's."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"private key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls) -> NodePrivateKey:
        return cls(bytes(nacl.public.PrivateKey.generate()))

    @classmethod
    def from_text(cls, text: str) -> NodePrivateKey:
        """Parse ``privkey:<hex>`` (derper's config file form) or bare hex."""
        return cls(_parse_hex(text, PRIVATE_KEY_PREFIX, "node private key"))

    @property
    def text(self) -> str:
        return PRIVATE_KEY_PREFIX + self.raw.hex()

    @property
    def public(self) -> bytes:
        """The raw public key that peers address this node by."""
        return bytes(nacl.public.PrivateKey(self.raw).public_key)

    def box_with(self, peer_public: bytes) -> SharedBox:
        """The NaCl box between this key and ``peer_public``: the key agreement, done once."""
        if len(peer_public) != KEY_LEN:
            raise BoxOpenError(f"peer public key must be {KEY_LEN} bytes, got {len(peer_public)}")
        try:
            shared = nacl.bindings.crypto_box_beforenm(peer_public, self.raw)
        except nacl.exceptions.CryptoError:
            raise BoxOpenError(f"no key agreement with key {short_key(peer_public)}") from None
        return SharedBox(shared, peer_public)

    def seal_to(self, peer_public: bytes, message: bytes) -> bytes:
        """Seal ``message`` to ``peer_public``; returns ``nonce || box``."""
        return self.box_with(peer_public).seal(message)

    def open_from(self, peer_public: bytes, sealed: bytes) -> bytes:
        """Open a ``nonce || box`` that ``peer_public`` sealed to us."""
        return self.box_with(peer_public).open(sealed)


class SharedBox:
    """``crypto_box`` with the Curve25519 key agreement already made.

    Opening ClientInfo and sealing ServerInfo need the same shared key;
    computing it is the costly part (a Curve25519 scalar multiplication), so
    a handshake computes it once and keeps this for both directions.
    """

    __slots__ = ("_peer", "_shared")

    def __init__(self, shared: bytes, peer_public: bytes) -> None:
        self._shared = shared
        self._peer = peer_public

    def seal(self, message: bytes) -> bytes:
        """Seal ``message`` under a fresh random nonce; returns ``nonce || box``."""
        nonce = nacl.utils.random(NONCE_LEN)
        return nonce + nacl.bindings.crypto_box_afternm(message, nonce, self._shared)

    def open(self, sealed: bytes) -> bytes:
        """Open a ``nonce || box`` sealed by the peer."""
        if len(sealed) < NONCE_LEN:
            raise BoxOpenError(f"sealed box of {len(sealed)} bytes is shorter than its nonce")
        try:
            return nacl.bindings.crypto_box_open_afternm(sealed[NONCE_LEN:], sealed[:NONCE_LEN], self._shared)
        except nacl.exceptions.CryptoError:
            raise BoxOpenError(
                f"box of {len(sealed)} bytes does not open with key {short_key(self._peer)}"
            ) from None


@dataclass(frozen=True, slots=True)
class MeshKey:
    """The region's pre-shared mesh key: 32 bytes, written as 64 hex digits.

    Holding it lets a connection watch the relay's clients (WatchConns), close
    them (ClosePeer) and inject packets for them (ForwardPacket).  Compared in
    constant time so a wrong guess leaks nothing through timing.
    """

    raw: bytes

    @classmethod
    def from_text(cls, text: str) -> MeshKey:
        body = text.strip()
        if len(body) != 2 * KEY_LEN:
            raise KeyFormatError(f"mesh key must be {2 * KEY_LEN} hexadecimal digits, got {len(body)}")
        return cls(_parse_hex(body, "", "mesh key"))

    @classmethod
    def generate(cls) -> MeshKey:
        return cls(nacl.utils.random(KEY_LEN))

    @property
    def text(self) -> str:
        return self.raw.hex()

    def matches(self, other_text: str) -> bool:
        """Whether a client's claimed mesh key (hex text) equals this one."""
        try:
            claimed = MeshKey.from_text(other_text)
        except KeyFormatError:
            return False
        return hmac.compare_digest(self.raw, claimed.raw)
