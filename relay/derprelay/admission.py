"""Client admission through an HTTP endpoint (derper's ``--verify-client-url``).

Before a non-mesh client is registered, the relay POSTs
``{"NodePublic": "nodekey:…", "Source": "<client ip>"}`` (Tailscale's
``tailcfg.DERPAdmitClientRequest``) and expects ``{"Allow": true}``.  Headscale
serves this at ``/verify``.  A non-200 answer or ``Allow: false`` refuses the
client; an unreachable endpoint refuses it too unless the relay fails open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

from .keys import public_key_text, short_key
from .server import Admission, AdmissionDeniedError

log = logging.getLogger("derprelay.admission")

ADMISSION_TIMEOUT = 5.0
"""Seconds to wait for the admission endpoint (derper uses the same)."""

MAX_RESPONSE = 4 << 10
"""We read at most this much of the answer; ``{"Allow":true}`` is 14 bytes."""


class _UnreachableError(Exception):
    """The admission endpoint could not be asked at all."""


def _ask(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=ADMISSION_TIMEOUT) as answer:
            return answer.status, answer.read(MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise _UnreachableError(str(getattr(exc, "reason", exc))) from None


def url_admission(url: str, *, fail_open: bool) -> Admission:
    """An :data:`Admission` check that asks ``url`` about each client."""

    async def admit(key: bytes, source: str) -> None:
        body = json.dumps({"NodePublic": public_key_text(key), "Source": source}).encode()
        try:
            status, answer = await asyncio.to_thread(_ask, url, body)
        except _UnreachableError as exc:
            if fail_open:
                log.warning("admission endpoint unreachable (%s); failing open for %s", exc, short_key(key))
                return
            raise AdmissionDeniedError(f"admission endpoint unreachable: {exc}") from None
        if status != 200:
            raise AdmissionDeniedError(f"admission endpoint answered HTTP {status}")
        try:
            allowed = json.loads(answer).get("Allow") is True
        except (ValueError, AttributeError):
            raise AdmissionDeniedError(f"admission endpoint answered {answer[:60]!r}, not JSON") from None
        if not allowed:
            raise AdmissionDeniedError(f"admission endpoint refused {public_key_text(key)} from {source}")

    return admit
