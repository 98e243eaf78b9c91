"""``put`` and ``get`` for ``local`` as another user: opened by a helper running as that user.

Whether a user may read or write a path is the kernel's decision (permissions along the
path, ACLs, sticky directories, mounts, security modules); copying that logic into
fleetbus would get some of it wrong. Switching this process's ids while it opens a file
is not an option either: ``setresuid`` applies to every thread of a process (glibc makes
it so), and a worker runs many threads. So each ``get`` or ``put`` starts a small helper
(:mod:`fleetbus_local.filehelper`) already switched to the user, which opens the file (or
creates the temporary file, and later renames it into place) and hands the descriptor
back over a socket. fleetbus reads or writes the bytes through that descriptor itself,
so a large file costs no more than as ourselves; the helper costs one process start
(20-40 ms measured here) per operation.

Files a ``put`` creates are therefore owned by the user, and everything it may not
reach fails with "permission denied", as it would for that user at a shell.

An ``exec`` with a ``cwd`` needs the helper too. subprocess enters the working
directory before it drops to the user, that is as root, which would let the command
start inside a folder the user could never reach (one under a 0700 parent) and read
what lies there. So the helper enters the folder as the user and hands back a
descriptor of it, and the child enters it through ``/proc/self/fd/N``: the very folder
the user was allowed into, with no window for the path to change in between.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any

from fleetbus_base import ops
from fleetbus_base.ops.errors import OpError, invalid_request, not_found, transport_error
from fleetbus_base.ops.files import check_path, consume_outcome, shown_path, write_all, write_in_batches
from fleetbus_base.ops.runas import RunAs
from fleetbus_base.pagecache import DropBehind

HELPER_TIMEOUT_S = 60.0
"""How long one answer of the helper may take (a path on a hung network mount)."""

_MAX_MESSAGE = 65536


@cache
def _helper_source() -> str:
    return (Path(__file__).parent / "filehelper.py").read_text()


class _Helper:
    """One helper process as ``run_as`` and our end of its socket. Blocking methods:
    call them through ``run_blocking``."""

    def __init__(self, run_as: RunAs) -> None:
        self.run_as = run_as
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-X", "utf8", "-c", _helper_source()],
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={"PATH": os.defpath}, cwd="/", **run_as.popen_options(),
            )
        except OSError as exc:
            ours.close()
            raise transport_error(
                f"cannot start the file helper as {run_as}: {exc.strerror or exc}"
            ) from exc
        finally:
            theirs.close()
        ours.settimeout(HELPER_TIMEOUT_S)
        self.sock = ours
        self._closed = False

    def ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Send ``request``; the answer and the descriptor attached to it, if any."""
        try:
            self.sock.send(json.dumps(request).encode())
            data, fds, _, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, 1)
        except TimeoutError:
            self.close()
            raise transport_error(
                f"the file helper running as {self.run_as} did not answer within "
                f"{HELPER_TIMEOUT_S:g} s"
            ) from None
        except OSError:  # the helper is gone (EPIPE, ECONNRESET): its stderr says why
            data, fds = b"", []
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if fd is not None:
            os.set_inheritable(fd, False)  # recvmsg does not set close-on-exec
        if not data:
            if fd is not None:
                os.close(fd)
            raise transport_error(f"the file helper running as {self.run_as} failed: {self._stderr()}")
        return json.loads(data), fd

    def _stderr(self) -> str:
        err = self.close()
        lines = err.decode(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else f"exit status {self.proc.returncode}"

    def close(self) -> bytes:
        """Close our end (the helper then exits, removing any temporary file), reap it,
        and return what it wrote to stderr. Blocks briefly; idempotent."""
        if self._closed:
            return b""
        self._closed = True
        self.sock.close()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or b""

    def close_soon(self) -> None:
        """:meth:`close` without waiting: for a cancelled operation."""
        self.sock.close()
        threading.Thread(target=self.close, name="fleetbus-local-helper-reap", daemon=True).start()


def _error(answer: dict[str, Any], path: str, run_as: RunAs, make_parents: bool = True,
           writing: bool = False) -> OpError:
    shown = shown_path(path)
    refused = answer.get("refused")
    if refused == "directory":
        return invalid_request(f"is a directory: {shown}")
    if refused == "not_regular":
        return invalid_request(f"not a regular file: {shown}")
    number, step = answer.get("errno"), answer.get("step")
    strerror = answer.get("strerror") or "error"
    if number in (errno.EACCES, errno.EPERM):
        return transport_error(f"permission denied: {shown} (local runs as {run_as.name})")
    if not writing:
        if number in (errno.ENOENT, errno.ENOTDIR):
            return not_found(f"no such file: {shown}")
        return transport_error(f"cannot read {shown}: {strerror}")
    if number in (errno.ENOENT, errno.ENOTDIR) and not make_parents:
        return not_found(f"no such directory: {shown_path(os.path.dirname(path))}")
    if step == "makedirs" and number in (errno.EEXIST, errno.ENOTDIR):
        return invalid_request(
            f"cannot create the parent directories of {shown}: a path component is not a directory"
        )
    return transport_error(f"cannot write {shown}: {strerror}")


def _open_as(run_as: RunAs, path: str) -> tuple[int, os.stat_result]:
    helper = _Helper(run_as)
    try:
        answer, fd = helper.ask({"op": "open", "path": path})
    finally:
        helper.close()
    if not answer.get("ok") or fd is None:
        if fd is not None:
            os.close(fd)
        raise _error(answer, path, run_as)
    try:
        os.set_blocking(fd, True)
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _chdir_as(run_as: RunAs, path: str) -> int:
    helper = _Helper(run_as)
    try:
        answer, fd = helper.ask({"op": "chdir", "path": path})
    finally:
        helper.close()
    if answer.get("ok") and fd is not None:
        return fd
    if fd is not None:
        os.close(fd)
    shown, number = shown_path(path), answer.get("errno")
    if number == errno.ENOENT:
        raise not_found(f"no such working directory: {shown}")
    if number == errno.ENOTDIR:
        raise invalid_request(f"working directory is not a directory: {shown}")
    if number in (errno.EACCES, errno.EPERM):
        raise transport_error(f"permission denied: working directory {shown} (local runs as {run_as.name})")
    raise transport_error(f"cannot enter working directory {shown}: {answer.get('strerror') or 'error'}")


class WorkingDirectory:
    """A command's working directory as entered by ``run_as``; ``path`` is what to pass
    as ``cwd`` while the object is open (``/proc/self/fd/N``). Close it once the process
    has started."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self.path = f"/proc/self/fd/{fd}"

    @classmethod
    async def enter(cls, run_as: RunAs, path: str, run_blocking: ops.RunBlocking) -> WorkingDirectory:
        if not os.path.isdir("/proc/self/fd"):
            raise transport_error("a working directory for another user needs /proc (Linux)")
        if not os.path.isabs(path):
            path = os.path.join(run_as.default_cwd(), path)
        task = asyncio.ensure_future(run_blocking(_chdir_as, run_as, path))
        try:
            return cls(await asyncio.shield(task))
        except asyncio.CancelledError:
            task.add_done_callback(_close_fd)
            raise

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _close_fd(task: asyncio.Future[int]) -> None:
    if not task.cancelled() and task.exception() is None:
        os.close(task.result())


async def get_file_as(run_as: RunAs, path: str, run_blocking: ops.RunBlocking) -> ops.RemoteFile:
    """:func:`fleetbus_base.ops.get_file`, with the file opened as ``run_as``."""
    check_path(path)
    task = asyncio.ensure_future(run_blocking(_open_as, run_as, path))
    try:
        fd, st = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_opened)
        raise
    limit = st.st_size if st.st_size > 0 else None
    file = io.FileIO(fd, "rb", closefd=True)
    return ops.RemoteFile(size=st.st_size, mode=stat.S_IMODE(st.st_mode),
                          chunks=ops.FileChunks(file, path, limit, run_blocking))


def _close_opened(task: asyncio.Future[tuple[int, os.stat_result]]) -> None:
    if not task.cancelled() and task.exception() is None:
        os.close(task.result()[0])


class _PutAs:
    """One ``put`` as ``run_as``: the helper's temporary file, written here, renamed by
    the helper. Mirrors :class:`fleetbus_base.ops.files.AtomicPut`."""

    def __init__(self, run_as: RunAs, spec: ops.PutSpec, run_blocking: ops.RunBlocking) -> None:
        self.run_as = run_as
        self.spec = spec
        self.run_blocking = run_blocking
        self.path = check_path(spec.path)
        if self.path.endswith("/"):
            raise invalid_request(f"path names a directory: {shown_path(self.path)}")
        mode = spec.mode
        if mode is not None and not (isinstance(mode, int) and not isinstance(mode, bool)
                                     and 0 <= mode <= 0o7777):
            raise invalid_request(f"invalid file mode {mode!r} for {shown_path(self.path)}")
        size = spec.size
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise invalid_request(f"invalid size {size!r} for {shown_path(self.path)}")
        self.helper: _Helper | None = None
        self.fd: int | None = None
        self.drop: DropBehind | None = None
        self.inflight: asyncio.Future[Any] | None = None

    def _create(self) -> int:
        self.helper = _Helper(self.run_as)
        answer, fd = self.helper.ask({"op": "create", "path": self.path, "mode": self.spec.mode,
                                      "make_parents": self.spec.make_parents})
        if not answer.get("ok") or fd is None:
            if fd is not None:
                os.close(fd)
            raise _error(answer, self.path, self.run_as, self.spec.make_parents, writing=True)
        self.fd = fd
        self.drop = DropBehind(fd)
        return int(answer["mode"])

    def _write(self, batch: list[bytes]) -> None:
        assert self.fd is not None and self.drop is not None
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        write_all(self.fd, data)
        self.drop.wrote(len(data))

    def _commit(self, batch: list[bytes]) -> int:
        assert self.helper is not None and self.fd is not None
        if batch:
            self._write(batch)
        if self.drop is not None:
            self.drop.finish()
        os.close(self.fd)
        self.fd = None
        answer, fd = self.helper.ask({"op": "commit"})
        if fd is not None:
            os.close(fd)
        if not answer.get("ok"):
            raise _error(answer, self.path, self.run_as, writing=True)
        return int(answer["mode"])

    def _discard(self) -> None:
        # The helper removes its temporary file when our end of the socket closes.
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        helper, self.helper = self.helper, None
        if helper is not None:
            helper.close_soon()

    def _discard_when_idle(self) -> None:
        # A step still running in its thread uses the descriptor: close it after that.
        task = self.inflight
        if task is not None and not task.done():
            task.add_done_callback(lambda done: (consume_outcome(done), self._discard()))
        else:
            self._discard()

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        task = asyncio.ensure_future(self.run_blocking(fn, *args))
        self.inflight = task
        try:
            # Shielded: if we are cancelled the step still finishes in its thread.
            return await asyncio.shield(task)
        except OSError as exc:
            raise transport_error(f"cannot write {shown_path(self.path)}: {exc.strerror or exc}") from exc

    async def run(self, source: AsyncIterator[bytes]) -> ops.FileStat:
        try:
            mode = await self._blocking(self._create)
            received, rest = await write_in_batches(
                source, self.spec.size, self._size_mismatch,
                lambda batch: self._blocking(self._write, batch))
            mode = await self._blocking(self._commit, rest)
        except BaseException:
            self._discard_when_idle()
            raise
        helper, self.helper = self.helper, None
        if helper is not None:
            await self.run_blocking(helper.close)
        return ops.FileStat(size=received, mode=mode)

    def _size_mismatch(self, received: int) -> OpError:
        over = "at least " if self.spec.size is not None and received > self.spec.size else ""
        return transport_error(
            f"size mismatch for {shown_path(self.path)}: expected {self.spec.size} bytes, "
            f"received {over}{received}"
        )


async def put_file_as(run_as: RunAs, spec: ops.PutSpec, source: AsyncIterator[bytes],
                      run_blocking: ops.RunBlocking) -> ops.FileStat:
    """:func:`fleetbus_base.ops.put_file`, with the file created and renamed into place
    as ``run_as`` (so it is owned by that user)."""
    return await _PutAs(run_as, spec, run_blocking).run(source)
