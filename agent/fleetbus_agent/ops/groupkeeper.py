"""A command's processes do not outlive the process that started them unobserved.

Each command runs in a process group of its own (``start_new_session``). When the
process running commands (a fleetbus worker, an agent) is killed with SIGKILL, nothing
of it runs to kill those groups, and a command would run on, its output unread, its
result never reported. ``PR_SET_PDEATHSIG`` alone does not close that gap: it reaches
only the direct child (a shell's children live on), it must be set between fork and
exec (a ``preexec_fn``, which makes CPython fork instead of vfork for every command),
and it fires when the *thread* that forked exits.

So one small keeper process per parent holds the list of live command groups: the
parent writes ``+<pgid>`` when it starts a command and ``-<pgid>`` when it is done with
it, on a pipe only the parent holds. When the parent dies, by any signal, the kernel
closes that pipe; the keeper reads end of file, sends SIGKILL to every group still
listed and exits. The keeper also asks for ``PR_SET_PDEATHSIG`` (SIGTERM) on itself
through ``prctl`` (Linux; elsewhere end of file alone), so it hears of the parent's
death even if something else held the pipe open, and checks that its parent really
changed before acting on it. A group's id is its leader's pid, which the kernel does
not reuse while any member of the group remains, so the keeper kills only what the
command started.

Costs per command: two writes of a few bytes. The keeper is started once, with
:func:`enable` (the ``local`` transport does, at start); a keeper that died is started
again on the next write and told every live group. Standard library only, Python 3.9+.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import Optional, Set

log = logging.getLogger(__name__)

# Run with `python -c`: no import path needed, so it works from the agent's zipapp too.
_KEEPER = r"""
import ctypes, os, signal, sys
parent = int(sys.argv[1])
groups = set()

def kill_all():
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)

def on_term(signum, frame):
    # PDEATHSIG also fires when the forking thread ends: act only if the parent is gone.
    if os.getppid() != parent:
        kill_all()

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.platform.startswith("linux"):
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass
if os.getppid() != parent:  # the parent died before we asked
    kill_all()
for line in sys.stdin.buffer:
    line = line.strip()
    try:
        pgid = int(line[1:])
    except ValueError:
        continue
    if pgid <= 1:
        continue
    if line[:1] == b"+":
        groups.add(pgid)
    else:
        groups.discard(pgid)
kill_all()
"""


class GroupKeeper:
    """The parent's end: the keeper process and the groups it was told of."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._fd = -1
        self._groups: Set[int] = set()
        self._lock = threading.Lock()  # the agent and local may start processes from threads
        self.users = 0

    @property
    def pid(self) -> Optional[int]:
        """The keeper's pid while it runs (for tests and logs)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._spawn()

    def stop(self) -> None:
        """Close the pipe: the keeper kills the groups still listed (none, after a clean
        stop) and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
            fd, self._fd = self._fd, -1
            self._groups.clear()
        if fd >= 0:
            os.close(fd)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def add(self, pgid: int) -> None:
        with self._lock:
            if self._proc is None:
                return
            self._groups.add(pgid)
            self._write(b"+%d\n" % pgid)

    def remove(self, pgid: int) -> None:
        with self._lock:
            if self._proc is None or pgid not in self._groups:
                return
            self._groups.discard(pgid)
            self._write(b"-%d\n" % pgid)

    def _spawn(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        read_fd, write_fd = os.pipe()  # both close-on-exec: no command inherits the write end
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _KEEPER, str(os.getpid())],
                stdin=read_fd, stdout=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        # Never block the caller's event loop on a keeper that stopped reading: a full
        # pipe drops the line (logged), the command itself goes on.
        os.set_blocking(write_fd, False)
        self._fd = write_fd
        if self._groups:
            self._write(b"".join(b"+%d\n" % pgid for pgid in self._groups), respawn=False)

    def _write(self, data: bytes, respawn: bool = True) -> None:
        try:
            os.write(self._fd, data)
        except BlockingIOError:
            log.warning("the process-group keeper is not reading; a command may outlive this process")
        except OSError:
            if not respawn:
                raise
            # The keeper died (EPIPE): a new one, told of every live group.
            log.warning("the process-group keeper died; starting it again")
            self._spawn()


_keeper = GroupKeeper()


def enable() -> None:
    """Start the keeper for this process (counted: each :func:`enable` wants a :func:`disable`)."""
    if os.name != "posix":
        return
    _keeper.users += 1
    _keeper.start()


def disable() -> None:
    """Stop the keeper once the last user is done."""
    if os.name != "posix" or _keeper.users == 0:
        return
    _keeper.users -= 1
    if _keeper.users == 0:
        _keeper.stop()


def started(pgid: int) -> None:
    """A command's group exists (its leader's pid); no-op unless enabled."""
    _keeper.add(pgid)


def finished(pgid: int) -> None:
    """The parent is done with the group (reaped and, if need be, killed)."""
    _keeper.remove(pgid)


def keeper_pid() -> Optional[int]:
    """The keeper's pid, None when not running."""
    return _keeper.pid
