"""Running one process on this host for ``Session.exec``.

The process is started in a session (and so a process group) of its own, so that
stopping it means stopping everything it started, not only the immediate child.

We drive the process through ``loop.subprocess_exec`` with our own protocol rather than
``asyncio.create_subprocess_exec``: ``Process.wait()`` only returns once every pipe is
closed, so a background grandchild that inherited stdout would hang it forever, whereas
the protocol's ``process_exited`` tells us the moment the process itself is reaped.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

from fleetbus.errors import (
    FleetbusError,
    InvalidRequest,
    NotFound,
    Timeout,
    TransportError,
)
from fleetbus.secretenv import SECRET_ENV_VARS  # never passed on to commands
from fleetbus.transport import ExecResult, ExecSpec, OutputSink, StreamName

READ_CHUNK = 65536
"""The largest piece of output handed to the sink in one ``write``."""

# Once this much output waits for a slow sink we stop reading the pipe, so a chatty
# process blocks in write() (as it would on a terminal) instead of filling our memory.
_HIGH_WATER = 4 * READ_CHUNK
_LOW_WATER = READ_CHUNK

_GROUP_POLL_S = 0.1

RunBlocking = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ProcessTimings:
    """How long ``exec`` waits at each step of finishing or stopping a process.

    - ``term_grace_s``: after SIGTERM to the process group, how long its members get to
      exit before the group gets SIGKILL.
    - ``exit_grace_s``: after the process exits, how long we keep waiting on its pipes
      for output that is not already there. Only a background process it left behind
      can still write, and we do not wait for those.
    - ``reap_timeout_s``: after SIGKILL, how long we wait for the process to be reaped
      before giving up on it (a process stuck in the kernel cannot be killed).
    - ``timeout_backstop_s``: the host enforces ``ExecSpec.timeout_s`` by cancelling us;
      if that cancellation has not come this long after the limit, we stop the process
      ourselves and raise :class:`fleetbus.errors.Timeout`.
    """

    term_grace_s: float = 2.0
    exit_grace_s: float = 1.0
    reap_timeout_s: float = 5.0
    timeout_backstop_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ProcessTimings:
        """Read the timings from a transport's settings; absent keys keep their default."""
        values: dict[str, float] = {}
        for f in fields(cls):
            if f.name not in settings:
                continue
            value = settings[f.name]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"local transport setting {f.name!r} must be a non-negative number "
                    f"of seconds, not {value!r}"
                )
            values[f.name] = float(value)
        return cls(**values)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def command_line(spec: ExecSpec) -> list[str]:
    """The argv to execute for ``spec``; InvalidRequest when it names no command."""
    if (spec.argv is None) == (spec.shell is None):
        raise InvalidRequest("exactly one of argv and shell must be set")
    if spec.shell is not None:
        return ["/bin/sh", "-c", spec.shell]
    argv = cast(list[str], spec.argv)
    if not argv:
        raise InvalidRequest("argv must not be empty")
    if not all(isinstance(arg, str) for arg in argv):
        raise InvalidRequest("argv must be a list of strings")
    return list(argv)


def spawn_error(
    exc: Exception, argv: list[str], cwd: str | None, path: str | None = None
) -> FleetbusError:
    """A one-line fleetbus error for a process that could not be started.

    ``path`` is the PATH the command was looked up in.
    """
    if not isinstance(exc, OSError):
        # ValueError/TypeError: a NUL byte or a bad name in argv, env or cwd.
        return InvalidRequest(f"invalid command: {exc}")
    # subprocess reports a failed chdir with the cwd as filename and a failed exec
    # with the program; that is the only way to tell the two apart afterwards.
    if cwd is not None and exc.filename == cwd:
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"no such working directory: {_shown(cwd)}")
        if isinstance(exc, NotADirectoryError):
            return InvalidRequest(f"working directory is not a directory: {_shown(cwd)}")
        if isinstance(exc, PermissionError):
            return TransportError(f"permission denied: working directory {_shown(cwd)}")
        return TransportError(f"cannot enter working directory {_shown(cwd)}: {exc.strerror}")
    program = argv[0]
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"no such file or directory: {_shown(program)}")
    if isinstance(exc, PermissionError):
        # A PATH search reports EACCES from any directory it may not search, even when
        # the command is in none of them (as the shell does); say "not found" then.
        if "/" not in program and shutil.which(program, path=path) is None:
            return NotFound(f"no such file or directory: {_shown(program)}")
        return TransportError(f"permission denied: {_shown(program)}")
    if exc.errno == errno.ENOEXEC:
        return InvalidRequest(f"exec format error: {_shown(program)}")
    return TransportError(f"cannot start {_shown(program)}: {exc.strerror or exc}")


def exec_result(returncode: int) -> ExecResult:
    """asyncio reports death by signal N as returncode -N."""
    if returncode < 0:
        return ExecResult(exit_code=None, signal=-returncode)
    return ExecResult(exit_code=returncode)


def group_has_live_members(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie.

    Orphaned members are reaped by init, which in containers can take a second or
    more (or never happen, when nothing there reaps); a zombie is dead already and is
    no reason to keep waiting. Where there is no /proc we cannot tell and count it.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # members we may not signal (e.g. setuid programs) still count
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        # The command name may hold spaces and parentheses; the fields after the last
        # ')' are: state, ppid, pgrp, ...
        after = raw.rpartition(b")")[2].split()
        if len(after) >= 3 and after[2] == str(pgid).encode() and after[0] not in (b"Z", b"X"):
            return True
    return False


class _PipeBuffer:
    """Output of one pipe waiting for the sink, with flow control on the pipe."""

    def __init__(self, pipe: asyncio.ReadTransport | None) -> None:
        self._pipe = pipe
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = pipe is None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        # Pipe transports deliver up to 256 KiB at once; split so no sink write is larger
        # than READ_CHUNK.
        if len(data) <= READ_CHUNK:
            self._chunks.append(data)
        else:
            for start in range(0, len(data), READ_CHUNK):
                self._chunks.append(data[start : start + READ_CHUNK])
        self._size += len(data)
        if self._size >= _HIGH_WATER and not self._paused and self._pipe is not None:
            self._pipe.pause_reading()
            self._paused = True
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """Up to READ_CHUNK bytes, waiting for some; ``b""`` at end of file.

        Cancelling a read loses nothing: data is only taken after the wait.
        """
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        # Many small writes queued behind a slow sink go out as one message.
        parts = [self._chunks.popleft()]
        total = len(parts[0])
        while self._chunks and total + len(self._chunks[0]) <= READ_CHUNK:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            total += len(chunk)
        self._size -= total
        if self._paused and self._size <= _LOW_WATER and self._pipe is not None:
            self._paused = False
            self._pipe.resume_reading()
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _ProcessProtocol(asyncio.SubprocessProtocol):
    def __init__(self) -> None:
        self.exited = asyncio.Event()
        self.buffers: dict[int, _PipeBuffer] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio calls this before delivering any pipe data.
        sub = cast(asyncio.SubprocessTransport, transport)
        for fd in (1, 2):
            pipe = cast("asyncio.ReadTransport | None", sub.get_pipe_transport(fd))
            self.buffers[fd] = _PipeBuffer(pipe)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffer = self.buffers.get(fd)
        if buffer is not None:
            buffer.feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        buffer = self.buffers.get(fd)
        if buffer is not None:
            buffer.feed_eof()

    def process_exited(self) -> None:
        self.exited.set()


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; whether it is set.

    asyncio.wait never cancels what it waits on, and unlike wait_for/timeout it behaves
    the same inside a task that is already being cancelled (our cleanup path).
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


class _Run:
    """One started process: pumps its output to the sink, then reports how it ended."""

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        protocol: _ProcessProtocol,
        output: OutputSink,
        timings: ProcessTimings,
        logger: logging.Logger,
        run_blocking: RunBlocking,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._output = output
        self._timings = timings
        self._logger = logger
        self._run_blocking = run_blocking
        self._loop = asyncio.get_running_loop()
        self._pid: int = transport.get_pid()
        if self._pid <= 1:
            # killpg(0) would signal fleetbus's own group; never let that happen.
            transport.close()
            raise TransportError(f"unexpected child pid {self._pid}")
        self._exited_at: float | None = None
        self._waiting: set[asyncio.Timeout] = set()
        self._pumps: list[asyncio.Task[None]] = []

    async def supervise(self, stdin: bytes | None) -> ExecResult:
        exited = asyncio.ensure_future(self._protocol.exited.wait())
        try:
            if stdin is not None:
                self._feed_stdin(stdin)
            self._pumps = [
                asyncio.create_task(self._pump(self._protocol.buffers[1], "stdout")),
                asyncio.create_task(self._pump(self._protocol.buffers[2], "stderr")),
            ]
            pending: set[asyncio.Future[Any]] = {exited, *self._pumps}
            while not exited.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not exited:
                        task.result()  # a failing sink ends the command
            self._process_gone()
            for pump in self._pumps:
                await pump
        except BaseException:
            await self._terminate()
            raise
        finally:
            exited.cancel()
            self._discard_pumps()
            self._transport.close()
        returncode = self._transport.get_returncode()
        if returncode is None:  # cannot happen once process_exited has fired
            raise TransportError(f"exit status of pid {self._pid} is unknown")
        return exec_result(returncode)

    def _feed_stdin(self, data: bytes) -> None:
        # The whole input is already in memory, so hand it to the pipe transport, which
        # writes it as the process reads, and close: EOF follows the last byte. If the
        # process exits without reading it all, the transport drops the rest quietly.
        pipe = cast("asyncio.WriteTransport | None", self._transport.get_pipe_transport(0))
        if pipe is None:
            return
        if data:
            pipe.write(data)
        pipe.close()

    async def _pump(self, buffer: _PipeBuffer, stream: StreamName) -> None:
        # While the process runs we wait on the pipe as long as it takes. After it exits,
        # whatever it wrote is already in the pipe and arrives without waiting; a read
        # that has to wait is waiting on some background process that inherited the pipe,
        # so each pump gets exit_grace_s of such waiting in total, then stops. Time spent
        # in a slow sink does not count, so the process's own output is never cut short.
        budget = self._timings.exit_grace_s
        while True:
            started = self._loop.time()
            deadline = None if self._exited_at is None else started + budget
            try:
                async with asyncio.timeout_at(deadline) as timeout:
                    self._waiting.add(timeout)
                    try:
                        chunk = await buffer.read()
                    finally:
                        self._waiting.discard(timeout)
            except TimeoutError:
                self._logger.info(
                    "pid %d exited but a background process still holds its %s open; "
                    "not waiting for it",
                    self._pid,
                    stream,
                )
                return
            if self._exited_at is not None:
                budget -= self._loop.time() - max(started, self._exited_at)
            if not chunk:
                return
            await self._output.write(stream, chunk)

    def _process_gone(self) -> None:
        self._exited_at = self._loop.time()
        for timeout in list(self._waiting):
            timeout.reschedule(self._exited_at + self._timings.exit_grace_s)

    async def _terminate(self) -> None:
        """Stop the whole process group: SIGTERM, a grace period, SIGKILL, then reap."""
        try:
            self._signal_group(signal.SIGTERM)
            if not await self._wait_group_gone(self._timings.term_grace_s):
                # The leader, or members that ignore SIGTERM, still run. Not sent once the
                # group is known empty: its id is free for reuse from then on.
                self._signal_group(signal.SIGKILL)
            if not await _wait_event(self._protocol.exited, self._timings.reap_timeout_s):
                self._logger.warning(
                    "pid %d did not exit %.0f s after SIGKILL; leaving it to the child watcher",
                    self._pid,
                    self._timings.reap_timeout_s,
                )
        except asyncio.CancelledError:
            # Cancelled again while stopping (e.g. shutdown): no more patience.
            self._signal_group(signal.SIGKILL)
            raise

    async def _wait_group_gone(self, timeout: float) -> bool:
        deadline = self._loop.time() + timeout
        if not await _wait_event(self._protocol.exited, timeout):
            return False
        # The leader is gone; other members are not our children, so there is nothing
        # to wait on but the group's existence.
        while await self._run_blocking(group_has_live_members, self._pid):
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(_GROUP_POLL_S, remaining))
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        # The pgid is the leader's pid (start_new_session). The kernel does not reuse it
        # while the leader is unreaped or any member (even a zombie) remains, so this
        # reaches only what the command started. The one gap: the leader has exited and
        # only a process that left the group (setsid) holds the pipes we still drain;
        # reuse then needs the pid space to wrap within exit_grace_s.
        try:
            os.killpg(self._pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self._logger.warning(
                "not permitted to send %s to process group %d", sig.name, self._pid
            )

    def _discard_pumps(self) -> None:
        for pump in self._pumps:
            if not pump.done():
                pump.cancel()
            elif not pump.cancelled():
                pump.exception()  # retrieved, so asyncio does not log it as lost


async def run_process(
    spec: ExecSpec,
    output: OutputSink,
    *,
    timings: ProcessTimings,
    logger: logging.Logger,
    run_blocking: RunBlocking,
) -> ExecResult:
    """Run ``spec`` on this host, streaming its output to ``output`` as it arrives.

    Raises NotFound/InvalidRequest/TransportError when the process cannot be started.
    On cancellation (or any failure, such as a sink error) the whole process group is
    stopped and reaped before the exception propagates.
    """
    argv = command_line(spec)
    loop = asyncio.get_running_loop()
    env = {key: value for key, value in os.environ.items() if key not in SECRET_ENV_VARS}
    env.update(spec.env)
    try:
        transport, protocol = await loop.subprocess_exec(
            _ProcessProtocol,
            *argv,
            stdin=subprocess.PIPE if spec.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=spec.cwd,
            env=env,
            start_new_session=True,
        )
    except (OSError, ValueError, TypeError) as exc:
        raise spawn_error(exc, argv, spec.cwd, env.get("PATH", os.defpath)) from exc
    run = _Run(transport, protocol, output, timings, logger, run_blocking)

    backstop = None
    if spec.timeout_s is not None:
        backstop = loop.time() + spec.timeout_s + timings.timeout_backstop_s
    limit = asyncio.timeout_at(backstop)
    try:
        async with limit:
            return await run.supervise(spec.stdin)
    except TimeoutError:
        if not limit.expired():
            raise  # not ours: raised by the sink
        raise Timeout(f"command ran past its {spec.timeout_s:g} s time limit") from None
