"""One open session per server, shared by concurrent commands, closed when idle.

This is where per-server connection reuse lives (an SSH connection with many channels,
one multiplexed agent link), so transports do not each reinvent it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .errors import REACHING, ServerOffline, mapped_errors
from .records import Server
from .transport import Credential, Session, Transport

log = logging.getLogger("fleetbus.sessions")

CredentialLookup = Callable[[str], Awaitable[Credential]]


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: Session | None = None
    server: Server | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)


def _current(entry: _Entry, server: Server) -> bool:
    """Whether the entry's session is alive and opened for this definition of the server."""
    return (entry.session is not None and entry.session.alive
            and (entry.server is server or entry.server == server))


class SessionPool:
    def __init__(self, transport: Transport, credentials: CredentialLookup,
                 open_timeout_s: float = 60.0) -> None:
        self.transport = transport
        self.credentials = credentials
        self.open_timeout_s = open_timeout_s
        self.entries: dict[str, _Entry] = {}
        # The same entries, least recently released first: close_idle looks only at the
        # front (the ones idle long enough) instead of every session on every tick.
        self._by_use: OrderedDict[str, _Entry] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        # Sessions replaced while commands still used them: closed when the last one ends.
        self._users: dict[int, int] = {}
        self._retired: dict[int, Session] = {}

    def use(self, server: Server) -> _Use:
        """``async with pool.use(server) as session``: the server's open session (opened
        or replaced first if needed), counted as in use until the block ends."""
        return _Use(self, server)

    async def _acquire(self, server: Server) -> tuple[_Entry, Session]:
        entry = self.entries.get(server.name)
        if entry is None:
            entry = self.entries[server.name] = self._by_use[server.name] = _Entry()
        # The common case, a live session for the same definition and nobody opening
        # one, needs neither the lock nor an event-loop step.
        if entry.lock.locked() or not _current(entry, server):
            async with entry.lock:
                old = entry.session
                if old is not None and not _current(entry, server):
                    # Commands still using the old session keep it; it closes after the last one.
                    if self._users.get(id(old), 0) > 0:
                        self._retired[id(old)] = old
                    else:
                        self._close_later(old)
                    entry.session = None
                if entry.session is None:
                    entry.session = await self._open(server)
                    entry.server = server
        session = entry.session
        assert session is not None
        entry.in_use += 1
        self._users[id(session)] = self._users.get(id(session), 0) + 1
        return entry, session

    def _release(self, entry: _Entry, session: Session, name: str) -> None:
        entry.in_use -= 1
        entry.last_used = time.monotonic()
        if self._by_use.get(name) is entry:
            self._by_use.move_to_end(name)
        left = self._users[id(session)] - 1
        if left:
            self._users[id(session)] = left
        else:
            del self._users[id(session)]
            retired = self._retired.pop(id(session), None)
            if retired is not None:
                self._close_later(retired)

    async def _open(self, server: Server) -> Session:
        """Open a session; failures are marked ``before_start``: no command reached the server."""
        with mapped_errors(REACHING, f"cannot reach {server.name} over {self.transport.name}",
                           before_start=True):
            credential = await self.credentials(server.credential) if server.credential else None
            try:
                return await asyncio.wait_for(self.transport.open(server, credential), self.open_timeout_s)
            except TimeoutError:
                raise ServerOffline(f"opening a {self.transport.name} session to {server.name} "
                                    f"took longer than {self.open_timeout_s:g} s") from None

    def _close_later(self, session: Session) -> None:
        task = asyncio.create_task(self._close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(session: Session) -> None:
        try:
            await asyncio.wait_for(session.close(), timeout=10)
        except Exception as exc:
            log.warning("closing a session failed: %s", type(exc).__name__)

    async def drop(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        self._by_use.pop(name, None)
        if entry is not None and entry.session is not None:
            await self._close(entry.session)

    async def close_idle(self, idle_s: float) -> None:
        """Close sessions unused for more than ``idle_s`` and forget their entries.

        Walks the entries least recently released first and stops at the first one used
        within ``idle_s``, so a tick costs the expired entries, not every server (15,000
        agents on a gateway). An entry in use or being opened goes to the back: its
        release puts it there anyway, with a fresh time.
        """
        now = time.monotonic()
        order = self._by_use
        for _ in range(len(order)):
            if not order:
                break
            name, entry = next(iter(order.items()))
            if now - entry.last_used <= idle_s:
                break
            if entry.in_use or entry.lock.locked():
                order.move_to_end(name)
                continue
            del order[name]
            if self.entries.get(name) is entry:
                del self.entries[name]
            if entry.session is not None:
                session, entry.session = entry.session, None
                await self._close(session)

    async def close_all(self) -> None:
        for name in list(self.entries):
            await self.drop(name)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Use:
    """What :meth:`SessionPool.use` returns: a plain class rather than an
    ``@asynccontextmanager`` generator, which costs a generator and two extra frames on
    every command."""

    __slots__ = ("_entry", "_pool", "_server", "_session")

    def __init__(self, pool: SessionPool, server: Server) -> None:
        self._pool = pool
        self._server = server
        self._entry: _Entry | None = None
        self._session: Session | None = None

    async def __aenter__(self) -> Session:
        self._entry, self._session = await self._pool._acquire(self._server)
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._entry is not None and self._session is not None:
            self._pool._release(self._entry, self._session, self._server.name)
