"""``put`` and ``get`` over SFTP, streamed and atomic.

SFTP clients and concurrency
----------------------------
paramiko's :class:`~paramiko.SFTPClient` is not safe for concurrent use: any thread
waiting for its own reply reads whatever reply comes next off the shared channel and
drops the ones it did not expect (``SFTPClient._read_response``), so two transfers on
one client can hang each other. Each transfer therefore *borrows* a client from a small
per-connection pool (:class:`SftpPool`) and has it to itself; concurrent transfers
open more clients (each is one channel on the shared connection). One idle client is
kept for the next transfer; it gives its channel back when commands are waiting for
one (see :mod:`.slots`). A client that saw an error or was abandoned mid-transfer is
closed, not reused: replies still in flight would confuse its next user.

Throughput
----------
paramiko's defaults (2 MiB window, 32 KiB SFTP requests, one request in flight) are
slow. We use a 16 MiB window on SFTP channels, requests as large as the server allows
(``limits@openssh.com``: 255 KiB for OpenSSH; 32 KiB otherwise), pipelined writes of
1 MiB batches (the next batch is gathered from the source while the previous one is
being sent), and reads issued ahead in batches of ``sftp_read_ahead`` bytes
(``SFTPFile.readv``; its prefetch thread ends with each batch, so abandoning a
download never leaves a thread behind), with the next chunk read while the consumer
handles the current one. Memory stays bounded by the window and one batch, whatever
the file size.
Below SFTP, paramiko's per-packet costs are cut down by :mod:`.fastpath`: uploads send
several SSH packets per socket write, and the channel's input buffer and the packet
reader avoid paramiko's per-read copying.

put writes ``<dir>/.fleetbus-<random>`` (mode 0600 while being written), closes it
(which collects every pipelined write's status), checks its size, applies the mode
(the given one, else the replaced file's, else 0644) and owner (kept when replacing,
where permitted), then ``posix-rename@openssh.com``s it over the target. On any failure
or cancellation the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import posixpath
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import paramiko
from fleetbus.errors import FleetbusError, InvalidRequest, NotFound, TransportError
from fleetbus.transport import FileStat, PutSpec, RemoteFile
from fleetbus_base.ops import GET_CHUNK, TEMP_PREFIX
from fleetbus_base.text import readable, shorten
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY, SFTPError

from .connection import SshConnection, short
from .fastpath import send_data, use_chunk_pipe
from .settings import SshSettings
from .slots import ChannelSlots

T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]

DEFAULT_MODE = 0o644
PROTOCOL_MIN_REQUEST = 32 * 1024  # every SFTP server must take requests this large
_WRITE_BATCH = 1024 * 1024
_MAX_IDLE_CLIENTS = 1
# What paramiko raises when an SFTP request or its channel fails.
_SFTP_ERRORS = (OSError, EOFError, paramiko.SSHException, SFTPError)


def shown(path: str) -> str:
    return shorten(readable(path), 300)


def check_path(path: str) -> str:
    """Absolute, non-empty, no NUL: relative paths would depend on the login directory."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must not be empty")
    if "\0" in path:
        raise InvalidRequest(f"path contains a NUL byte: {shown(path)}")
    if not path.startswith("/"):
        raise InvalidRequest(f"path must be absolute: {shown(path)}")
    return path


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass
class SftpClient:
    """One SFTP channel and the request sizes its server accepts."""

    sftp: paramiko.SFTPClient
    read_size: int
    write_size: int


def _server_limits(sftp: paramiko.SFTPClient, cap: int) -> tuple[int, int]:
    """Largest read and write request sizes, from OpenSSH's ``limits@openssh.com``.

    paramiko has no public call for extensions; ``_request`` is what its own
    ``posix_rename`` uses. Any failure means "unknown": the protocol minimum.
    """
    try:
        kind, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
        if kind != CMD_EXTENDED_REPLY:
            raise ValueError("unexpected reply")
        max_packet, max_read, max_write = msg.get_int64(), msg.get_int64(), msg.get_int64()
    except (*_SFTP_ERRORS, ValueError):
        return PROTOCOL_MIN_REQUEST, PROTOCOL_MIN_REQUEST

    def pick(limit: int) -> int:
        # 0 means "no limit stated"; leave room for the message header within max_packet.
        bounds = [cap] + [v for v in (limit, max_packet - 1024 if max_packet else 0) if v > 0]
        return max(PROTOCOL_MIN_REQUEST, min(bounds))

    return pick(max_read), pick(max_write)


class _SFTPClient(paramiko.SFTPClient):
    """paramiko's SFTP client with cheaper sends and receives of large packets.

    Sends go through :func:`.fastpath.send_data` (several SSH packets per socket write,
    one copy; see there for the measurements). Receives gather the pieces of one SFTP
    packet in a list: paramiko's ``out += x`` copies everything so far for every piece,
    about four times a 255 KiB read reply in 32 KiB pieces.
    """

    def _write_all(self, out: bytes) -> None:
        send_data(self.sock, out)

    def _read_all(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            x = self.sock.recv(n)
            if not x:
                raise EOFError()
            parts.append(x)
            n -= len(x)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class SftpPool:
    """SFTP clients on one connection, each lent to one transfer at a time."""

    def __init__(self, conn: SshConnection, slots: ChannelSlots, settings: SshSettings,
                 run_blocking: RunBlocking, logger: logging.Logger) -> None:
        self.conn = conn
        self.slots = slots
        self.settings = settings
        self.run_blocking = run_blocking
        self.logger = logger
        self._idle: list[SftpClient] = []
        slots.add_reclaimer(self.close_idle)

    async def borrow(self) -> SftpClient:
        if self._idle:
            client = self._idle.pop()
            if client.sftp.get_channel().closed is False:
                return client
            await self._close(client)
        await self.slots.acquire()
        try:
            return await self.run_blocking(self._open)
        except BaseException:
            self.slots.release()
            raise

    def _open(self) -> SftpClient:
        chan = self.conn.open_session(self.settings.window_size)
        try:
            use_chunk_pipe(chan)  # before the subsystem starts sending
            chan.invoke_subsystem("sftp")
            sftp = _SFTPClient(chan)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            chan.close()
            if not self.conn.alive:
                raise self.conn.lost(exc) from None
            raise TransportError(f"{self.conn.name} refused the sftp subsystem: {short(exc)}") from None
        except BaseException:
            chan.close()
            raise
        read_size, write_size = _server_limits(sftp, self.settings.sftp_request_size)
        return SftpClient(sftp, read_size, write_size)

    async def give_back(self, client: SftpClient, reusable: bool) -> None:
        """Return a borrowed client: kept for reuse if ``reusable``, else closed."""
        if reusable and self.conn.alive and len(self._idle) < _MAX_IDLE_CLIENTS:
            self._idle.append(client)
            return
        await self._close(client)

    def give_back_later(self, client: SftpClient) -> None:
        """Close a client from a context that cannot wait (e.g. a done callback)."""
        asyncio.ensure_future(self._close(client)).add_done_callback(_consume)

    async def _close(self, client: SftpClient) -> None:
        try:
            with contextlib.suppress(*_SFTP_ERRORS):  # the channel is gone either way
                await self.run_blocking(client.sftp.close)
        finally:
            self.slots.release()

    async def close_idle(self) -> None:
        while self._idle:
            await self._close(self._idle.pop())

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        return await _AtomicPut(self, spec).run(source)

    async def get(self, path: str) -> RemoteFile:
        check_path(path)
        client = await self.borrow()
        try:
            size, mode, handle = await self.run_blocking(_open_for_reading, client, path, self.conn.name)
        except FleetbusError:
            await self.give_back(client, reusable=True)  # a clean refusal from the server
            raise
        except BaseException as exc:
            await self.give_back(client, reusable=False)
            if isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
                raise _sftp_error(self.conn, exc, path) from None
            raise
        return RemoteFile(size=size, mode=mode,
                          chunks=SftpChunks(self, client, handle, size, path))


def _sftp_error(conn: SshConnection, exc: BaseException, path: str) -> FleetbusError:
    if not conn.alive:
        return conn.lost(exc)
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EACCES:
        return TransportError(f"permission denied: {shown(path)}")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"no such file or directory: {shown(path)}")
    return TransportError(f"sftp error on {conn.name} for {shown(path)}: {short(exc)}")


def _stat_or_none(sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes | None:
    try:
        return sftp.stat(path)
    except FileNotFoundError:
        return None


def _open_for_reading(client: SftpClient, path: str, server: str) -> tuple[int, int | None, paramiko.SFTPFile]:
    st = _stat_or_none(client.sftp, path)
    if st is None:
        raise NotFound(f"no such file on {server}: {shown(path)}")
    mode = st.st_mode or 0
    if stat.S_ISDIR(mode):
        raise InvalidRequest(f"is a directory: {shown(path)}")
    if st.st_mode is not None and not stat.S_ISREG(mode):
        # Reading a FIFO or a device is never what a file download means, and may hang.
        raise InvalidRequest(f"not a regular file: {shown(path)}")
    handle = client.sftp.open(path, "rb", bufsize=0)
    handle.MAX_REQUEST_SIZE = client.read_size
    return int(st.st_size or 0), (stat.S_IMODE(mode) if st.st_mode is not None else None), handle


class _ReadAhead:
    """Blocking reader: the file's blocks in order, requested a batch ahead. One thread at a time."""

    def __init__(self, handle: paramiko.SFTPFile, size: int, block: int, batch: int) -> None:
        self._handle = handle
        self._size = size
        self._block = block
        self._batch = max(block, batch)
        self._offset = 0  # where the current batch ends
        self._position = 0  # bytes returned so far
        self._blocks: Any = None  # the current batch's readv generator

    @property
    def mid_batch(self) -> bool:
        """Reads of the current batch may still be in flight (replies not yet taken)."""
        return self._blocks is not None and self._position < self._offset

    def next(self) -> bytes:
        while True:
            if self._blocks is None:
                if self._offset >= self._size:
                    return b""
                end = min(self._size, self._offset + self._batch)
                ranges = [(o, min(self._block, end - o)) for o in range(self._offset, end, self._block)]
                self._offset = end
                self._blocks = self._handle.readv(ranges)
            try:
                block: bytes = next(self._blocks)
            except StopIteration:
                self._blocks = None
                continue
            self._position += len(block)
            return block

    def take(self, limit: int) -> bytes:
        """The next blocks, joined, up to ``limit`` bytes (b"" at the end of the file).

        The server answers a read with at most its own limit (255 KiB for OpenSSH),
        while everything after us (a thread-pool hop, hashing, one NATS message to the
        requester) costs per chunk: four blocks per chunk pay those once instead of four
        times, for one copy of the bytes.
        """
        first = self.next()
        if not first or len(first) + self._block > limit:
            return first
        parts, have = [first], len(first)
        while have + self._block <= limit:
            block = self.next()
            if not block:
                break
            parts.append(block)
            have += len(block)
        return b"".join(parts)


class SftpChunks(AsyncIterator[bytes]):
    """A remote file's bytes, up to the size seen when it was opened.

    Closing before the end (``aclose``) discards the SFTP client if reads were still in
    flight, since their replies would otherwise reach its next user.
    """

    def __init__(self, pool: SftpPool, client: SftpClient, handle: paramiko.SFTPFile, size: int,
                 path: str) -> None:
        self._pool = pool
        self._client: SftpClient | None = client
        self._handle = handle
        self._path = path
        self._remaining = size
        block = min(GET_CHUNK, client.read_size)
        self._reader = _ReadAhead(handle, size, block, pool.settings.sftp_read_ahead)
        self._inflight: asyncio.Future[bytes] | None = None
        self._busy = False

    def __aiter__(self) -> SftpChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._client is None or self._remaining <= 0:
            await self.aclose()
            raise StopAsyncIteration
        if self._busy:
            raise RuntimeError("SftpChunks is already being read by another task")
        self._busy = True
        try:
            # The next chunk was usually requested when the previous one was handed out.
            task = self._inflight or self._read_next()
            try:
                chunk = await asyncio.shield(task)
            except BaseException as exc:
                await self._release(reusable=False)
                if isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
                    raise _sftp_error(self._pool.conn, exc, self._path) from None
                raise
            self._inflight = None
            if not chunk:
                await self.aclose()  # the file shrank since we opened it
                raise StopAsyncIteration
            if len(chunk) > self._remaining:
                chunk = chunk[: self._remaining]
            self._remaining -= len(chunk)
            if self._remaining > 0:
                # Read ahead while the consumer handles this chunk (it may be sending it
                # on over the network): the thread hop is then off the critical path.
                self._read_next()
            return chunk
        finally:
            self._busy = False

    def _read_next(self) -> asyncio.Future[bytes]:
        self._inflight = asyncio.ensure_future(self._pool.run_blocking(self._reader.take, GET_CHUNK))
        return self._inflight

    async def aclose(self) -> None:
        """Close the file and give its client back; safe at any time, also twice."""
        await self._release(reusable=not self._reader.mid_batch)

    async def _release(self, reusable: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        task = self._inflight
        if task is not None and not task.done():
            # A read is still running in its thread: the client is closed once it is back.
            def later(done: asyncio.Future[bytes]) -> None:
                _consume(done)
                self._pool.give_back_later(client)

            task.add_done_callback(later)
            return
        if task is not None:
            _consume(task)  # a chunk read ahead and never asked for
            self._inflight = None
        if reusable:
            try:
                await self._pool.run_blocking(self._handle.close)
            except _SFTP_ERRORS:
                reusable = False
        await self._pool.give_back(client, reusable)


class _AtomicPut:
    """One ``put``: a temporary file beside the target, renamed over it when complete."""

    def __init__(self, pool: SftpPool, spec: PutSpec) -> None:
        self.pool = pool
        self.spec = spec
        self.path = check_path(spec.path)
        if self.path.endswith("/"):
            raise InvalidRequest(f"path names a directory: {shown(self.path)}")
        if spec.mode is not None and not (isinstance(spec.mode, int) and 0 <= spec.mode <= 0o7777):
            raise InvalidRequest(f"invalid file mode {spec.mode!r} for {shown(self.path)}")
        if spec.size is not None and (not isinstance(spec.size, int) or spec.size < 0):
            raise InvalidRequest(f"invalid size {spec.size!r} for {shown(self.path)}")
        self.parent = posixpath.dirname(self.path) or "/"
        self.mode = DEFAULT_MODE
        self.owner: tuple[int, int] | None = None
        self.client: SftpClient | None = None
        self.handle: paramiko.SFTPFile | None = None
        self.temp: str | None = None
        self._inflight: asyncio.Future[Any] | None = None

    async def run(self, source: AsyncIterator[bytes]) -> FileStat:
        self.client = await self.pool.borrow()
        received = 0
        try:
            await self._blocking(self._create_temp)
            expected = self.spec.size
            batch: list[bytes] = []
            batched = 0
            async for chunk in source:
                if not isinstance(chunk, bytes):
                    chunk = bytes(chunk)  # the source may reuse its buffer
                received += len(chunk)
                if expected is not None and received > expected:
                    raise self._size_mismatch(received)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await self._write_behind(b"".join(batch))
                    batch, batched = [], 0
            if expected is not None and received != expected:
                raise self._size_mismatch(received)
            if batch:
                await self._write_behind(b"".join(batch))
            await self._settle()
            await self._blocking(self._commit, received)
        except BaseException:
            await self._discard()
            raise
        client, self.client = self.client, None
        await self.pool.give_back(client, reusable=True)
        return FileStat(size=received, mode=self.mode)

    def _size_mismatch(self, received: int) -> TransportError:
        more = "at least " if self.spec.size is not None and received > self.spec.size else ""
        return TransportError(f"size mismatch for {shown(self.path)}: expected {self.spec.size} bytes, "
                              f"received {more}{received}")

    async def _write_behind(self, data: bytes) -> None:
        """Start writing ``data`` once the previous write is done, without waiting for it,
        so the next batch is gathered from the source while this one is sent."""
        await self._settle()
        self._inflight = asyncio.ensure_future(self.pool.run_blocking(self._write, data))

    async def _settle(self) -> None:
        """Wait for the write in flight, if any, and raise its error."""
        task = self._inflight
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._error(exc) from None

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        task = asyncio.ensure_future(self.pool.run_blocking(fn, *args))
        self._inflight = task
        try:
            # Shielded: if we are cancelled, the call finishes in its thread and _discard
            # waits for it before touching the client again.
            return await asyncio.shield(task)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> FleetbusError:
        conn = self.pool.conn
        if not conn.alive:
            return conn.lost(exc)
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EACCES:
            return TransportError(f"permission denied: {shown(self.path)}")
        return TransportError(f"cannot write {shown(self.path)} on {conn.name}: {short(exc)}")

    # Blocking steps, each run in a worker thread.

    def _create_temp(self) -> None:
        assert self.client is not None
        sftp = self.client.sftp
        existing = _stat_or_none(sftp, self.path)
        if existing is not None and existing.st_mode is not None:
            if stat.S_ISDIR(existing.st_mode):
                raise InvalidRequest(f"is a directory: {shown(self.path)}")
            if not stat.S_ISREG(existing.st_mode):
                raise InvalidRequest(f"not a regular file: {shown(self.path)}")
            # Replacing a file should not change who may read it.
            if self.spec.mode is None:
                self.mode = stat.S_IMODE(existing.st_mode)
            if existing.st_uid is not None and existing.st_gid is not None:
                self.owner = (existing.st_uid, existing.st_gid)
        if self.spec.mode is not None:
            self.mode = self.spec.mode
        if self.spec.make_parents:
            self._make_dirs(sftp, self.parent)
        else:
            parent = _stat_or_none(sftp, self.parent)
            if parent is None:
                raise NotFound(f"no such directory: {shown(self.parent)}")
            if parent.st_mode is not None and not stat.S_ISDIR(parent.st_mode):
                raise InvalidRequest(f"not a directory: {shown(self.parent)}")
        temp = posixpath.join(self.parent, TEMP_PREFIX + secrets.token_hex(8))
        handle = sftp.open(temp, "wbx", bufsize=0)  # exclusive: never someone else's file
        self.handle, self.temp = handle, temp
        # Private until complete; SFTP open takes no mode, so this is the first request
        # after creating it, before any data.
        handle.chmod(0o600)
        handle.set_pipelined(True)
        handle.MAX_REQUEST_SIZE = self.client.write_size

    def _make_dirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        missing: list[str] = []
        current = directory
        while True:
            st = _stat_or_none(sftp, current)
            if st is not None:
                if st.st_mode is not None and not stat.S_ISDIR(st.st_mode):
                    raise InvalidRequest(f"cannot create the parent directories of {shown(self.path)}: "
                                         f"{shown(current)} is not a directory")
                break
            missing.append(current)
            up = posixpath.dirname(current)
            if up == current:
                break
            current = up
        for path in reversed(missing):
            try:
                sftp.mkdir(path)
            except OSError:
                # Someone else may have created it meanwhile; only that is fine.
                st = _stat_or_none(sftp, path)
                if st is None or st.st_mode is None or not stat.S_ISDIR(st.st_mode):
                    raise

    def _write(self, data: bytes) -> None:
        assert self.handle is not None
        self.handle.write(data)

    def _commit(self, received: int) -> None:
        assert self.client is not None and self.handle is not None and self.temp is not None
        sftp = self.client.sftp
        handle, self.handle = self.handle, None
        handle.close()  # waits for every pipelined write's status: errors surface here
        written = sftp.stat(self.temp).st_size
        if written != received:
            raise TransportError(f"size mismatch for {shown(self.path)} on {self.pool.conn.name}: "
                                 f"sent {received} bytes, the server stored {written}")
        if self.owner is not None:
            try:
                sftp.chown(self.temp, *self.owner)
            except OSError:
                pass  # only root may give a file away; it stays the login user's
        sftp.chmod(self.temp, self.mode)  # after chown, which clears setuid/setgid
        try:
            sftp.posix_rename(self.temp, self.path)
        except OSError as exc:
            if "unsupported" not in str(exc).lower():
                raise
            # A server without posix-rename: plain SFTP rename is atomic too, but only
            # onto a name that does not exist.
            if _stat_or_none(sftp, self.path) is not None:
                raise TransportError(f"{self.pool.conn.name} cannot replace files atomically "
                                     "(no posix-rename@openssh.com)") from None
            sftp.rename(self.temp, self.path)
        self.temp = None

    def _remove_temp(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            with contextlib.suppress(*_SFTP_ERRORS):
                handle.close()
        temp, self.temp = self.temp, None
        if temp is not None and self.client is not None:
            try:
                self.client.sftp.remove(temp)
            except FileNotFoundError:
                pass
            except _SFTP_ERRORS as exc:
                self.pool.logger.warning("cannot remove temporary file %s on %s: %s", shown(temp),
                                         self.pool.conn.name, short(exc))

    async def _discard(self) -> None:
        """Remove the temporary file (after any call still running in its thread), then
        close the client. Runs to completion even if cancelled again."""
        task = asyncio.ensure_future(self._discard_now())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_consume)
            raise

    async def _discard_now(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                done, _ = await asyncio.wait({inflight}, timeout=self.pool.settings.kill_timeout_s)
                if not done:
                    # Stuck (a hung connection): closing the channel ends the call.
                    await self.pool.run_blocking(client.sftp.close)
                    await asyncio.wait({inflight}, timeout=self.pool.settings.kill_timeout_s)
            if inflight is not None and inflight.done():
                _consume(inflight)
            await self.pool.run_blocking(self._remove_temp)
        finally:
            self.client = None
            await self.pool.give_back(client, reusable=False)
