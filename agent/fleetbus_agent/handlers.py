"""What the agent does with each operation the controller opens: ops on this host.

The protocol module runs one handler task per stream; cancelling it (a ``cancel`` frame
or a lost connection) cancels the operation, which stops the process group or removes
the temporary file, so nothing keeps running for a result nobody can receive.

A listening agent started with ``--allow-path`` passes a :class:`~.paths.PathPolicy`:
``put`` and ``get`` check it before touching the file system. ``exec`` is not
restricted by it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from fleetbus_base.heap import TransferHeap
from fleetbus_base.ops.blocking import resolve_run_blocking
from fleetbus_base.ops.errors import OpError
from fleetbus_base.ops.facts import server_facts
from fleetbus_base.ops.process import ExecSpec, run_process

from . import __version__

if TYPE_CHECKING:
    from fleetbus_base.ops import ProcessTimings, RunBlocking
    from fleetbus_base.wire import AgentStream

    from .paths import PathPolicy

log = logging.getLogger("fleetbus_agent.handlers")


# The most stdin an exec may send as data frames: it is held in memory until the
# process starts (the bus itself carries about 750 KiB).
MAX_STDIN_BYTES = 16 * 1024 * 1024


async def _streamed_stdin(stream: AgentStream, size: Any) -> bytes:
    """The stdin a version-2 controller sends as data frames after the open frame."""
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_STDIN_BYTES:
        raise OpError("invalid_request", f"stdin_size must be an integer from 0 to {MAX_STDIN_BYTES}")
    parts: List[bytes] = []
    got = 0
    async for chunk in stream.data():
        got += len(chunk)
        if got > size:
            raise OpError("invalid_request", f"more stdin than the {size} bytes announced")
        parts.append(chunk)
    if got != size:
        raise OpError("invalid_request", f"stdin ended after {got} of the {size} bytes announced")
    return b"".join(parts)


def _stdin(args: Dict[str, Any]) -> Optional[bytes]:
    raw = args.get("stdin_b64")
    if raw is None:
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise OpError("invalid_request", "stdin_b64 is not valid base64") from None


class Handler:
    """Dispatches one stream to the ops implementation; an instance per agent process."""

    def __init__(self, run_blocking: Optional[RunBlocking] = None,
                 timings: Optional[ProcessTimings] = None,
                 paths: Optional[PathPolicy] = None) -> None:
        self.run_blocking = run_blocking
        self.timings = timings
        self.paths = paths if paths else None  # an empty policy allows everything
        self.heap = TransferHeap()

    def answer_now(self, stream: AgentStream) -> Optional[Dict[str, Any]]:
        """The result of an operation that needs no waiting (ping), else None (see Connection)."""
        return {} if stream.op == "ping" else None

    async def __call__(self, stream: AgentStream) -> Optional[Dict[str, Any]]:
        op, args = stream.op, stream.args or {}
        if op == "ping":
            return {}
        if op == "exec":
            return await self._exec(stream, args)
        if op == "put":
            return await self._put(stream, args)
        if op == "get":
            return await self._get(stream, args)
        if op == "info":
            facts = server_facts()
            extra = dict(facts.extra, agent_version=__version__)
            return dataclasses.replace(facts, extra=extra).to_dict()
        raise OpError("invalid_request", f"this agent does not know the operation {str(op)[:32]!r}")

    # The process and file code is imported on the first command that needs it, so an
    # idle agent holds only what connecting needs (see fleetbus_base.ops).
    async def _exec(self, stream: AgentStream, args: Dict[str, Any]) -> Dict[str, Any]:
        if "stdin_size" in args:
            if args.get("stdin_b64") is not None:
                raise OpError("invalid_request", "give at most one of stdin_b64 and stdin_size")
            stdin = await _streamed_stdin(stream, args["stdin_size"])
        else:
            stdin = _stdin(args)
        spec = ExecSpec(
            argv=args.get("argv"), shell=args.get("shell"), env=args.get("env") or {},
            cwd=args.get("cwd"), stdin=stdin, timeout_s=args.get("timeout_s"),
        )
        result = await run_process(spec, stream.send_out, timings=self.timings, logger=log,
                                   run_blocking=self.run_blocking)
        return {"exit_code": result.exit_code, "signal": result.signal}

    async def _put(self, stream: AgentStream, args: Dict[str, Any]) -> Dict[str, Any]:
        from fleetbus_base.ops.files import PutSpec, put_file

        if self.paths is not None:
            # realpath and friends stat the file system: off the event loop, like all file I/O.
            await resolve_run_blocking(self.run_blocking)(self.paths.check_write, args.get("path"))
        spec = PutSpec(path=args.get("path"), mode=args.get("mode"),  # type: ignore[arg-type]
                       make_parents=bool(args.get("make_parents", True)), size=args.get("size"))
        with self.heap.transfer(spec.size):
            stat = await put_file(spec, stream.data(), run_blocking=self.run_blocking, logger=log)
        return {"size": stat.size, "mode": stat.mode}

    async def _get(self, stream: AgentStream, args: Dict[str, Any]) -> Dict[str, Any]:
        from fleetbus_base.ops.files import get_file

        if self.paths is not None:
            await resolve_run_blocking(self.run_blocking)(self.paths.check_read, args.get("path"))
        remote = await get_file(args.get("path"), run_blocking=self.run_blocking)  # type: ignore[arg-type]
        sent = 0
        try:
            with self.heap.transfer(remote.size):
                await stream.send_meta(remote.size, remote.mode)
                async for chunk in remote.chunks:
                    await stream.send_data(chunk)
                    sent += len(chunk)
        finally:
            await remote.aclose()
        return {"size": sent}
