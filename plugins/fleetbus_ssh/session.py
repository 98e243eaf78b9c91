"""The ``ssh`` Session: one SSH connection to a server, shared by concurrent commands.

Each command runs on channels of its own over the shared connection (exec: one
session channel; put/get: a borrowed SFTP client; ping: a global request, no
channel). The host keeps this session while ``alive`` and opens a new one after the
connection breaks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fleetbus.transport import (
    ExecResult,
    ExecSpec,
    FileStat,
    OutputSink,
    PutSpec,
    RemoteFile,
    ServerFacts,
    Session,
)

from .connection import SshConnection
from .facts import FACTS_SPEC, Collector, parse_facts
from .remote_exec import RemoteExec, RunBlocking
from .settings import SshSettings
from .sftp_files import SftpPool
from .slots import ChannelSlots


class SshSession(Session):
    def __init__(self, conn: SshConnection, settings: SshSettings, run_blocking: RunBlocking,
                 logger: logging.Logger, max_sessions: int) -> None:
        self.conn = conn
        self.settings = settings
        self.run_blocking = run_blocking
        self.logger = logger
        self.slots = ChannelSlots(max_sessions)
        self.sftp = SftpPool(conn, self.slots, settings, run_blocking, logger)
        self._closed = False

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def alive(self) -> bool:
        return not self._closed and self.conn.alive

    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        return await RemoteExec(self.conn, self.slots, self.settings, self.run_blocking,
                                self.logger).run(spec, output)

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        return await self.sftp.put(spec, source)

    async def get(self, path: str) -> RemoteFile:
        return await self.sftp.get(path)

    async def info(self) -> ServerFacts:
        collector = Collector()
        result = await self.exec(FACTS_SPEC, collector)
        # The host adds the transport's name and version itself.
        extra: dict[str, Any] = {}
        if self.conn.server_version:
            extra["ssh_server"] = self.conn.server_version
        return parse_facts(bytes(collector.stdout), result.exit_code, extra)

    async def ping(self) -> None:
        await self.run_blocking(self.conn.ping, self.settings.ping_timeout_s)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.sftp.close_idle()
        finally:
            await self.run_blocking(self.conn.close)
