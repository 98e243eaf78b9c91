"""A :class:`fleetbus.transport.Session` over an agent protocol connection.

Both agent transports (the outbound gateway and, later, the inbound connector) hand
commands to a fleetbus agent the same way, so the mapping lives here once: one
protocol stream per command, process output to the host's output sink, file bytes with
the protocol's flow control, and the agent's error codes back to fleetbus errors.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

from fleetbus_agent.protocol import Connection, ControllerStream

from .errors import ERROR_CLASSES, FleetbusError, ServerOffline, TransportError
from .transport import ExecResult, ExecSpec, FileStat, OutputSink, PutSpec, RemoteFile, ServerFacts, Session

# After a cancel, how long to wait for the agent to confirm the work stopped.
CANCEL_CONFIRM_S = 5.0


def error_from(error: dict[str, Any] | None) -> FleetbusError:
    error = error or {}
    cls = ERROR_CLASSES.get(str(error.get("code")), TransportError)
    return cls(str(error.get("message") or "the agent reported an error"))


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
                    await output.write(event.stream or "stdout", event.body)  # type: ignore[arg-type]
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
        if spec.stdin is not None:
            args["stdin_b64"] = base64.b64encode(spec.stdin).decode()
        result = await self._result(self._open("exec", args), output)
        return ExecResult(exit_code=result.get("exit_code"), signal=result.get("signal"))

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        stream = self._open("put", {"path": spec.path, "mode": spec.mode,
                                    "make_parents": spec.make_parents, "size": spec.size})

        async def send() -> None:
            async for chunk in source:
                await stream.send(chunk)
            await stream.send_eof()

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
        return FileStat(size=int(result.get("size", 0)), mode=result.get("mode"))

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
            raise TransportError(f"the agent answered get with {first.kind!r} instead of meta")

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

        return RemoteFile(size=int(first.size or 0), mode=first.mode, chunks=chunks())

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
        result = await self._final(self._open("info", {}))
        return ServerFacts(
            hostname=result.get("hostname"), os=result.get("os"), os_version=result.get("os_version"),
            kernel=result.get("kernel"), arch=result.get("arch"), uptime_s=result.get("uptime_s"),
            extra=dict(result.get("extra") or {}),
        )

    async def ping(self) -> None:
        await self._final(self._open("ping", {}))

    async def close(self) -> None:
        # The connection belongs to the transport (it outlives sessions); nothing to do.
        return None
