"""A command's processes do not outlive the process that started them unobserved.

Each command runs in a process group of its own (``start_new_session``). When the
process running commands (a fleetbus worker, an agent) is killed with SIGKILL, nothing
of it runs to kill those groups, and a command would run on, its output unread, its
result never reported. ``PR_SET_PDEATHSIG`` alone does not close that gap: it reaches
only the direct child (a shell's children live on), it must be set between fork and
exec (a ``preexec_fn``, which makes CPython fork instead of vfork for every command),
and it fires when the *thread* that forked exits.

So one small keeper process per parent knows the live command groups: the parent
writes each one's pgid into a slot of a small shared memory file (a memfd) when it
starts a command and clears the slot when it is done with it: two stores to memory, no
system call and no wakeup per command. The keeper blocks reading a pipe that only the
parent holds open. When the parent dies, by any signal, the kernel closes that pipe;
the keeper reads end of file, sends SIGKILL to every group still in a slot and exits.
The keeper also asks for ``PR_SET_PDEATHSIG`` (SIGTERM) on itself through ``prctl``
(Linux; elsewhere end of file alone), so it hears of the parent's death even if
something else held the pipe open, and checks that its parent really changed before
acting on it. A group's id is its leader's pid, which the kernel does not reuse while
any member of the group remains, so the keeper kills only what the command started.

The keeper is started once, with :func:`enable` (the ``local`` transport does, at
start); a keeper that died is started again on the next command, on the same slots.
Standard library only, Python 3.9+.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    import mmap

# mmap and tempfile are imported when the keeper starts, not with this module: every
# agent imports it (ops/child.py), and tempfile alone brings random, shutil and lzma
# into an idle agent that may never run a command (tests/test_agent_memory.py).

log = logging.getLogger(__name__)

#: Commands running at once that the keeper can hold; past this a command still runs,
#: unguarded, and a warning is logged once.
SLOTS = 16384
_SLOT = struct.Struct("=i")

# Run with `python -c`: no import path needed, so it works from the agent's zipapp too.
_KEEPER = r"""
import ctypes, mmap, os, signal, struct, sys
parent, fd, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
slots = mmap.mmap(fd, size)

def kill_all():
    for (pgid,) in struct.iter_unpack("=i", slots):
        if pgid > 1:
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
while os.read(0, 4096):  # the parent never writes: this returns at its death
    pass
kill_all()
"""


def _shared_file(size: int) -> int:
    """A file of ``size`` zero bytes only this process and its keeper can reach."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("fleetbus-groups", os.MFD_CLOEXEC)
    else:
        import tempfile

        with tempfile.TemporaryFile() as handle:  # unlinked at once
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, size)
    return fd


class GroupKeeper:
    """The parent's end: the keeper process and the slots of the groups it guards."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._pipe = -1  # our write end: closed by our death
        self._file = -1
        self._slots: Optional[mmap.mmap] = None
        self._used: Dict[int, int] = {}  # pgid -> slot
        self._free: List[int] = []
        self._next = 0
        self._full_logged = False
        self._lock = threading.Lock()  # the agent and local may start processes from threads
        self.users = 0

    @property
    def pid(self) -> Optional[int]:
        """The keeper's pid while it runs (for tests and logs)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        with self._lock:
            if self._slots is None:
                import mmap

                self._file = _shared_file(SLOTS * _SLOT.size)
                self._slots = mmap.mmap(self._file, SLOTS * _SLOT.size)
            if self._proc is None or self._proc.poll() is not None:
                self._spawn()

    def stop(self) -> None:
        """Clear every slot and let the keeper go: it exits with nothing to kill."""
        with self._lock:
            proc, self._proc = self._proc, None
            if self._slots is not None:
                self._slots[:] = bytes(len(self._slots))
                self._slots.close()
                self._slots = None
            for fd in (self._pipe, self._file):
                if fd >= 0:
                    os.close(fd)
            self._pipe = self._file = -1
            self._used.clear()
            self._free.clear()
            self._next = 0
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def add(self, pgid: int) -> None:
        with self._lock:
            if self._slots is None or pgid <= 1:
                return
            if self._proc is None or self._proc.returncode is not None:
                self._spawn()  # it died (or was killed): a new one, on the same slots
            if self._free:
                slot = self._free.pop()
            elif self._next < SLOTS:
                slot, self._next = self._next, self._next + 1
            else:
                if not self._full_logged:
                    log.warning("%d commands run at once: the ones past that are not killed "
                                "if this process dies", SLOTS)
                    self._full_logged = True
                return
            _SLOT.pack_into(self._slots, slot * _SLOT.size, pgid)
            self._used[pgid] = slot

    def remove(self, pgid: int) -> None:
        with self._lock:
            slot = self._used.pop(pgid, None)
            if slot is None or self._slots is None:
                return
            _SLOT.pack_into(self._slots, slot * _SLOT.size, 0)
            self._free.append(slot)

    def _spawn(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.poll()
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        read_fd, write_fd = os.pipe()  # both close-on-exec: no command inherits the write end
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _KEEPER, str(os.getpid()), str(self._file),
                 str(SLOTS * _SLOT.size)],
                stdin=read_fd, stdout=subprocess.DEVNULL, pass_fds=(self._file,),
                start_new_session=True)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._pipe = write_fd
        # Seen when the keeper exits, without a waitpid per command: a pidfd or thread
        # would cost more than this keeper saves; the next add() notices a returncode.
        threading.Thread(target=self._reap, args=(self._proc,), name="fleetbus-groupkeeper",
                         daemon=True).start()

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        if proc.returncode not in (0, None):
            log.warning("the process-group keeper ended (%s); it is started again on the next "
                        "command", proc.returncode)


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
