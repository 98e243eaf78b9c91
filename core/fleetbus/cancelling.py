"""Stopping background tasks for sure.

On Python 3.11, ``asyncio.wait_for`` (used throughout nats-py: requests, KV calls,
watches) swallows a cancellation that arrives just as the awaited thing finishes
(CPython gh-86296, fixed in 3.12). A loop task cancelled at that moment carries on as if
nothing happened, and whoever awaited it after ``cancel()`` waits forever: a core
stopping hung that way about once in fifty starts. :func:`cancel_and_wait` cancels again
until the tasks are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

#: How long to wait for cancelled tasks before cancelling those still running again.
RECANCEL_AFTER_S = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None]) -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until every one has ended,
    cancelling again any that swallowed the cancellation. Their results and exceptions
    are discarded."""
    owned = [t for t in tasks if t is not None]
    while pending := [t for t in owned if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=RECANCEL_AFTER_S)
    await asyncio.gather(*owned, return_exceptions=True)
