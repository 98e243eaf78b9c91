"""Running one process for ``exec``.

The process is started in a session (and so a process group) of its own, so that
stopping it means stopping everything it started, not only the immediate child.

The process itself is a :class:`~fleetbus_agent.ops.child.ChildProcess` (started and
watched straight from the event loop, see there why not asyncio's subprocess
transport). Its exit is reported the moment it is reaped, not when its pipes close, so
a background grandchild that inherited stdout cannot hang the command.

Every wait here is ``asyncio.wait`` on futures with a timeout, never ``asyncio.timeout``
(Python 3.11+) or ``wait_for``: it never cancels what it waits on, and it behaves the
same inside a task that has just been cancelled (our cleanup path).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .blocking import RunBlocking, resolve_run_blocking
from .child import ChildProcess, PipeReader
from .environment import spawn_environment
from .errors import OpError, invalid_request, not_found, timeout, transport_error

log = logging.getLogger(__name__)

READ_CHUNK = 65536
"""The largest piece of output handed to the output callback in one call."""

STREAMS = ("stdout", "stderr")
"""The stream names the output callback receives."""

# Once this much output waits for a slow consumer we stop reading the pipe, so a chatty
# process blocks in write() (as it would on a terminal) instead of filling our memory.
_HIGH_WATER = 4 * READ_CHUNK
_LOW_WATER = READ_CHUNK

_GROUP_POLL_S = 0.1

OutputCallback = Callable[[str, bytes], Awaitable[None]]
"""``await write(stream, data)``: ``stream`` is "stdout" or "stderr", ``data`` holds
1 to READ_CHUNK bytes. It may wait when its consumer is slow (back-pressure): the next
chunk of that stream is read only after it returns. If it raises, the process group is
stopped and the exception propagates out of :func:`run_process` unchanged."""


@dataclass(frozen=True)
class ExecSpec:
    """One process to run. Exactly one of ``argv`` and ``shell`` is set.

    - ``argv``: program and arguments, looked up in PATH; no shell is involved.
    - ``shell``: a command line for ``/bin/sh -c``.
    - ``env``: set over this process's environment (minus the secret variables).
    - ``cwd``: working directory; None for ours.
    - ``stdin``: the whole input, then end of file; None for ``/dev/null``.
    - ``timeout_s``: the caller's time limit. The caller enforces it by cancelling
      :func:`run_process`; the process only stops itself
      ``ProcessTimings.timeout_backstop_s`` later, in case that never happens.
    """

    argv: Optional[list[str]] = None
    shell: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    stdin: Optional[bytes] = None
    timeout_s: Optional[float] = None


@dataclass(frozen=True)
class ExecResult:
    """How the process ended: ``exit_code``, or the ``signal`` that killed it."""

    exit_code: Optional[int]
    signal: Optional[int] = None


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
    - ``timeout_backstop_s``: the caller enforces ``ExecSpec.timeout_s`` by cancelling
      us; if that cancellation has not come this long after the limit, we stop the
      process ourselves and raise an :class:`OpError` with code ``timeout``.
    """

    term_grace_s: float = 2.0
    exit_grace_s: float = 1.0
    reap_timeout_s: float = 5.0
    timeout_backstop_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ProcessTimings:
        """Read the timings from a settings mapping; absent keys keep their default.

        Other keys are ignored. A bad value raises ValueError whose message starts
        with the quoted setting name, so callers can prefix where it came from.
        """
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
                    f"{f.name!r} must be a non-negative number of seconds, not {value!r}"
                )
            values[f.name] = float(value)
        return cls(**values)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def command_line(spec: ExecSpec) -> list[str]:
    """The argv to execute for ``spec``; OpError ``invalid_request`` when it names no
    command or is malformed."""
    if (spec.argv is None) == (spec.shell is None):
        raise invalid_request("exactly one of argv and shell must be set")
    if spec.shell is not None:
        if not isinstance(spec.shell, str):
            raise invalid_request("shell must be a string")
        return ["/bin/sh", "-c", spec.shell]
    argv = spec.argv
    # A str is iterable too; it must not become one argument per character.
    if not isinstance(argv, (list, tuple)):
        raise invalid_request("argv must be a list of strings")
    if not argv:
        raise invalid_request("argv must not be empty")
    if not all(isinstance(arg, str) for arg in argv):
        raise invalid_request("argv must be a list of strings")
    return list(argv)


def _check_spec(spec: ExecSpec) -> None:
    # fleetbus validates requests before they reach us; the agent's peer may not.
    if not isinstance(spec.env, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in spec.env.items()
    ):
        raise invalid_request("env must map strings to strings")
    if spec.cwd is not None and not isinstance(spec.cwd, str):
        raise invalid_request("cwd must be a string")
    if spec.stdin is not None and not isinstance(spec.stdin, (bytes, bytearray)):
        raise invalid_request("stdin must be bytes")
    if spec.timeout_s is not None and (
        isinstance(spec.timeout_s, bool)
        or not isinstance(spec.timeout_s, (int, float))
        or not spec.timeout_s >= 0  # also refuses NaN
    ):
        raise invalid_request(f"invalid timeout_s {spec.timeout_s!r}")


def spawn_error(
    exc: Exception, argv: list[str], cwd: Optional[str], path: Optional[str] = None
) -> OpError:
    """A one-line OpError for a process that could not be started.

    ``path`` is the PATH the command was looked up in.
    """
    if not isinstance(exc, OSError):
        # ValueError/TypeError: a NUL byte or a bad name in argv, env or cwd.
        return invalid_request(f"invalid command: {exc}")
    # subprocess reports a failed chdir with the cwd as filename and a failed exec
    # with the program; that is the only way to tell the two apart afterwards.
    if cwd is not None and exc.filename == cwd:
        if isinstance(exc, FileNotFoundError):
            return not_found(f"no such working directory: {_shown(cwd)}")
        if isinstance(exc, NotADirectoryError):
            return invalid_request(f"working directory is not a directory: {_shown(cwd)}")
        if isinstance(exc, PermissionError):
            return transport_error(f"permission denied: working directory {_shown(cwd)}")
        return transport_error(f"cannot enter working directory {_shown(cwd)}: {exc.strerror}")
    program = argv[0]
    if isinstance(exc, FileNotFoundError):
        return not_found(f"no such file or directory: {_shown(program)}")
    if isinstance(exc, PermissionError):
        # A PATH search reports EACCES from any directory it may not search, even when
        # the command is in none of them (as the shell does); say "not found" then.
        import shutil  # here: only this rare path needs it, and it brings bz2 and lzma along

        if "/" not in program and shutil.which(program, path=path) is None:
            return not_found(f"no such file or directory: {_shown(program)}")
        return transport_error(f"permission denied: {_shown(program)}")
    if exc.errno == errno.ENOEXEC:
        return invalid_request(f"exec format error: {_shown(program)}")
    return transport_error(f"cannot start {_shown(program)}: {exc.strerror or exc}")


def exec_result(returncode: int) -> ExecResult:
    """asyncio reports death by signal N as returncode -N."""
    if returncode < 0:
        return ExecResult(exit_code=None, signal=-returncode)
    return ExecResult(exit_code=returncode)


def group_has_live_members(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie. Blocking.

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


async def _wait_done(future: asyncio.Future[Any], timeout_s: float) -> bool:
    """Wait for ``future`` at most ``timeout_s`` seconds, without ever cancelling it;
    whether it is done."""
    if not future.done():
        await asyncio.wait({future}, timeout=max(0.0, timeout_s))
    return future.done()


class _PipeBuffer:
    """Output of one pipe waiting for the consumer, with flow control on the pipe."""

    def __init__(self) -> None:
        self.pipe: Optional[PipeReader] = None  # set once the process has started
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._paused = False
        self._changed: Optional[asyncio.Future[None]] = None

    def feed(self, data: bytes) -> None:
        # A pipe read delivers up to 256 KiB at once; split so no write to the consumer
        # is larger than READ_CHUNK.
        if len(data) <= READ_CHUNK:
            self._chunks.append(data)
        else:
            for start in range(0, len(data), READ_CHUNK):
                self._chunks.append(data[start : start + READ_CHUNK])
        self._size += len(data)
        if self._size >= _HIGH_WATER and not self._paused and self.pipe is not None:
            self.pipe.pause_reading()
            self._paused = True
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def ready(self) -> bool:
        """Whether :meth:`take` has something to return: data, or end of file."""
        return bool(self._chunks) or self._eof

    def changed(self) -> asyncio.Future[None]:
        """A future that completes when data or end of file next arrives.

        Waiting on it takes nothing, so a wait that is cancelled or times out loses
        no output.
        """
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def take(self) -> bytes:
        """Up to READ_CHUNK queued bytes; ``b""`` at end of file. Call once ready()."""
        if not self._chunks:
            return b""
        # Many small writes queued behind a slow consumer go out as one piece.
        parts = [self._chunks.popleft()]
        total = len(parts[0])
        while self._chunks and total + len(self._chunks[0]) <= READ_CHUNK:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            total += len(chunk)
        self._size -= total
        if self._paused and self._size <= _LOW_WATER and self.pipe is not None:
            self._paused = False
            self.pipe.resume_reading()
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _BackstopExpired(Exception):
    """Raised inside :class:`_Run` when ``ExecSpec.timeout_s`` plus the backstop has
    passed. Private, so it cannot be confused with anything the callback raises."""


class _Run:
    """One started process: pumps its output to the callback, then reports how it ended."""

    def __init__(
        self,
        child: ChildProcess,
        buffers: dict[int, _PipeBuffer],
        write: OutputCallback,
        timings: ProcessTimings,
        logger: logging.Logger,
        run_blocking: RunBlocking,
        deadline: Optional[float],
    ) -> None:
        self._child = child
        self._buffers = buffers
        self._write = write
        self._timings = timings
        self._logger = logger
        self._run_blocking = run_blocking
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._pid: int = child.pid
        if self._pid <= 1:
            # killpg(0) would signal our own group; never let that happen.
            child.close()
            raise transport_error(f"unexpected child pid {self._pid}")
        self._pumps: list[asyncio.Task[None]] = []

    async def supervise(self) -> ExecResult:
        exited = self._child.exited
        try:
            self._pumps = [
                self._loop.create_task(self._pump(self._buffers[1], "stdout")),
                self._loop.create_task(self._pump(self._buffers[2], "stderr")),
            ]
            pending: set[asyncio.Future[Any]] = {exited, *self._pumps}
            while pending:
                limit = None if self._deadline is None else self._deadline - self._loop.time()
                if limit is not None and limit <= 0:
                    raise _BackstopExpired()
                done, pending = await asyncio.wait(
                    pending, timeout=limit, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is not exited:
                        task.result()  # a failing callback ends the command
        except BaseException:
            await self._terminate()
            raise
        finally:
            self._discard_pumps()
            self._child.close()
        returncode = self._child.returncode
        if returncode is None:  # cannot happen once the exit has been seen
            raise transport_error(f"exit status of pid {self._pid} is unknown")
        return exec_result(returncode)

    async def _pump(self, buffer: _PipeBuffer, stream: str) -> None:
        # While the process runs we wait on the pipe as long as it takes. After it exits,
        # whatever it wrote is already in the pipe and arrives without waiting; a read
        # that has to wait is waiting on some background process that inherited the pipe,
        # so each pump gets exit_grace_s of such waiting in total, then stops. Time spent
        # in a slow callback does not count, so the process's own output is never cut short.
        exited = self._child.exited
        budget = self._timings.exit_grace_s
        while True:
            if not buffer.ready():
                started = self._loop.time()
                while not buffer.ready():
                    if not exited.done():
                        await asyncio.wait(
                            {buffer.changed(), exited}, return_when=asyncio.FIRST_COMPLETED
                        )
                        continue
                    left = budget - (self._loop.time() - self._since_exit(started))
                    if left <= 0:
                        self._logger.info(
                            "pid %d exited but a background process still holds its %s "
                            "open; not waiting for it",
                            self._pid,
                            stream,
                        )
                        return
                    await asyncio.wait({buffer.changed()}, timeout=left)
                if exited.done():
                    budget -= self._loop.time() - self._since_exit(started)
            chunk = buffer.take()
            if not chunk:
                return
            await self._write(stream, chunk)

    def _since_exit(self, started: float) -> float:
        # Only waiting after the exit counts against the grace period.
        exited_at = self._child.exited_at
        return started if exited_at is None else max(started, exited_at)

    async def _terminate(self) -> None:
        """Stop the whole process group: SIGTERM, a grace period, SIGKILL, then reap."""
        try:
            self._signal_group(signal.SIGTERM)
            if not await self._wait_group_gone(self._timings.term_grace_s):
                # The leader, or members that ignore SIGTERM, still run. Not sent once the
                # group is known empty: its id is free for reuse from then on.
                self._signal_group(signal.SIGKILL)
            if not await _wait_done(self._child.exited, self._timings.reap_timeout_s):
                self._logger.warning(
                    "pid %d did not exit %.0f s after SIGKILL; leaving it to the child watcher",
                    self._pid,
                    self._timings.reap_timeout_s,
                )
        except asyncio.CancelledError:
            # Cancelled again while stopping (e.g. shutdown): no more patience.
            self._signal_group(signal.SIGKILL)
            raise

    async def _wait_group_gone(self, timeout_s: float) -> bool:
        deadline = self._loop.time() + timeout_s
        if not await _wait_done(self._child.exited, timeout_s):
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
    write: OutputCallback,
    *,
    timings: Optional[ProcessTimings] = None,
    logger: Optional[logging.Logger] = None,
    run_blocking: Optional[RunBlocking] = None,
) -> ExecResult:
    """Run ``spec`` on this host, passing its output to ``write`` as it arrives.

    The process runs in a new session with this process's environment minus
    :data:`~fleetbus_agent.ops.environment.SECRET_ENV_VARS`, plus ``spec.env``.

    Raises :class:`OpError` (``not_found``, ``invalid_request``, ``transport_error``)
    when the process cannot be started, and ``timeout`` when it runs past
    ``spec.timeout_s`` plus ``timings.timeout_backstop_s``. On cancellation, or any
    failure such as ``write`` raising, the whole process group is stopped (SIGTERM,
    ``timings.term_grace_s``, SIGKILL) and reaped before the exception propagates.
    ``run_blocking`` (default: :func:`~fleetbus_agent.ops.blocking.default_run_blocking`)
    runs the /proc scans that check whether the group is gone.
    """
    argv = command_line(spec)
    _check_spec(spec)
    timings = timings if timings is not None else ProcessTimings()
    loop = asyncio.get_running_loop()
    env = spawn_environment(spec.env)
    buffers = {1: _PipeBuffer(), 2: _PipeBuffer()}
    try:
        child = ChildProcess.start(
            argv,
            cwd=spec.cwd,
            env=env,
            stdin=None if spec.stdin is None else bytes(spec.stdin),
            on_output=lambda fd, data: buffers[fd].feed(data),
            on_eof=lambda fd: buffers[fd].feed_eof(),
        )
    except (OSError, ValueError, TypeError) as exc:
        path = (env if env is not None else os.environ).get("PATH", os.defpath)
        raise spawn_error(exc, argv, spec.cwd, path) from exc
    for fd, buffer in buffers.items():
        buffer.pipe = child.readers[fd]
    deadline = None
    if spec.timeout_s is not None:
        deadline = loop.time() + spec.timeout_s + timings.timeout_backstop_s
    run = _Run(
        child,
        buffers,
        write,
        timings,
        logger if logger is not None else log,
        resolve_run_blocking(run_blocking),
        deadline,
    )
    try:
        return await run.supervise()
    except _BackstopExpired:
        raise timeout(f"command ran past its {spec.timeout_s:g} s time limit") from None
