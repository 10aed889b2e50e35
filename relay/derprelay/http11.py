"""Sans-I/O HTTP/1.1: the request head a relay reads and the responses it writes.

The relay speaks just enough HTTP to route one request per connection: the
DERP/WebSocket upgrade on ``/derp``, and a handful of small GET endpoints
answered with ``Connection: close``.  There are no request bodies to read, so
parsing stops at the blank line that ends the head; what follows it (DERP
frames from a fast-start client) belongs to the next layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of request line plus headers we buffer before answering 431."""

MAX_HEADERS = 100
"""A real client sends a dozen; more is an attack or a bug."""

_HEAD_END = b"\r\n\r\n"
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpError(Exception):
    """The request cannot be served; ``status`` is what we answer before closing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head. Header names are lower-case; repeats are comma-joined."""

    method: str
    target: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    def header_has_token(self, name: str, token: str) -> bool:
        """Whether a comma-separated header (Connection, Upgrade, ...) lists ``token``."""
        wanted = token.lower()
        return any(part.strip().lower() == wanted for part in self.header(name).split(","))


def parse_request_head(data: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse a request head from the start of ``data``.

    Returns the request and the number of bytes it took, or None when more
    bytes are needed.  Raises :class:`HttpError` for anything that is not a
    well-formed HTTP/1.x request head.
    """
    if data and data[0] not in _TOKEN_CHARS:
        # Fail fast on TLS to a plain port, or binary junk: no need to wait for a head.
        raise HttpError(400, f"not an HTTP request (starts with byte 0x{data[0]:02x})")
    end = data.find(_HEAD_END)
    if end < 0:
        if len(data) > MAX_REQUEST_HEAD:
            raise HttpError(431, f"request head is over {MAX_REQUEST_HEAD} bytes")
        return None
    if end > MAX_REQUEST_HEAD:
        raise HttpError(431, f"request head is over {MAX_REQUEST_HEAD} bytes")
    try:
        text = bytes(data[:end]).decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "request head is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"bad request line {lines[0][:80]!r}")
    method, target, _version = parts
    if not method or not all(ord(c) in _TOKEN_CHARS for c in method):
        raise HttpError(400, f"bad method {method[:20]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not all(ord(c) in _TOKEN_CHARS for c in name):
            raise HttpError(400, f"bad header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path = unquote(urlsplit(target).path) if target.startswith("/") else ""
    if not path:
        raise HttpError(400, f"request target must be an absolute path, got {target[:80]!r}")
    return Request(method, target, path, headers), end + len(_HEAD_END)


def response(
    status: int,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    head_only: bool = False,
    close: bool = True,
) -> bytes:
    """Serialize a response; ``head_only`` omits the body (HEAD requests)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    for name, value in headers or ():
        lines.append(f"{name}: {value}")
    if status not in (101, 204):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
