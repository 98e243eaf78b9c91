"""Session channels per connection, kept under the server's ``MaxSessions``.

OpenSSH's sshd allows 10 session channels per connection by default and refuses the
eleventh. Commands beyond that therefore wait here for a channel instead of failing.
One slot is held back for stopping cancelled commands: their channels stay counted by
sshd until the process exits, so if every slot were busy with commands, the ``kill``
that ends one of them could never get a channel.

Idle SFTP clients hold a slot too; when commands are waiting, the SFTP pool is asked
to give idle ones back (see :meth:`ChannelSlots.add_reclaimer`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager


class ChannelSlots:
    def __init__(self, total: int) -> None:
        if total < 2:
            raise ValueError("a connection needs at least 2 session channels")
        self.total = total
        self._commands = asyncio.Semaphore(total - 1)
        self._control = asyncio.Lock()
        self._reclaimers: list[Callable[[], Awaitable[None]]] = []

    def add_reclaimer(self, reclaim: Callable[[], Awaitable[None]]) -> None:
        """``reclaim()`` releases slots held by idle channels (e.g. pooled SFTP clients)."""
        self._reclaimers.append(reclaim)

    async def acquire(self) -> None:
        """Wait for a command slot; call :meth:`release` when its channel is closed."""
        if self._commands.locked():
            for reclaim in self._reclaimers:
                await reclaim()
        await self._commands.acquire()

    def release(self) -> None:
        self._commands.release()

    @asynccontextmanager
    async def command(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    @asynccontextmanager
    async def control(self) -> AsyncIterator[None]:
        """The reserved slot, for the short channels that stop cancelled commands."""
        async with self._control:
            yield
