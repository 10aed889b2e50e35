"""Stopping asyncio tasks for sure.

On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives
just as the awaitable it wraps finishes (CPython gh-86296, fixed in 3.12):
the task goes on as if never cancelled.  A mesh link's redial loop survived
a shutdown that way and kept its worker alive after the supervisor was gone.
So whoever stops tasks cancels again until they are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

RECANCEL_EVERY = 0.5
"""Seconds between cancellations of a task that ignored the last one."""


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel every task, again while any runs on, and return once all are done."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)
