"""The built-in ``local`` transport: the host fleetbus itself runs on.

Commands run and files are read and written as the user the ``user`` setting names,
else as fleetbus's own user, except that a fleetbus running as root defaults to an
unprivileged user (:mod:`fleetbus_local.users`); a credential attached to a ``local``
server is never used to change that. As another user, exec starts the process already
switched (groups, gid, uid) and put/get open their files through a helper running as
that user (:mod:`fleetbus_local.userfiles`). POSIX only (process groups, ``/bin/sh``).

What exec, put, get and info do is defined once, in :mod:`fleetbus_base.ops`, which
the fleetbus agent runs on remote servers too; this module only adapts it to the
:class:`fleetbus.transport.Transport` interface: fleetbus dataclasses in and out, and
:class:`~fleetbus_base.ops.OpError` raised as the fleetbus error with the same code
(:func:`fleetbus.errors.error_for_code`).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import socket
from collections.abc import AsyncIterator
from typing import Annotated

import fleetbus
from fleetbus.errors import FleetbusError, error_for_code
from fleetbus.records import Server
from fleetbus.transport import (
    Capabilities,
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
    TransportSettings,
)
from fleetbus_base import ops
from fleetbus_base.ops import groupkeeper
from fleetbus_base.ops.runas import RunAs
from pydantic import Field, StrictFloat, StrictInt

from .userfiles import WorkingDirectory, get_file_as, put_file_as
from .users import local_user

# Names that always mean "this machine", whoever resolves them.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def fleetbus_error(exc: ops.OpError) -> FleetbusError:
    """The fleetbus error with the same code and message as ``exc``: the operations run
    in this process, so their ``internal`` is fleetbus's own (errors.error_for_code)."""
    return error_for_code(exc.code, exc.message)


class _Chunks(AsyncIterator[bytes]):
    """The chunks of an ops file, raising fleetbus errors.

    A class rather than an async generator: ``aclose`` must reach the file even before
    the first chunk is read, which an unstarted generator's ``aclose`` would not.
    """

    def __init__(self, chunks: ops.FileChunks) -> None:
        self._chunks = chunks

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except ops.OpError as exc:
            raise fleetbus_error(exc) from exc

    async def aclose(self) -> None:
        await self._chunks.aclose()


class LocalSession(Session):
    """A session on this host. There is no connection, so it is never stale."""

    def __init__(self, ctx: TransportContext, timings: ops.ProcessTimings,
                 run_as: RunAs | None = None) -> None:
        self._ctx = ctx
        self._timings = timings
        self._run_as = run_as

    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        cwd: WorkingDirectory | None = None
        try:
            if self._run_as is not None and spec.cwd is not None:
                cwd = await WorkingDirectory.enter(self._run_as, spec.cwd, self._ctx.run_blocking)
            # The directory as run_as entered it (its /proc/self/fd path), checked as that user.
            run = spec if cwd is None else dataclasses.replace(spec, cwd=cwd.path)
            result = await ops.run_process(
                run,
                output.write,
                timings=self._timings,
                logger=self._ctx.logger,
                run_blocking=self._ctx.run_blocking,
                run_as=self._run_as,
            )
        except ops.OpError as exc:
            raise fleetbus_error(exc) from exc
        finally:
            if cwd is not None:
                cwd.close()
        return result

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        try:
            if self._run_as is None:
                written = await ops.put_file(spec, source, run_blocking=self._ctx.run_blocking,
                                             logger=self._ctx.logger)
            else:
                written = await put_file_as(self._run_as, spec, source, self._ctx.run_blocking)
        except ops.OpError as exc:
            raise fleetbus_error(exc) from exc
        return written

    async def get(self, path: str) -> RemoteFile:
        try:
            if self._run_as is None:
                opened = await ops.get_file(path, run_blocking=self._ctx.run_blocking)
            else:
                opened = await get_file_as(self._run_as, path, self._ctx.run_blocking)
        except ops.OpError as exc:
            raise fleetbus_error(exc) from exc
        return RemoteFile(size=opened.size, mode=opened.mode, chunks=_Chunks(opened.chunks))

    async def info(self) -> ServerFacts:
        facts = ops.server_facts()
        extra = dict(facts.extra)
        if self._run_as is not None:
            # The user commands run as, not the worker's own: what `info` is asked for.
            extra["user"] = self._run_as.name
        return dataclasses.replace(facts, extra=extra)

    async def ping(self) -> None:
        # This host answers as long as this process runs.
        return None

    async def close(self) -> None:
        return None


Seconds = Annotated[StrictFloat | StrictInt, Field(ge=0, allow_inf_nan=False)]


class LocalSettings(TransportSettings):
    """Settings of ``local``: ``user`` (a user name or uid to run as; see
    :mod:`fleetbus_local.users`) and the timings of
    :class:`fleetbus_base.ops.ProcessTimings`, in seconds."""

    user: str | int | None = None
    term_grace_s: Seconds = 2.0
    exit_grace_s: Seconds = 1.0
    reap_timeout_s: Seconds = 5.0
    timeout_backstop_s: Seconds = 5.0

    @property
    def timings(self) -> ops.ProcessTimings:
        return ops.ProcessTimings(term_grace_s=float(self.term_grace_s), exit_grace_s=float(self.exit_grace_s),
                                  reap_timeout_s=float(self.reap_timeout_s),
                                  timeout_backstop_s=float(self.timeout_backstop_s))


class LocalTransport(Transport):
    """Runs commands and moves files on the host this fleetbus process runs on.

    Optional settings (``ctx.settings``): ``user``, a user name or uid to run commands
    and file operations as (see :mod:`fleetbus_local.users` for the default and when
    it is refused); and, in seconds, ``term_grace_s``, ``exit_grace_s``,
    ``reap_timeout_s`` and ``timeout_backstop_s``; see
    :class:`fleetbus_base.ops.ProcessTimings`.
    """

    name = "local"
    version = fleetbus.__version__
    description = ("Run commands and move files on the machine fleetbus runs on, as its own "
                   "user or a configured one (unprivileged by default under root).")
    serves_registered = True
    Settings = LocalSettings
    capabilities = Capabilities()
    settings: LocalSettings

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self.timings = self.settings.timings
        #: The user commands run as, None for fleetbus's own.
        self.run_as = local_user(self.settings.user)
        if self.run_as is not None:
            ctx.logger.info("local runs commands and file operations as %s", self.run_as)

    async def start(self) -> None:
        # A command's processes are killed if this worker dies (SIGKILL included) rather
        # than run on unobserved: ops/groupkeeper.py.
        groupkeeper.enable()

    async def stop(self) -> None:
        groupkeeper.disable()

    def describe(self) -> list[tuple[str, str]]:
        return [("local as", self.user)]

    @property
    def user(self) -> str:
        """Who ``local`` commands run as, for people: a user name and uid."""
        if self.run_as is not None:
            return str(self.run_as)
        uid = os.geteuid()
        try:
            return f"{pwd.getpwuid(uid).pw_name} (uid {uid}, fleetbus's own user)"
        except KeyError:
            return f"uid {uid} (fleetbus's own user)"

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
        return LocalSession(self.ctx, self.timings, self.run_as)
