"""Give the C heap's free memory back to the kernel after many connections close.

glibc's malloc returns memory to the kernel only from the top of its heap:
one live allocation made late (a log record, a counter's new key) pins
every free page below it, so a relay that served a burst of clients keeps
their TLS state's pages resident long after they left, and RSS ratchets up
from one burst to the next.  ``malloc_trim(0)`` releases free pages
anywhere in the heap.  It walks the heap, so it runs only when the number
of open connections has halved since the last trim and at least
:data:`TRIM_AFTER_CLOSES` connections have closed, or the last one has: a
few times per burst, never per connection of a busy relay.  Other C libraries (musl) have no ``malloc_trim``;
there this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("derprelay.heaptrim")

TRIM_AFTER_CLOSES = 64
"""Connections that must have closed since the last trim before the next one."""


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


class HeapTrimmer:
    """Counts a process's open connections and trims the heap when many have closed."""

    __slots__ = ("_open", "_peak", "_scheduled", "trims")

    def __init__(self) -> None:
        self._open = 0
        self._peak = 0
        self._scheduled = False
        self.trims = 0

    def opened(self) -> None:
        self._open += 1
        self._peak = max(self._peak, self._open)

    def closed(self) -> None:
        self._open -= 1
        closed = self._peak - self._open
        many = closed >= TRIM_AFTER_CLOSES and self._open <= self._peak // 2
        if (many or self._open == 0) and not self._scheduled:
            self._scheduled = True
            # After this turn: the connection's own objects are freed when its callbacks return.
            asyncio.get_running_loop().call_soon(self._trim)

    def _trim(self) -> None:
        self._scheduled = False
        self._peak = self._open
        if _malloc_trim is not None:
            _malloc_trim(0)
            self.trims += 1
