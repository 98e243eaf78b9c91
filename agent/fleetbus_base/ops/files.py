"""Writing and reading files for ``put`` and ``get``.

All file I/O runs through ``run_blocking`` (a thread pool) so a slow disk never stalls
the event loop. A cancelled coroutine cannot stop a thread that is already inside a read
or write, so whenever we give up on one we close its descriptor only after that call has
returned: closing it earlier would let the descriptor number be reused by an unrelated
file while the thread still writes to it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, Optional, TypeVar

from ..pagecache import DropBehind
from ..text import readable, shorten
from .blocking import RunBlocking, resolve_run_blocking
from .errors import OpError, invalid_request, not_found, transport_error
from .specs import FileStat, PutSpec, RemoteFile

T = TypeVar("T")

log = logging.getLogger(__name__)

GET_CHUNK = 1024 * 1024
"""The largest chunk ``get`` yields: one frame to the controller, one NATS message on
to the requester. Each chunk costs a thread-pool hop and a message at every step, so
fewer, larger ones move a large file with measurably less CPU (docs/performance.md)."""

TEMP_PREFIX = ".fleetbus-"
"""Name prefix of the temporary file ``put`` writes beside its target."""

DEFAULT_MODE = 0o644
"""The mode of a file ``put`` creates when the request gives none."""

# Small chunks from the sender are gathered into writes of about this size, so that a
# many-small-chunks upload does not cost one thread-pool round trip per chunk.
_WRITE_BATCH = 1024 * 1024


def shown_path(path: str) -> str:
    """``path`` for a one-line message: as is, or quoted if it holds control characters."""
    return shorten(readable(path), 300)


def check_path(path: str) -> str:
    """Refuse paths that are empty, hold a NUL byte, or are relative; return ``path``.

    A relative path would resolve against whatever directory the fleetbus process or
    agent happens to run in, which nobody sending a request can know.
    """
    if not isinstance(path, str) or not path:
        raise invalid_request("path must not be empty")
    if "\0" in path:
        raise invalid_request(f"path contains a NUL byte: {shown_path(path)}")
    if not os.path.isabs(path):
        raise invalid_request(f"path must be absolute: {shown_path(path)}")
    return path


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def consume_outcome(task: asyncio.Future[Any]) -> None:
    # Mark an abandoned task's outcome as seen, so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(path: str) -> None:
    # Makes the rename itself durable. Some file systems refuse to fsync a directory;
    # the data is already safe by then, so that is not worth failing the put for.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


async def write_in_batches(
    source: AsyncIterable[bytes],
    expected: Optional[int],
    size_mismatch: Callable[[int], OpError],
    write: Callable[[list[bytes]], Any],
) -> tuple[int, list[bytes]]:
    """Pass ``source`` to ``write`` in batches of about 1 MiB (one blocking step each,
    not one per chunk); returns the bytes received and the last, partial batch, which
    the caller writes with its commit. Raises ``size_mismatch(received)`` as soon as
    more than ``expected`` bytes arrive, or at the end when fewer did."""
    received = 0
    batch: list[bytes] = []
    batched = 0
    async for chunk in source:
        if not isinstance(chunk, bytes):
            # The source may reuse its buffer once we ask for the next chunk.
            chunk = bytes(chunk)
        received += len(chunk)
        if expected is not None and received > expected:
            raise size_mismatch(received)
        batch.append(chunk)
        batched += len(chunk)
        if batched >= _WRITE_BATCH:
            await write(batch)
            batch, batched = [], 0
    if expected is not None and received != expected:
        raise size_mismatch(received)
    return received, batch


class AtomicPut:
    """One ``put`` in progress: a temporary file beside the target, renamed over it.

    Readers of the target see either the old content or the complete new one, never a
    partial write. On any failure or cancellation the temporary file is removed and the
    target is left as it was.
    """

    def __init__(
        self,
        spec: PutSpec,
        run_blocking: Optional[RunBlocking] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        self._spec = spec
        self._run_blocking = resolve_run_blocking(run_blocking)
        self._logger = logger if logger is not None else log
        self._path = check_path(spec.path)
        if self._path.endswith("/"):
            raise invalid_request(f"path names a directory: {shown_path(self._path)}")
        self._parent = os.path.dirname(self._path)
        if spec.mode is not None and not (_is_int(spec.mode) and 0 <= spec.mode <= 0o7777):
            shown = f"{spec.mode:#o}" if _is_int(spec.mode) else repr(spec.mode)
            raise invalid_request(f"invalid file mode {shown} for {shown_path(self._path)}")
        if spec.size is not None and not (_is_int(spec.size) and spec.size >= 0):
            raise invalid_request(f"invalid size {spec.size!r} for {shown_path(self._path)}")
        self._mode = DEFAULT_MODE
        self._owner: Optional[tuple[int, int]] = None
        # Set and cleared by the blocking steps, read by _remove_temp once they are done.
        self._fd: Optional[int] = None
        self._temp: Optional[str] = None
        self._drop: Optional[DropBehind] = None
        self._inflight: Optional[asyncio.Future[Any]] = None

    async def run(self, source: AsyncIterable[bytes]) -> FileStat:
        """Write everything ``source`` yields, then replace the target with it."""
        try:
            await self._blocking(self._create_temp)
            received, rest = await write_in_batches(
                source, self._spec.size, self._size_mismatch,
                lambda batch: self._blocking(self._write, batch))
            await self._blocking(self._commit, rest)
        except BaseException:
            self._discard()
            raise
        return FileStat(size=received, mode=self._mode)

    def _size_mismatch(self, received: int) -> OpError:
        qualifier = (
            "at least " if self._spec.size is not None and received > self._spec.size else ""
        )
        return transport_error(
            f"size mismatch for {shown_path(self._path)}: expected {self._spec.size} bytes, "
            f"received {qualifier}{received}"
        )

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        task = asyncio.ensure_future(self._run_blocking(fn, *args))
        self._inflight = task
        try:
            # Shielded: if we are cancelled the call still finishes in its thread, and
            # _discard waits for it through self._inflight.
            return await asyncio.shield(task)
        except OSError as exc:
            raise self._error(exc) from exc

    # The three blocking steps, each run in a worker thread.

    def _create_temp(self) -> None:
        try:
            existing: Optional[os.stat_result] = os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            existing = None
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                raise invalid_request(f"is a directory: {shown_path(self._path)}")
            if not stat.S_ISREG(existing.st_mode):
                # Replacing a device node or a FIFO with a regular file is never what
                # anyone uploading a file meant.
                raise invalid_request(f"not a regular file: {shown_path(self._path)}")
            # Replacing a file should not change who may read it: keep its mode (unless
            # one is given) and, when we can, its owner.
            self._owner = (existing.st_uid, existing.st_gid)
            if self._spec.mode is None:
                self._mode = stat.S_IMODE(existing.st_mode)
        if self._spec.mode is not None:
            self._mode = self._spec.mode
        if self._spec.make_parents:
            os.makedirs(self._parent, exist_ok=True)
        # mkstemp creates the file 0600, so nobody can read it before its final mode.
        fd, temp = tempfile.mkstemp(dir=self._parent, prefix=TEMP_PREFIX)
        self._fd, self._temp = fd, temp
        self._drop = DropBehind(fd)

    def _write(self, batch: list[bytes]) -> None:
        assert self._fd is not None and self._drop is not None
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        write_all(self._fd, data)
        self._drop.wrote(len(data))

    def _commit(self, batch: list[bytes]) -> None:
        assert self._fd is not None and self._temp is not None
        if batch:
            self._write(batch)
        fd = self._fd
        if self._owner is not None and self._owner != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, *self._owner)
            except PermissionError:
                pass  # only root may give a file away; it stays ours
        # After fchown: chown clears the setuid and setgid bits.
        os.fchmod(fd, self._mode)
        os.fsync(fd)
        if self._drop is not None:
            self._drop.finish()
        self._fd = None
        os.close(fd)
        os.replace(self._temp, self._path)
        self._temp = None
        _fsync_directory(self._parent)

    def _discard(self) -> None:
        task = self._inflight
        if task is not None and not task.done():
            task.add_done_callback(lambda done: (consume_outcome(done), self._remove_temp()))
        else:
            self._remove_temp()

    def _remove_temp(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        temp, self._temp = self._temp, None
        if temp is not None:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._logger.warning("cannot remove temporary file %s: %s", temp, exc)

    def _error(self, exc: OSError) -> OpError:
        path = shown_path(self._path)
        if isinstance(exc, PermissionError):
            return transport_error(f"permission denied: {path}")
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and not self._spec.make_parents:
            return not_found(f"no such directory: {shown_path(self._parent)}")
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            # makedirs met a path component that is a file.
            return invalid_request(
                f"cannot create the parent directories of {path}: "
                "a path component is not a directory"
            )
        return transport_error(f"cannot write {path}: {exc.strerror or exc}")


async def put_file(
    spec: PutSpec,
    source: AsyncIterable[bytes],
    *,
    run_blocking: Optional[RunBlocking] = None,
    logger: Optional[logging.Logger] = None,
) -> FileStat:
    """Write the bytes of ``source`` to ``spec.path`` atomically.

    A temporary file (``TEMP_PREFIX``, mode 0600) is written beside the target, given
    its mode and, when replacing a file, that file's owner, fsynced, renamed over the
    target, and the directory fsynced. The target is never left partly written: on
    any error or cancellation the temporary file is removed. Exceptions raised by
    ``source`` propagate unchanged; everything else is an :class:`OpError`:
    ``invalid_request`` (relative path, directory, FIFO or device, bad mode),
    ``not_found`` (missing parent without ``make_parents``), ``transport_error``
    (permission denied, I/O error, size mismatch).
    """
    return await AtomicPut(spec, run_blocking, logger).run(source)


class FileChunks(AsyncIterator[bytes]):
    """The bytes of an open file, read in chunks of at most GET_CHUNK on the thread pool.

    The file is closed at end of file, on a read error, or by :meth:`aclose` (which may
    be called at any time, also before the first chunk). A read error raises an
    :class:`OpError` with code ``transport_error``.
    """

    def __init__(
        self,
        file: io.FileIO,
        path: str,
        limit: Optional[int],
        run_blocking: Optional[RunBlocking] = None,
    ) -> None:
        self._run_blocking = resolve_run_blocking(run_blocking)
        self._file: Optional[io.FileIO] = file
        self._path = path
        self._remaining = limit
        self._inflight: Optional[asyncio.Future[Optional[bytes]]] = None

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        file = self._file
        if file is None:
            raise StopAsyncIteration
        if self._inflight is not None and not self._inflight.done():
            raise RuntimeError("FileChunks is already being read by another task")
        size = GET_CHUNK if self._remaining is None else min(GET_CHUNK, self._remaining)
        if size <= 0:
            self._close()
            raise StopAsyncIteration
        task = asyncio.ensure_future(self._run_blocking(file.read, size))
        self._inflight = task
        try:
            chunk = await asyncio.shield(task)
        except BaseException as exc:
            # On cancellation the close waits for the read still running in its thread.
            self._close()
            if isinstance(exc, OSError):
                raise transport_error(
                    f"cannot read {shown_path(self._path)}: {exc.strerror or exc}"
                ) from exc
            raise
        if not chunk:
            self._close()
            raise StopAsyncIteration
        if self._remaining is not None:
            self._remaining -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        """Close the file (after any read still running in its thread)."""
        self._close()

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        task = self._inflight
        if task is not None and not task.done():
            task.add_done_callback(lambda done: (consume_outcome(done), file.close()))
        else:
            file.close()


def _open_for_reading(path: str) -> tuple[io.FileIO, os.stat_result]:
    # stat before open: opening some devices has side effects (a tape rewinds), and
    # opening a FIFO blocks until someone writes to it.
    _check_readable(path, os.stat(path))
    # O_NONBLOCK so that if the path became a FIFO in between, open cannot hang.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _check_readable(path, st)
        os.set_blocking(fd, True)
        return io.FileIO(fd, "rb", closefd=True), st
    except BaseException:
        os.close(fd)
        raise


def _check_readable(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise invalid_request(f"is a directory: {shown_path(path)}")
    if not stat.S_ISREG(st.st_mode):
        raise invalid_request(f"not a regular file: {shown_path(path)}")


def _close_opened(task: asyncio.Future[tuple[io.FileIO, os.stat_result]]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


async def get_file(path: str, *, run_blocking: Optional[RunBlocking] = None) -> RemoteFile:
    """Open ``path`` for reading in chunks of at most :data:`GET_CHUNK` bytes.

    ``size`` is the size at open time and no more than that is read, so a log file
    being appended to yields a consistent snapshot. A file whose size is 0 is read to
    its end instead: pseudo-files in /proc report 0 but have content.

    Raises :class:`OpError`: ``invalid_request`` (relative path, directory, FIFO or
    device), ``not_found``, ``transport_error`` (permission denied, I/O error).
    """
    check_path(path)
    run_blocking = resolve_run_blocking(run_blocking)
    task = asyncio.ensure_future(run_blocking(_open_for_reading, path))
    try:
        file, st = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_opened)
        raise
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise not_found(f"no such file: {shown_path(path)}") from exc
    except PermissionError as exc:
        raise transport_error(f"permission denied: {shown_path(path)}") from exc
    except OSError as exc:
        raise transport_error(f"cannot read {shown_path(path)}: {exc.strerror or exc}") from exc
    limit = st.st_size if st.st_size > 0 else None
    return RemoteFile(
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        chunks=FileChunks(file, path, limit, run_blocking),
    )
