"""A :class:`fleetbus.transport.Session` over an agent protocol connection.

Both agent transports (the outbound gateway and, later, the inbound connector) hand
commands to a fleetbus agent the same way, so the mapping lives here once: one
protocol stream per command, process output to the host's output sink, file bytes with
the protocol's flow control, and the agent's error codes back to fleetbus errors.

What an agent answers is checked here, strictly (the result models below): a keyed
agent is still only as trustworthy as the server it runs on, and what it says goes
into bus replies other systems act on. A result of the wrong shape is the transport
failing (``transport_error``), never fleetbus's own ``internal``.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fleetbus.errors import FleetbusError, ServerOffline, TooLarge, TransportError, error_for_code
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
from fleetbus_base.text import shorten
from fleetbus_base.wire import Connection, ControllerStream, StreamError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

# After a cancel, how long to wait for the agent to confirm the work stopped.
CANCEL_CONFIRM_S = 5.0
# Stdin up to this size travels base64 in the exec's open frame (its header holds 64 KiB
# with argv and env); above it, as data frames (protocol version 2).
INLINE_STDIN_BYTES = 32 * 1024
# Bounds on what an agent may report: no honest fact or error message comes near them.
MAX_FACT_CHARS = 256
MAX_EXTRA_FACTS = 64
MAX_EXTRA_CHARS = 1024
MAX_ERROR_CHARS = 1000
_OUTPUT_STREAMS = ("stdout", "stderr")

_Model = TypeVar("_Model", bound=BaseModel)
# Exit statuses: 0-255 on POSIX; Windows reports 32-bit values (NTSTATUS), signed or not.
ExitCode = Annotated[StrictInt, Field(ge=-(2**31), le=2**32 - 1)]
Size = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
Mode = Annotated[StrictInt, Field(ge=0, le=0o7777)]
Fact = Annotated[StrictStr, Field(max_length=MAX_FACT_CHARS)]
ExtraFact = StrictStr | StrictInt | StrictFloat | StrictBool | None


class _Result(BaseModel):
    # Strict: "1" is not 1 and true is not an exit code. Unknown fields are ignored, so
    # a newer agent may report more than this version reads.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class AgentExecResult(_Result):
    """An agent's ``done`` for ``exec``: how the process ended."""

    exit_code: ExitCode | None
    signal: Annotated[StrictInt, Field(ge=1, le=255)] | None = None


class AgentPutResult(_Result):
    """An agent's ``done`` for ``put``: what it wrote."""

    size: Size
    mode: Mode | None = None


class AgentFileMeta(_Result):
    """An agent's ``meta`` for ``get``: the file about to come."""

    size: Size
    mode: Mode | None = None


class AgentFacts(_Result):
    """An agent's ``done`` for ``info``: facts, each a bounded string or null."""

    hostname: Fact | None = None
    os: Fact | None = None
    os_version: Fact | None = None
    kernel: Fact | None = None
    arch: Fact | None = None
    uptime_s: Annotated[StrictFloat | StrictInt, Field(ge=0)] | None = None
    extra: dict[Annotated[StrictStr, Field(max_length=64)], ExtraFact] = Field(
        default_factory=dict, max_length=MAX_EXTRA_FACTS)

    @model_validator(mode="after")
    def _bounded(self) -> AgentFacts:
        if isinstance(self.uptime_s, float) and not math.isfinite(self.uptime_s):
            raise ValueError("uptime_s is not a finite number")
        for key, value in self.extra.items():
            if isinstance(value, str) and len(value) > MAX_EXTRA_CHARS:
                raise ValueError(f"extra.{key[:64]} is longer than {MAX_EXTRA_CHARS} characters")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"extra.{key[:64]} is not a finite number")
        return self

    def facts(self) -> ServerFacts:
        return ServerFacts(hostname=self.hostname, os=self.os, os_version=self.os_version,
                           kernel=self.kernel, arch=self.arch, uptime_s=self.uptime_s,
                           extra=dict(self.extra))


def checked(model: type[_Model], op: str, result: Any) -> _Model:
    """``result`` as ``model``, or :class:`TransportError` saying what the agent got wrong."""
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "result"
        raise TransportError(
            f"the agent answered {op} with an invalid result ({where}: {err.get('msg', 'invalid')})"
        ) from None


def error_from(error: dict[str, Any] | None) -> FleetbusError:
    """The fleetbus error for an agent's ``fail``: the agent is a peer
    (:func:`fleetbus.errors.error_for_code`), so an unknown code, or ``internal`` (the
    agent's own failure, not fleetbus's), is a ``transport_error``."""
    error = error or {}
    message = error.get("message")
    text = shorten(message, MAX_ERROR_CHARS) if isinstance(message, str) and message else "no reason given"
    return error_for_code(error.get("code"), text, reporter="the agent")


async def _cancel(stream: ControllerStream) -> None:
    """Tell the agent to stop, and wait (bounded) until it says it did."""
    stream.cancel()
    try:
        async with asyncio.timeout(CANCEL_CONFIRM_S):
            while True:
                if (await stream.next_event()).kind in ("done", "fail"):
                    return
    except (TimeoutError, Exception):
        return


class AgentSession(Session):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @property
    def alive(self) -> bool:
        return not self.conn.closed

    def _open(self, op: str, args: dict[str, Any]) -> ControllerStream:
        if self.conn.closed:
            raise ServerOffline(f"the agent connection is gone: {self.conn.close_reason or 'closed'}")
        return self.conn.open_stream(op, args)

    async def _result(self, stream: ControllerStream, output: OutputSink | None = None) -> dict[str, Any]:
        try:
            while True:
                event = await stream.next_event()
                if event.kind == "out" and output is not None:
                    if event.stream not in _OUTPUT_STREAMS:
                        raise TransportError(f"the agent sent output on {str(event.stream)[:32]!r}, "
                                             "not stdout or stderr")
                    await output.write(event.stream, event.body)  # type: ignore[arg-type]
                elif event.kind == "done":
                    return event.result or {}
                elif event.kind == "fail":
                    raise error_from(event.error)
        except asyncio.CancelledError:
            await asyncio.shield(_cancel(stream))
            raise

    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        args: dict[str, Any] = {"argv": spec.argv, "shell": spec.shell, "env": spec.env,
                                "cwd": spec.cwd, "timeout_s": spec.timeout_s}
        # Small stdin rides in the open frame, as every protocol version allows; larger
        # stdin would not fit its 64 KiB header and goes as data frames (version 2).
        stdin = spec.stdin
        streamed = stdin if stdin is not None and len(stdin) > INLINE_STDIN_BYTES else None
        if streamed is not None:
            if self.conn.version < 2:
                raise TooLarge(f"this agent speaks protocol version {self.conn.version}, which takes at most "
                               f"{INLINE_STDIN_BYTES // 1024} KiB of stdin; upgrade the agent to send more")
            args["stdin_size"] = len(streamed)
        elif stdin is not None:
            args["stdin_b64"] = base64.b64encode(stdin).decode()
        stream = self._open("exec", args)
        if streamed is not None:
            try:
                await stream.send(streamed)
                await stream.send_eof()
            except StreamError:
                pass  # the agent ended the stream already: its result (or failure) says why
            except asyncio.CancelledError:
                await asyncio.shield(_cancel(stream))
                raise
        result = checked(AgentExecResult, "exec", await self._result(stream, output))
        return ExecResult(exit_code=result.exit_code, signal=result.signal)

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        stream = self._open("put", {"path": spec.path, "mode": spec.mode,
                                    "make_parents": spec.make_parents, "size": spec.size})

        async def send() -> None:
            try:
                async for chunk in source:
                    await stream.send(chunk)
                await stream.send_eof()
            except StreamError as exc:
                # The link went (or the agent ended the stream) while content was still
                # going out: the stream's own code, e.g. server_offline, not a bug of ours.
                raise error_from({"code": exc.code, "message": str(exc)}) from None

        sender = asyncio.create_task(send())
        waiter = asyncio.create_task(self._result(stream))
        try:
            done, _ = await asyncio.wait({sender, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done and sender.exception() is not None:
                # The source failed (short read, wrong checksum): the agent must discard
                # its temporary file rather than rename it into place.
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
                raise sender.exception()  # type: ignore[misc]
            result = await waiter
        except BaseException:
            for task in (sender, waiter):
                task.cancel()
            await asyncio.gather(sender, waiter, return_exceptions=True)
            raise
        if not sender.done():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        stat = checked(AgentPutResult, "put", result)
        return FileStat(size=stat.size, mode=stat.mode)

    async def get(self, path: str) -> RemoteFile:
        stream = self._open("get", {"path": path})
        events = stream.events()
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise ServerOffline("the agent connection ended before the file was opened") from None
        except asyncio.CancelledError:
            await asyncio.shield(_cancel(stream))
            raise
        if first.kind == "fail":
            raise error_from(first.error)
        if first.kind != "meta":
            stream.cancel()
            raise TransportError(f"the agent answered get with {first.kind!r} instead of meta")
        try:
            # The protocol leaves a size or mode that is not an integer as None.
            meta = checked(AgentFileMeta, "get", {"size": first.size, "mode": first.mode})
        except TransportError:
            stream.cancel()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            finished = False
            try:
                async for event in events:
                    if event.kind == "data":
                        yield event.body
                    elif event.kind == "done":
                        finished = True
                        return
                    elif event.kind == "fail":
                        finished = True
                        raise error_from(event.error)
                raise ServerOffline("the agent connection ended in the middle of the file")
            finally:
                if not finished:
                    stream.cancel()

        return RemoteFile(size=meta.size, mode=meta.mode, chunks=chunks())

    async def _final(self, stream: ControllerStream) -> dict[str, Any]:
        """The result of an operation with no output to pass on, without an event iterator."""
        try:
            event = await stream.final()
        except asyncio.CancelledError:
            await asyncio.shield(_cancel(stream))
            raise
        if event.kind == "fail":
            raise error_from(event.error)
        return event.result or {}

    async def info(self) -> ServerFacts:
        return checked(AgentFacts, "info", await self._final(self._open("info", {}))).facts()

    async def ping(self) -> None:
        await self._final(self._open("ping", {}))

    async def close(self) -> None:
        # The connection belongs to the transport (it outlives sessions); nothing to do.
        return None
