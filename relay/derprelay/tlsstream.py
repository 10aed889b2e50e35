"""Server-side TLS on a plain asyncio transport, with buffers sized for many idle clients.

uvloop's TLS layer gives every connection a 256 KiB receive buffer of its
own, reads plaintext into a fresh 256 KiB object per read, and keeps
OpenSSL's memory BIOs as large as the largest batch ever written: a relay
with ten thousand clients pays for that in resident memory that idle
clients never use, and a client that stops reading makes it grow with
whatever was written last.  This layer keeps per connection only what
OpenSSL itself needs:

- one receive buffer and one plaintext buffer per listener, shared by its
  connections (every callback runs to completion on the one event loop, so
  no two use them at once);
- ciphertext is fed to OpenSSL one read at a time and taken from it in
  slices of :data:`WRITE_SLICE`, so neither memory BIO ever grows past
  64 KiB and a record, whatever the batch;
- flow control is the TCP transport's own: the write buffer it reports,
  pauses and resumes on is all the ciphertext not yet taken by the kernel,
  since nothing waits above it.

:class:`TlsConnection` is the TCP transport's protocol and, once the
handshake is done, the application protocol's transport (one object instead
of two per connection).  Protocol parsing stays in the application protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("derprelay.tls")

RECORD_PLAINTEXT = 16 * 1024
"""The most plaintext one TLS record carries."""

WRITE_SLICE = 64 * 1024
"""Plaintext encrypted and handed to the socket at a time: four records, in one C call."""

RECEIVE_BUFFER_SIZE = 64 * 1024
"""Ciphertext read from the socket per call (shared by the listener's connections)."""

PLAINTEXT_BUFFER_SIZE = RECEIVE_BUFFER_SIZE + RECORD_PLAINTEXT
"""Plaintext gathered per delivery: what one receive decrypts to, and a record more."""

CLOSE_FLUSH_TIMEOUT = 10.0
"""Seconds a closed connection may take to flush what it was sent before it is aborted."""


class TlsBuffers:
    """What one listener's connections share: the receive and plaintext buffers, lent to each in turn,
    and what to call when a connection goes before its handshake is done (to count it)."""

    __slots__ = ("handshake_failed", "plaintext", "plaintext_view", "receive_view")

    def __init__(self, handshake_failed: Callable[[], None] = lambda: None) -> None:
        self.handshake_failed = handshake_failed
        self.receive_view = memoryview(bytearray(RECEIVE_BUFFER_SIZE))
        self.plaintext = bytearray(PLAINTEXT_BUFFER_SIZE)
        self.plaintext_view = memoryview(self.plaintext)


class TlsConnection(asyncio.BufferedProtocol, asyncio.Transport):
    """One TLS server connection: the TCP transport's protocol and the app protocol's transport.

    The app protocol sees ``connection_made`` once the handshake is done,
    then plaintext in ``data_received``; a handshake that fails or takes
    longer than ``handshake_timeout`` aborts the TCP connection without
    bothering the app protocol at all.
    """

    __slots__ = (
        "_app",
        "_app_started",
        "_buffers",
        "_closing",
        "_context",
        "_deadline",
        "_handshake_timeout",
        "_incoming",
        "_outgoing",
        "_reading_paused",
        "_ssl",
        "_tcp",
    )

    def __init__(
        self,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        buffers: TlsBuffers,
        handshake_timeout: float,
    ) -> None:
        self._app = app
        self._context = context
        self._buffers = buffers
        self._handshake_timeout = handshake_timeout
        self._tcp: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._app_started = False
        self._closing = False
        self._reading_paused = False
        self._deadline: asyncio.TimerHandle | None = None

    # --- the TCP transport's protocol ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._deadline = asyncio.get_running_loop().call_later(
            self._handshake_timeout, self._handshake_timed_out
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffers.receive_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        # All of it: the buffer is lent to the next connection once we return.
        self._incoming.write(self._buffers.receive_view[:nbytes])
        if not self._app_started:
            self._handshake()
        elif not self._reading_paused:
            self._decrypt()

    def eof_received(self) -> bool:
        if self._app_started and not self._closing:
            self._app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._ssl = None
        self._tcp = None  # the transport refers to us: no cycle left for the collector to find
        if self._app_started:
            self._app_started = False
            self._app.connection_lost(exc)
        else:  # refused by OpenSSL, timed out, or gone mid-handshake
            self._buffers.handshake_failed()

    def pause_writing(self) -> None:
        if self._app_started:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app_started:
            self._app.resume_writing()

    # --- TLS ----------------------------------------------------------------------

    def _handshake(self) -> None:
        """Advance the handshake; once done, give the app protocol the connection and any data."""
        assert self._ssl is not None and self._tcp is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._send_pending()
            return
        except (ssl.SSLError, ValueError) as exc:
            log.debug("TLS handshake from %s failed: %s", self._tcp.get_extra_info("peername"), exc)
            self._send_pending()  # the alert saying why, if OpenSSL made one
            self._closing = True
            self._close_tcp()
            return
        self._send_pending()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._app_started = True
        self._app.connection_made(self)
        if not self._closing and not self._reading_paused:
            self._decrypt()

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if not self._app_started and self._tcp is not None:
            self._closing = True
            self._tcp.abort()

    def _decrypt(self) -> None:
        """Hand every complete record's plaintext to the app, in as few calls as fit the buffer."""
        sslobj = self._ssl
        assert sslobj is not None
        incoming = self._incoming
        view = self._buffers.plaintext_view
        filled = 0
        ended = False
        try:
            # Read only while there is something to read: each SSLWantReadError costs microseconds.
            while incoming.pending or sslobj.pending():
                if filled > PLAINTEXT_BUFFER_SIZE - RECORD_PLAINTEXT:
                    self._app.data_received(bytes(view[:filled]))
                    filled = 0
                    if self._closing or self._reading_paused:
                        return
                # Into our buffer, this returns a count (typeshed says bytes).
                got = cast(int, sslobj.read(PLAINTEXT_BUFFER_SIZE - filled, view[filled:]))
                if not got:
                    ended = True  # close_notify
                    break
                filled += got
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except ssl.SSLError as exc:
            log.debug("TLS error from %s: %s", self.get_extra_info("peername"), exc)
            if filled:
                self._app.data_received(bytes(view[:filled]))
            self.abort()
            return
        self._send_pending()  # a key update's answer, if one came
        if filled:
            self._app.data_received(bytes(view[:filled]))
        if ended and not self._closing:
            self._app.eof_received()
            self.close()

    def _send_pending(self) -> None:
        data = self._outgoing.read()
        if data and self._tcp is not None:
            self._tcp.write(data)

    # --- the app protocol's transport -------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._ssl is None or self._tcp is None:
            return
        sslobj = self._ssl
        outgoing = self._outgoing
        try:
            if len(data) <= WRITE_SLICE:
                sslobj.write(data)
                self._tcp.write(outgoing.read())
                return
            view = memoryview(data)
            records = []
            for start in range(0, len(view), WRITE_SLICE):
                sslobj.write(view[start : start + WRITE_SLICE])
                records.append(outgoing.read())
        except ssl.SSLError as exc:  # the peer shut TLS down under us
            log.debug("TLS write to %s failed: %s", self.get_extra_info("peername"), exc)
            self.abort()
            return
        self._tcp.writelines(records)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections close with close(), not a half-close")

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tcp.get_write_buffer_limits() if self._tcp is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if not self._reading_paused and self._tcp is not None and not self._closing:
            self._reading_paused = True
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._tcp is not None and not self._closing:
            self._reading_paused = False
            self._tcp.resume_reading()
            if self._incoming.pending or (self._ssl is not None and self._ssl.pending()):
                asyncio.get_running_loop().call_soon(self._decrypt_if_open)

    def _decrypt_if_open(self) -> None:
        if not self._closing and not self._reading_paused and self._ssl is not None:
            self._decrypt()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send close_notify after what was written, then close once the kernel has it all."""
        if self._closing or self._tcp is None:
            return
        self._closing = True
        if self._ssl is not None:
            with contextlib.suppress(ssl.SSLError):  # unwrap waits for the peer's close_notify too
                self._ssl.unwrap()
            self._send_pending()
        self._close_tcp()

    def _close_tcp(self) -> None:
        """Close after the kernel took what is buffered, or abort if a silent peer keeps it from."""
        assert self._tcp is not None
        self._tcp.close()
        if self._tcp.get_write_buffer_size():
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, self._tcp.abort)

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert" and self._ssl is not None:
            return self._ssl.getpeercert()
        if name == "cipher" and self._ssl is not None:
            return self._ssl.cipher()
        return self._tcp.get_extra_info(name, default) if self._tcp is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app


def tls_protocol_factory(
    app_factory: Callable[[], asyncio.Protocol],
    context: ssl.SSLContext,
    handshake_timeout: float,
    handshake_failed: Callable[[], None] = lambda: None,
) -> Callable[[], TlsConnection]:
    """What ``loop.create_server`` needs to serve ``app_factory``'s protocol over TLS."""
    buffers = TlsBuffers(handshake_failed)
    return lambda: TlsConnection(app_factory(), context, buffers, handshake_timeout)
