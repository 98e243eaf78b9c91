"""Running blocking calls (file I/O, /proc scans) off the event loop.

Every operation that blocks takes a ``run_blocking`` callable. Inside fleetbus that is
the plugin host's bounded pool (``TransportContext.run_blocking``); the agent, which has
no such host, uses :func:`default_run_blocking`, a small pool owned by this package.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TypeVar

T = TypeVar("T")

RunBlocking = Callable[..., Awaitable[Any]]
"""``await run_blocking(fn, *args)`` runs ``fn(*args)`` in a worker thread and returns
its result (or raises its exception)."""

DEFAULT_MAX_WORKERS = 4


class ThreadRunner:
    """A :data:`RunBlocking` backed by a bounded thread pool of its own.

    The bound keeps many concurrent transfers from starting a thread each; they queue
    for a worker instead. No thread starts until the first call.
    """

    def __init__(
        self, max_workers: int = DEFAULT_MAX_WORKERS, thread_name_prefix: str = "fleetbus-ops"
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=thread_name_prefix
        )

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in one of the pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool; calls already queued still run."""
        self._executor.shutdown(wait=wait)


_default: Optional[ThreadRunner] = None
_default_lock = threading.Lock()


def default_run_blocking() -> ThreadRunner:
    """The process-wide :class:`ThreadRunner` used when a caller passes none."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ThreadRunner()
        return _default


def resolve_run_blocking(run_blocking: Optional[RunBlocking]) -> RunBlocking:
    """``run_blocking`` itself, or the default runner when it is None."""
    return run_blocking if run_blocking is not None else default_run_blocking()
