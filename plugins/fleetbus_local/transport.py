"""The built-in ``local`` transport: the host fleetbus itself runs on.

Commands run and files are written as the user the fleetbus process runs as; a
credential attached to a ``local`` server is never used to change that. POSIX only
(process groups, ``/bin/sh``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import fleetbus
from fleetbus.records import Server
from fleetbus.transport import (
    Credential,
    ExecResult,
    ExecSpec,
    FileStat,
    OutputSink,
    PutSpec,
    RemoteFile,
    ServerFacts,
    Session,
    Transport,
    TransportContext,
)

from .facts import server_facts
from .files import get_file, put_file
from .process import ProcessTimings, run_process

# Names that always mean "this machine", whoever resolves them.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class LocalSession(Session):
    """A session on this host. There is no connection, so it is never stale."""

    def __init__(self, ctx: TransportContext, timings: ProcessTimings) -> None:
        self._ctx = ctx
        self._timings = timings

    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        return await run_process(
            spec,
            output,
            timings=self._timings,
            logger=self._ctx.logger,
            run_blocking=self._ctx.run_blocking,
        )

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        return await put_file(self._ctx, spec, source)

    async def get(self, path: str) -> RemoteFile:
        return await get_file(self._ctx, path)

    async def info(self) -> ServerFacts:
        return server_facts()

    async def ping(self) -> None:
        # This host answers as long as this process runs.
        return None

    async def close(self) -> None:
        return None


class LocalTransport(Transport):
    """Runs commands and moves files on the host this fleetbus process runs on.

    Optional settings (``ctx.settings``), all in seconds: ``term_grace_s``,
    ``exit_grace_s``, ``reap_timeout_s`` and ``timeout_backstop_s``; see
    :class:`fleetbus_local.process.ProcessTimings`.
    """

    name = "local"
    version = fleetbus.__version__
    description = "Run commands and move files on the machine fleetbus runs on, as its own user."
    serves_registered = True

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self.timings = ProcessTimings.from_settings(ctx.settings or {})

    def accepts(self, server: Server) -> bool:
        """Serve servers without a host, and those whose host names this machine.

        A ``local`` server registered for another machine is thereby served only by
        the fleetbus worker running on that machine.
        """
        if server.host is None:
            return True
        host = server.host.strip().rstrip(".").lower()
        return host in LOOPBACK_HOSTS or host == socket.gethostname().rstrip(".").lower()

    async def open(self, server: Server, credential: Credential | None) -> Session:
        return LocalSession(self.ctx, self.timings)
