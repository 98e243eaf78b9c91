"""A started child process, driven straight from the event loop.

asyncio's subprocess transport takes about 17 event-loop iterations to start ``true``,
connect its pipes and see it exit (a task to connect the pipes, a waiter per pipe, a
call_soon per event), and half a millisecond of CPU on top of the fork itself; for a
short command that is most of what ``exec`` costs. Here the process is started with
:class:`subprocess.Popen` (vfork and exec, as asyncio does), its pipes are read with
``loop.add_reader`` on non-blocking file descriptors, and its exit is seen through a
pidfd (Linux 5.3+) or, where there is none, a thread blocked in ``waitpid`` for it.
For ``true`` that is the cost of the spawn plus a loop iteration or two.

Only the pid we started is ever waited for (``waitpid(pid)``, never ``-1``), so
asyncio's own child watchers and other code that runs processes are undisturbed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

from . import executables, groupkeeper

if TYPE_CHECKING:
    from .runas import RunAs

log = logging.getLogger(__name__)

PIPE_READ_SIZE = 256 * 1024
"""The most one read of an output pipe takes (what asyncio's pipe transport reads)."""

# The status asyncio reports for a child someone else reaped; we do the same.
_UNKNOWN_STATUS = 255

_pidfds: Optional[bool] = None


def _pidfds_usable() -> bool:
    global _pidfds
    if _pidfds is None:
        from .childwatch import pidfd_usable

        _pidfds = pidfd_usable()
    return _pidfds


_devnull_fd = -1


def _devnull() -> int:
    """One /dev/null kept open for every child's stdin (subprocess's DEVNULL opens and
    closes it again for each process)."""
    global _devnull_fd
    if _devnull_fd < 0:
        _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd


def _popen(argv: list[str], stdin: int, stdout: int, stderr: int, cwd: Optional[str],
           env: Optional[Mapping[str, str]], run_as: Optional[RunAs]) -> subprocess.Popen[bytes]:
    # A command named without a path is started from where executables.resolve found
    # it (argv[0] stays the name); if that file has gone since, the search runs again.
    # Not for another user: our search would find files that we may run and that user
    # may not, where the child's own search (as that user) goes on to the next directory.
    executable = executables.resolve(argv[0], env) if argv and run_as is None else None
    options: dict[str, Any] = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "cwd": cwd, "env": env,
               "start_new_session": True}
    if run_as is not None:
        # The child drops to the user between fork and exec (groups, gid, then uid).
        # CPython then forks instead of vforking, which costs a little more per start.
        options.update(run_as.popen_options())
    try:
        return subprocess.Popen(argv, executable=executable, **options)
    except FileNotFoundError as exc:
        if executable is None or exc.filename != executable:
            raise
        executables.forget(argv[0], env)
        return subprocess.Popen(argv, **options)


class PipeReader:
    """The read end of one output pipe: hands what arrives to ``on_data``, then calls
    ``on_eof`` once (also after a read error, which ends the stream the same way).

    ``pause_reading``/``resume_reading`` are the flow control asyncio's read transports
    offer, so a slow consumer makes the process block in write() instead of filling
    our memory.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._fd: Optional[int] = fd
        self._on_data = on_data
        self._on_eof = on_eof
        self._reading = False
        os.set_blocking(fd, False)
        self.resume_reading()

    def pause_reading(self) -> None:
        if self._reading and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and self._fd is not None:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True

    def _read_ready(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, PIPE_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("reading a child's output failed: %s", exc)
            data = b""
        if data:
            self._on_data(data)
            return
        self.close()
        self._on_eof()

    def close(self) -> None:
        """Stop reading and close our end (the writer then gets EPIPE). Idempotent."""
        self.pause_reading()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class PipeWriter:
    """The write end of the child's stdin: writes ``data`` as the child reads it, then
    closes, so end of file follows the last byte. If the child exits or closes its
    stdin first, the rest is dropped quietly."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
        self._loop = loop
        self._fd: Optional[int] = fd
        self._data = memoryview(data)
        self._waiting = False
        os.set_blocking(fd, False)
        self._write_ready()

    def _write_ready(self) -> None:
        while self._fd is not None and self._data:
            try:
                written = os.write(self._fd, self._data)
            except (BlockingIOError, InterruptedError):
                if not self._waiting:
                    self._loop.add_writer(self._fd, self._write_ready)
                    self._waiting = True
                return
            except OSError:  # EPIPE and the like: the child is not reading any more
                break
            self._data = self._data[written:]
        self.close()

    def close(self) -> None:
        """Stop writing and close our end. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._waiting:
            self._loop.remove_writer(fd)
            self._waiting = False
        self._data = memoryview(b"")
        os.close(fd)


class ChildProcess:
    """One child process: its pid, its output pipes, and a future for its exit.

    Create it with :meth:`start`. ``exited`` completes once the process has been reaped;
    ``returncode`` is then its exit status, or ``-N`` for death by signal ``N`` (as
    asyncio reports it). :meth:`close` stops reading and writing; a process still
    running at that moment is sent SIGKILL, and is reaped whenever it ends.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        on_output: Callable[[int, bytes], None],
        on_eof: Callable[[int], None],
        on_exit: Callable[[], None],
        stdout_fd: int,
        stderr_fd: int,
        stdin: Optional[tuple[int, bytes]],
    ) -> None:
        self._loop = loop
        self._on_exit = on_exit
        # Kept until reaped: a Popen collected while its child runs would reap it from
        # subprocess's own cleanup list and take the exit status from us.
        self._popen: Optional[subprocess.Popen[bytes]] = popen
        self.pid: int = popen.pid
        self.returncode: Optional[int] = None
        self.exited: asyncio.Future[None] = loop.create_future()
        self.exited_at: Optional[float] = None
        self.readers = {
            1: PipeReader(loop, stdout_fd, lambda data: on_output(1, data), lambda: on_eof(1)),
            2: PipeReader(loop, stderr_fd, lambda data: on_output(2, data), lambda: on_eof(2)),
        }
        self._writer = PipeWriter(loop, *stdin) if stdin is not None else None
        self._watch_exit()

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: Optional[str],
        env: Optional[Mapping[str, str]],
        stdin: Optional[bytes],
        on_output: Callable[[int, bytes], None],
        on_eof: Callable[[int], None],
        on_exit: Callable[[], None],
        run_as: Optional[RunAs] = None,
    ) -> ChildProcess:
        """Start ``argv`` in a new session, stdout and stderr to pipes read in the event
        loop, stdin from ``stdin`` (``None``: /dev/null), as ``run_as`` (``None``: as
        ourselves).

        ``on_output(fd, data)`` gets what fd 1 or 2 wrote; ``on_eof(fd)`` is called once
        per pipe when it closes; ``on_exit()`` once the process has been reaped. All
        three run in the event loop, called directly (not scheduled) as the events are
        seen. ``env`` None means ours. Raises what ``Popen`` raises
        when the process cannot be started (OSError naming the program or the cwd,
        ValueError, TypeError); nothing is left open then.
        """
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe()
            fds += (out_r, out_w)
            err_r, err_w = os.pipe()
            fds += (err_r, err_w)
            in_r = in_w = -1
            if stdin is not None:
                in_r, in_w = os.pipe()
                fds += (in_r, in_w)
            popen = _popen(list(argv), in_r if stdin is not None else _devnull(), out_w, err_w, cwd, env,
                           run_as)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # The child holds its own copies; ours would keep its pipes from ever closing.
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)
        # Its group (pgid = pid: a new session) is killed if we die (groupkeeper.py).
        groupkeeper.started(popen.pid)
        return cls(loop, popen, on_output, on_eof, on_exit, out_r, err_r,
                   (in_w, stdin) if stdin is not None else None)

    def close(self) -> None:
        """Stop reading and writing the pipes. A process still running is sent SIGKILL;
        it is reaped whenever it ends. Idempotent."""
        for reader in self.readers.values():
            reader.close()
        if self._writer is not None:
            self._writer.close()
        if self.returncode is None:
            # Unreaped, so the pid is still this process's and cannot have been reused.
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        groupkeeper.finished(self.pid)

    # exit ----------------------------------------------------------------------------
    def _watch_exit(self) -> None:
        if _pidfds_usable():
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:  # out of descriptors, say: a thread does the same job
                pass
            else:
                self._loop.add_reader(pidfd, self._pidfd_ready, pidfd)
                return
        threading.Thread(target=self._wait_in_thread, name=f"fleetbus-waitpid-{self.pid}",
                         daemon=True).start()

    def _pidfd_ready(self, pidfd: int) -> None:
        # A pidfd becomes readable when the process exits; it is reaped below.
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, None
        if pid == 0:  # cannot happen once the pidfd is readable; wait the slow way
            threading.Thread(target=self._wait_in_thread, name=f"fleetbus-waitpid-{self.pid}",
                             daemon=True).start()
            return
        self._reaped(status)

    def _wait_in_thread(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = None
        try:
            self._loop.call_soon_threadsafe(self._reaped, status)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _reaped(self, status: Optional[int]) -> None:
        if status is None:
            log.warning("child process %d was reaped elsewhere; its exit status is unknown",
                        self.pid)
            self.returncode = _UNKNOWN_STATUS
        else:
            self.returncode = os.waitstatus_to_exitcode(status)
        if self._popen is not None:
            self._popen.returncode = self.returncode  # so it never waits for the pid again
            self._popen = None
        self.exited_at = self._loop.time()
        if not self.exited.done():
            self.exited.set_result(None)
        self._on_exit()
