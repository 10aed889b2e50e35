"""A ``--certmode manual`` certificate replaced on disk is served without a restart.

derper reads its manual certificate once, so a renewed one needs a restart
(tailscale#10800); cert-manager renews every 60 days or so, and a restart
drops every client.  Here new TLS connections get the new pair and
established ones (clients, mesh links) keep theirs and stay up.

**Noticing a new pair: polling.**  Every ``--cert-reload-interval`` seconds
:class:`CertFileWatch` stats both files, following symlinks; only when one's
identity (device, inode, size, mtime, ctime) moved are they read, and only
when their bytes differ from the pair served are they checked and taken.
Not inotify, because of how the kubelet updates a Secret volume: it writes
the new files into a fresh timestamped directory and renames a ``..data``
symlink over the old one, so ``tls.crt`` (a symlink into ``..data``) never
changes itself: a watch on it sees nothing, and a watch on its old target
sees a deletion and must be re-armed on a path that may be mid-swap.  A
``stat`` of the path follows whatever the symlinks point to now and works
alike for a rename over the file, an in-place rewrite, a hostPath or a
ConfigMap; two calls every few seconds cost nothing, and the kubelet itself
takes up to a minute or so to update a volume.  The two files are stat'ed
again after reading: a pair read across a swap (old certificate, new key) is
dropped and read again on the next poll, not reported as a mismatch.

**Serving it: a context per pair.**  The listener's SSL context stays the
one the relay started with; its SNI callback, which OpenSSL calls for every
ClientHello (with or without a server name), moves each handshake onto the
context of the current pair.  Not ``load_cert_chain`` into the listener's
context: a context keeps one certificate per key type, so an RSA pair loaded
over an ECDSA one would leave the ECDSA certificate served (tried: it is).
Every context carries the meta certificate after the chain, as at start.

**Refusing a bad pair.**  A pair that does not parse (a half-written file),
whose key is not the certificate's, that is expired or not yet valid, that
OpenSSL refuses, or that no longer names ``--hostname`` while the served one
does, is not taken: the relay keeps what it serves, logs one error per
distinct bad content (not one per poll) and counts it.  The next good pair
is taken; a not-yet-valid one is looked at again every poll and taken once
its time comes.  (Only a served certificate that names ``--hostname``
commits a replacement to it: the operator passes the in-cluster mesh name as
``--hostname`` while a user's certificate names the public hosts.)

**With ``--workers N``** each worker watches the files on its own.  Each must
build its own context anyway (an SSL context cannot be handed to a running
process), the parent is a plain signal loop with no channel to its workers
but two pipes, and N pairs of ``stat`` calls are nothing; all workers read
the same files, so all serve the new pair within one interval of each other.
Their metrics are combined by taking one worker's figure, not the sum
(``derprelay.metricsum``): each worker counts the same rotation once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import certs
from .metrics import Family, MetricType

log = logging.getLogger("derprelay.certs")

RELOAD_INTERVAL = 5.0
"""Seconds between looks at the files: quick next to the kubelet's own delay, and two stat calls."""

RELOADED = "reloaded"
RESULTS = (RELOADED, *certs.CertProblem)
"""The ``result`` label of the reload counter: taken, or why not."""


class ServedCertificate:
    """The pair new TLS connections get, and the listener context that hands it out."""

    def __init__(self, material: certs.CertMaterial, extra_chain_pem: bytes) -> None:
        self._extra_chain_pem = extra_chain_pem
        self.material = material
        self.leaf = material.leaf
        self.listener_context = certs.server_ssl_context(material, extra_chain_pem)
        self.listener_context.sni_callback = self._choose_context
        self._current = self.listener_context
        self.results: Counter[str] = Counter()
        """New pairs seen on disk, by what became of them (:data:`RESULTS`)."""

    def _choose_context(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if self._current is not context:
            ssl_object.context = self._current

    def replace(self, material: certs.CertMaterial) -> None:
        """Serve ``material`` to new connections; :class:`certs.CertError` if OpenSSL refuses it."""
        self._current = certs.server_ssl_context(material, self._extra_chain_pem)
        self.material = material
        self.leaf = material.leaf


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What changes when a file is replaced or rewritten: cheap to read, compared every poll."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = os.stat(path)  # follows symlinks: the kubelet's ..data swap shows as a new inode
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CertFileWatch:
    """Polls a certificate and key file pair and puts each good new pair into service."""

    def __init__(self, served: ServedCertificate, cert_path: Path, key_path: Path, hostname: str) -> None:
        self.served = served
        self.cert_path = cert_path
        self.key_path = key_path
        self.hostname = hostname
        self._seen: tuple[FileIdentity, FileIdentity] | None = None
        """The files at the last consistent read; None: read them on the first poll (they may have
        changed since the relay loaded them at start)."""
        self._refused: tuple[bytes, ...] | None = None
        """The last bad state, already logged and counted: the content, or the error reading it."""
        self._waiting: certs.CertMaterial | None = None
        """A pair refused only for being not yet valid: checked again every poll."""

    def _identities_or_none(self) -> tuple[FileIdentity, FileIdentity] | None:
        try:
            return FileIdentity.of(self.cert_path), FileIdentity.of(self.key_path)
        except OSError:
            return None

    def _read_if_changed(self) -> certs.CertMaterial | None:
        """The files' pair if either file changed since the last consistent read, else None."""
        try:
            before = FileIdentity.of(self.cert_path), FileIdentity.of(self.key_path)
            if before == self._seen:
                return None
            material = certs.CertMaterial(self.cert_path.read_bytes(), self.key_path.read_bytes())
        except OSError as exc:
            raise certs.CertError(f"{exc.filename}: {exc.strerror}", certs.CertProblem.UNREADABLE) from None
        if self._identities_or_none() != before:
            return None  # replaced while we read: the next poll reads a settled pair
        self._seen = before
        return material

    def check(self, now: datetime.datetime) -> None:
        """One poll: take a new good pair, or log and count a new bad state once."""
        try:
            material = self._read_if_changed() or self._waiting
        except certs.CertError as exc:
            self._refuse((str(exc).encode(),), exc)
            return
        if material is None:
            return
        if material == self.served.material:
            self._refused = self._waiting = None  # back to what is served (or a rewrite of the same bytes)
            return
        try:
            self._check(material, now)
            old = self.served.leaf
            self.served.replace(material)
        except certs.CertError as exc:
            self._waiting = material if exc.problem is certs.CertProblem.NOT_YET_VALID else None
            self._refuse((material.cert_pem, material.key_pem), exc)
            return
        self._refused = self._waiting = None
        self.served.results[RELOADED] += 1
        log.info(
            "TLS certificate reloaded from %s: %s -> %s",
            self.cert_path,
            certs.describe(old),
            certs.describe(self.served.leaf),
        )

    def _check(self, material: certs.CertMaterial, now: datetime.datetime) -> None:
        certs.check_pair(material, self.cert_path, self.key_path)
        leaf = material.leaf
        certs.check_valid_at(leaf, now, self.cert_path)
        try:
            names_host = certs.names_host(leaf, self.hostname)
        except ValueError as exc:  # cryptography parses extensions only when asked
            raise certs.CertError(f"{self.cert_path}: bad extensions ({exc})") from None
        if certs.names_host(self.served.leaf, self.hostname) and not names_host:
            raise certs.CertError(
                f"{self.cert_path}: does not name {self.hostname} (--hostname), which the served one does",
                certs.CertProblem.WRONG_NAME,
            )

    def _refuse(self, state: tuple[bytes, ...], error: certs.CertError) -> None:
        if state == self._refused:
            return
        self._refused = state
        self.served.results[error.problem] += 1
        log.error(
            "TLS certificate not reloaded (%s): %s; still serving %s",
            error.problem,
            error,
            certs.describe(self.served.leaf),
        )

    async def follow(self, interval: float) -> None:
        """Poll every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.check(datetime.datetime.now(datetime.UTC))


def cert_families(served: ServedCertificate) -> list[Family]:
    """The served certificate's expiry and serial, and what became of new pairs on disk."""
    leaf = served.leaf
    return [
        Family(
            "derp_tls_cert_reloads",
            MetricType.COUNTER,
            "Changed certificate files seen (--certmode manual), by result: reloaded, or why they were refused",
            ("result",),
            tuple(((result,), served.results[result]) for result in RESULTS),
        ),
        Family(
            "derp_tls_cert_not_after_unix_time",
            MetricType.GAUGE,
            "When the certificate new connections get expires, Unix seconds",
            (),
            (((), int(leaf.not_valid_after_utc.timestamp())),),
        ),
        Family(
            "derp_tls_cert_info",
            MetricType.GAUGE,
            "The certificate new connections get: 1, labelled by its serial number (hex)",
            ("serial",),
            (((f"{leaf.serial_number:x}",), 1),),
        ),
    ]
