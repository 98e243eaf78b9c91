"""Which servers came online, for a job that waits for offline ones (``wait_online_s``).

The signal is a watch on the status bucket, not the ``events.servers.<name>.online``
events: whoever starts serving a server (the outbound gateway when its agent connects,
the plugin host for the others) writes ``online`` there *after* it subscribes to the
server's subject, and a KV watch delivers every write in order, once, to a watcher
that was not even connected when it happened (it resumes from the bucket). The events
are fire-and-forget: one published while the core reconnects is lost, and only the
health checker publishes them, on its own schedule.

A stale ``online`` (a gateway that died without writing ``offline``) must not make the
job retry a server over and over: :meth:`OnlineWatch.since` only counts an ``online``
written after a given point (:meth:`OnlineWatch.mark`), taken before the request that
found the server offline was sent. A server that came online between that request and
its answer is therefore retried at once, not missed. A retry that still finds no
responder waits for the next ``online`` write (a gateway rewrites the status of each
server it serves every few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from .records import ServerStatus

log = logging.getLogger("fleetbus.jobs")

# How long to wait for the bucket's current entries before a job starts.
READY_TIMEOUT_S = 10.0


class OnlineWatch:
    """The revision of the latest ``online`` status write of each of ``servers`` seen so
    far. ``start``/``aclose`` in that order; :attr:`changed` is set on every new
    ``online`` of one of them (gateways rewrite the status of every server they serve
    now and then: the rest of the fleet must not wake the job)."""

    def __init__(self, status: KeyValue, servers: set[str]) -> None:
        self.status = status
        self.servers = servers
        self.changed = asyncio.Event()
        self._online: dict[str, int] = {}  # server -> revision of its latest online write
        self._revision = 0  # the highest revision seen, of any key
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Watch the bucket; return once its current entries are read (so :meth:`mark`
        is meaningful before the first request is sent)."""
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._watch(ready), name="job status watch")
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, self._task}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done():
            self._task.result()  # the watch could not start: raise why

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def mark(self) -> int:
        """A point to compare with later: the highest revision seen now."""
        return self._revision

    def since(self, server: str, mark: int) -> bool:
        """Whether ``server`` was reported online after ``mark``."""
        return self._online.get(server, 0) > mark

    async def _watch(self, ready: asyncio.Event) -> None:
        watcher = await self.status.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the current entries are all delivered
                    ready.set()
                    continue
                self._revision = max(self._revision, entry.revision or 0)
                if (entry.key in self.servers and entry.operation not in (KV_DEL, KV_PURGE)
                        and entry.value and _online(entry.value)):
                    self._online[entry.key] = entry.revision or 0
                    self.changed.set()
                if entry.delta == 0:
                    ready.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()


def _online(raw: bytes) -> bool:
    try:
        return ServerStatus.model_validate_json(raw).state == "online"
    except ValidationError:
        log.warning("ignoring an unreadable server status while waiting for servers")
        return False


def shown_duration(seconds: float) -> str:
    """``300`` as ``5m``, ``3600`` as ``1h``, ``90`` as ``90s``: as an operator wrote it."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
