"""Running one process for ``exec``.

The process is started in a session (and so a process group) of its own, so that
stopping it means stopping everything it started, not only the immediate child.

The process itself is a :class:`~fleetbus_base.ops.child.ChildProcess` (started and
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
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..text import shorten
from .blocking import RunBlocking, resolve_run_blocking
from .child import ChildProcess, PipeReader
from .environment import child_environment, spawn_environment
from .errors import OpError, invalid_request, not_found, timeout, transport_error
from .specs import ExecResult, ExecSpec

if TYPE_CHECKING:
    from .runas import RunAs

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


def _shown(value: object) -> str:
    return shorten(repr(value), 200)


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
        self.eof = False
        self._paused = False

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

    def feed_eof(self) -> None:
        self.eof = True

    def __bool__(self) -> bool:
        """Whether output is waiting to be taken."""
        return bool(self._chunks)

    def done(self) -> bool:
        """Whether the pipe is closed and everything from it was taken."""
        return self.eof and not self._chunks

    def take(self) -> bytes:
        """Up to READ_CHUNK queued bytes. Call only when the buffer is true."""
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
    """One started process: passes its output to the callback, then reports how it ended.

    One coroutine does all of it, woken through a single future by whatever the child
    does (output, end of file, exit): no task per pipe and no ``asyncio.wait`` per
    event, because for a short command those hops cost more than the command.
    """

    def __init__(
        self,
        write: OutputCallback,
        timings: ProcessTimings,
        logger: logging.Logger,
        run_blocking: RunBlocking,
        deadline: Optional[float],
    ) -> None:
        self._write = write
        self._timings = timings
        self._logger = logger
        self._run_blocking = run_blocking
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self.buffers = {1: _PipeBuffer(), 2: _PipeBuffer()}
        self._waiter: Optional[asyncio.Future[None]] = None
        self._expired = False
        self._child: Optional[ChildProcess] = None
        self._pid = 0

    # What the child calls, from the event loop, as things happen.
    def on_output(self, fd: int, data: bytes) -> None:
        self.buffers[fd].feed(data)
        self._poke()

    def on_eof(self, fd: int) -> None:
        self.buffers[fd].feed_eof()
        # Until the child has exited and both pipes are at their end, an end of file
        # changes nothing the loop in _pass_output waits for: waking it would cost a task
        # step per pipe for nothing (two of the three wake-ups of every short command).
        child = self._child
        if child is not None and child.exited.done() and all(b.eof for b in self.buffers.values()):
            self._poke()

    def on_exit(self) -> None:
        self._poke()

    def _poke(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout_s: Optional[float]) -> None:
        """Until the child next does something, or ``timeout_s`` passes."""
        waiter = self._waiter = self._loop.create_future()
        timer = None if timeout_s is None else self._loop.call_later(timeout_s, _settle, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def supervise(self, child: ChildProcess) -> ExecResult:
        self._child = child
        self._pid = child.pid
        if self._pid <= 1:
            # killpg(0) would signal our own group; never let that happen.
            child.close()
            raise transport_error(f"unexpected child pid {self._pid}")
        for fd, buffer in self.buffers.items():
            buffer.pipe = child.readers[fd]
        task = asyncio.current_task()
        assert task is not None
        cancels_before = _cancelling(task)
        timer = None
        if self._deadline is not None:
            # The backstop interrupts whatever we wait on, a slow consumer's write included.
            timer = self._loop.call_at(self._deadline, self._expire, task)
        try:
            try:
                await self._pass_output()
            finally:
                if timer is not None:
                    timer.cancel()
        except asyncio.CancelledError:
            await self._terminate()
            if self._expired and _uncancel(task) <= cancels_before:
                raise _BackstopExpired() from None  # our own cancellation, and only ours
            raise
        except BaseException:
            await self._terminate()
            raise
        finally:
            child.close()
        returncode = child.returncode
        if returncode is None:  # cannot happen once the exit has been seen
            raise transport_error(f"exit status of pid {self._pid} is unknown")
        return exec_result(returncode)

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._expired = True
        task.cancel()

    async def _pass_output(self) -> None:
        # While the process runs we wait as long as it takes. After it exits, whatever it
        # wrote is already in its pipes and arrives without waiting; waiting longer means
        # waiting on a background process that inherited a pipe, so such waiting gets
        # exit_grace_s in all, then we stop. Time spent in a slow callback does not count,
        # so the process's own output is never cut short.
        assert self._child is not None
        exited = self._child.exited
        out, err = self.buffers[1], self.buffers[2]
        grace = self._timings.exit_grace_s
        while True:
            # One chunk from each stream in turn, so neither starves the other.
            if out:
                await self._write("stdout", out.take())
            if err:
                await self._write("stderr", err.take())
            if out or err:
                continue
            if exited.done() and out.done() and err.done():
                return
            if not exited.done():
                await self._wait(None)
                continue
            if grace <= 0:
                for name, buffer in (("stdout", out), ("stderr", err)):
                    if not buffer.done():
                        self._logger.info(
                            "pid %d exited but a background process still holds its %s "
                            "open; not waiting for it",
                            self._pid,
                            name,
                        )
                return
            started = self._loop.time()
            await self._wait(grace)
            grace -= self._loop.time() - started

    async def _terminate(self) -> None:
        """Stop the whole process group: SIGTERM, a grace period, SIGKILL, then reap."""
        assert self._child is not None
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
        assert self._child is not None
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


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _cancelling(task: asyncio.Task[Any]) -> int:
    # Task.cancelling/uncancel exist from Python 3.11; before that nothing counts.
    cancelling = getattr(task, "cancelling", None)
    return cancelling() if cancelling is not None else 0


def _uncancel(task: asyncio.Task[Any]) -> int:
    uncancel = getattr(task, "uncancel", None)
    return uncancel() if uncancel is not None else 0


async def run_process(
    spec: ExecSpec,
    write: OutputCallback,
    *,
    timings: Optional[ProcessTimings] = None,
    logger: Optional[logging.Logger] = None,
    run_blocking: Optional[RunBlocking] = None,
    run_as: Optional[RunAs] = None,
) -> ExecResult:
    """Run ``spec`` on this host, passing its output to ``write`` as it arrives.

    The process runs in a new session with this process's environment minus
    :data:`~fleetbus_base.ops.environment.SECRET_ENV_VARS`, plus ``spec.env``.
    With ``run_as`` it runs as that user (only a process running as root may ask for
    another user): HOME, USER and LOGNAME are that user's unless ``spec.env`` sets them,
    and without ``spec.cwd`` it starts in :meth:`RunAs.default_cwd`.

    Raises :class:`OpError` (``not_found``, ``invalid_request``, ``transport_error``)
    when the process cannot be started, and ``timeout`` when it runs past
    ``spec.timeout_s`` plus ``timings.timeout_backstop_s``. On cancellation, or any
    failure such as ``write`` raising, the whole process group is stopped (SIGTERM,
    ``timings.term_grace_s``, SIGKILL) and reaped before the exception propagates.
    ``run_blocking`` (default: :func:`~fleetbus_base.ops.blocking.default_run_blocking`)
    runs the /proc scans that check whether the group is gone.
    """
    argv = command_line(spec)
    _check_spec(spec)
    timings = timings if timings is not None else ProcessTimings()
    loop = asyncio.get_running_loop()
    cwd = spec.cwd
    if run_as is None:
        env = spawn_environment(spec.env)
    else:
        env = child_environment({**run_as.environment(), **spec.env})
        if cwd is None:
            cwd = run_as.default_cwd()
    deadline = None
    if spec.timeout_s is not None:
        deadline = loop.time() + spec.timeout_s + timings.timeout_backstop_s
    run = _Run(
        write,
        timings,
        logger if logger is not None else log,
        resolve_run_blocking(run_blocking),
        deadline,
    )
    try:
        child = ChildProcess.start(
            argv,
            cwd=cwd,
            env=env,
            stdin=None if spec.stdin is None else bytes(spec.stdin),
            on_output=run.on_output,
            on_eof=run.on_eof,
            on_exit=run.on_exit,
            run_as=run_as,
        )
    except (OSError, ValueError, TypeError) as exc:
        path = (env if env is not None else os.environ).get("PATH", os.defpath)
        raise spawn_error(exc, argv, cwd, path) from exc
    try:
        return await run.supervise(child)
    except _BackstopExpired:
        raise timeout(f"command ran past its {spec.timeout_s:g} s time limit") from None
