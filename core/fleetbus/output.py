"""Live process output: chunks on the requester's ``output_subject`` and a bounded tail.

The bus carries raw bytes (no base64) with the stream named in a header, so a consumer
in any language can write chunks straight to its own stdout/stderr. The end marker
carries the exit code so a consumer that only watches the output subject knows when
the command is over.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS

# The header names live in subjects.py; callers also find them here.
from .subjects import HDR_COMMAND, HDR_END, HDR_ERROR, HDR_EXIT, HDR_SEQ, HDR_STREAM

if TYPE_CHECKING:  # importing transport builds pydantic models; the CLI avoids that
    from .transport import StreamName

__all__ = ["HDR_COMMAND", "HDR_END", "HDR_ERROR", "HDR_EXIT", "HDR_SEQ", "HDR_STREAM", "BusOutput", "Tail"]

# NATS buffers publishes; past this many unflushed bytes we wait for the socket, which
# pushes back on the transport (and so on the remote process) instead of growing memory.
FLUSH_AFTER_BYTES = 4 * 1024 * 1024


class Tail:
    """The last ``limit`` bytes written, and whether anything was dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: deque[bytes] = deque()
        self.size = 0
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.parts.append(data)
        self.size += len(data)
        while self.size - len(self.parts[0]) >= self.limit:
            self.size -= len(self.parts.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        data = b"".join(self.parts)[-self.limit :] if self.limit else b""
        return data.decode("utf-8", errors="replace")


class BusOutput:
    """The :class:`fleetbus.transport.OutputSink` the host gives to ``Session.exec``."""

    def __init__(self, nc: NATS, command_id: str, subject: str | None, tail_bytes: int) -> None:
        self.nc = nc
        self.command_id = command_id
        self.subject = subject
        self.stdout = Tail(tail_bytes)
        self.stderr = Tail(tail_bytes)
        self.seq = 0
        self.unflushed = 0

    async def write(self, stream: StreamName, data: bytes) -> None:
        if not data:
            return
        (self.stdout if stream == "stdout" else self.stderr).add(data)
        if self.subject is None:
            return
        self.seq += 1
        await self.nc.publish(
            self.subject,
            data,
            headers={HDR_STREAM: stream, HDR_SEQ: str(self.seq), HDR_COMMAND: self.command_id},
        )
        self.unflushed += len(data)
        if self.unflushed >= FLUSH_AFTER_BYTES:
            self.unflushed = 0
            await self.nc.flush(timeout=30)

    async def end(self, exit_code: int | None, error_code: str | None = None) -> None:
        if self.subject is None:
            return
        headers = {HDR_END: "1", HDR_SEQ: str(self.seq + 1), HDR_COMMAND: self.command_id}
        if exit_code is not None:
            headers[HDR_EXIT] = str(exit_code)
        if error_code is not None:
            headers[HDR_ERROR] = error_code
        await self.nc.publish(self.subject, b"", headers=headers)

    @property
    def bytes_out(self) -> int:
        return self.stdout.total + self.stderr.total
