"""One read of an object from the store for every ``put`` of it on this worker.

A ``put`` job's targets are ordinary ``put`` commands naming one object in the file
bucket (:mod:`fleetbus.jobfiles`). A worker serving many of them (a gateway holding
twenty agents, a worker with ssh servers) would read that object from JetStream once
per target. :class:`SharedObjects` reads each object version once into a spool file and
serves every command for it from there:

- the first command for an object starts the one read; every command for it, including
  those arriving while the read is under way, follows the spool as it grows, so the
  first target does not wait for the whole file;
- a spool is one version of an object, named by its ``nuid`` and digest from the
  object's metadata: every command looks the metadata up, so a replaced object gets a
  spool of its own and never the old bytes;
- the read is checked against the object's size and digest (:meth:`ObjectFiles.chunks`),
  and the object's metadata is watched while it runs: a corrupt, truncated, deleted or
  replaced object fails every command reading it with a ``TransportError``, and the
  spool goes;
- commands are counted; when the last one is done the spool stays for ``linger_s``, so
  the next wave of a job (``max_concurrency``, ``batch``) reads it again instead of the
  store, then goes.

Memory is bounded (one chunk per reader and per write); disk holds the object once. A
spool file is unlinked as soon as it is made: only its descriptor names it, so its space
returns when it is closed, and a worker that dies leaves nothing behind but its empty
private folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import api

from .errors import Cancelled, FleetbusError, TransportError
from .objects import CHUNK_BYTES, ObjectFiles

__all__ = ["LINGER_S", "SharedObjects", "SharedRead"]

log = logging.getLogger("fleetbus.objectshare")

# How long a spool nobody reads is kept. A job with --max-concurrency or --batch starts
# its next targets as earlier ones end, usually within a second; a job's canary or a
# slow wave can leave a gap of many seconds. 30 s covers those for the cost of holding
# one file's disk space that long after its last put.
LINGER_S = 30.0
# What a command reads from its spool at a time. Reads happen on the event loop: they
# trail the writer, so they come from the page cache (a copy of 256 KiB, tens of
# microseconds, less than a hop to a thread would cost).
READ_BYTES = CHUNK_BYTES


@dataclass(eq=False)
class _Spool:
    """One object version being read, or read, into an unlinked file."""

    name: str
    info: api.ObjectInfo
    fd: int
    progress: asyncio.Future[None]  # resolved, then replaced, whenever something changes
    size: int = 0
    written: int = 0
    complete: bool = False
    error: FleetbusError | None = None
    users: int = 0
    closed: bool = False
    reader: asyncio.Task[None] | None = None
    linger: asyncio.TimerHandle | None = None
    last_write: Future[None] | None = None  # the thread's own future: done when it is

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, str(self.info.nuid), str(self.info.digest))

    def failure(self) -> FleetbusError:
        """A fresh exception for one reader (the stored one is raised in many tasks)."""
        assert self.error is not None
        return type(self.error)(self.error.message)


@dataclass(eq=False)
class SharedRead:
    """One command's use of a spool: its bytes through :meth:`chunks`; :meth:`release`
    when the command is done with it, however it ended."""

    owner: SharedObjects
    spool: _Spool
    size: int
    released: bool = field(default=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The object's bytes, from the spool, as far as the store's read has got;
        raises the read's error if it fails first."""
        spool = self.spool
        offset = 0
        while offset < self.size:
            if spool.error is not None:
                raise spool.failure()
            if spool.closed or self.released:
                raise Cancelled(f"the read of object {spool.name} was stopped")
            if offset < spool.written:
                data = os.pread(spool.fd, min(READ_BYTES, spool.written - offset), offset)
                if not data:
                    raise TransportError(f"the spool of object {spool.name} ended early")
                offset += len(data)
                yield data
                continue
            # Shielded: a command cancelled while it waits must not cancel the future
            # every other command waits on.
            await asyncio.shield(spool.progress)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self.spool)


class SharedObjects:
    """Spools of the objects this worker's ``put`` commands read (module docstring)."""

    def __init__(self, files: ObjectFiles, folder: Path, linger_s: float = LINGER_S,
                 on_read: Callable[[int], None] | None = None) -> None:
        """``folder``: where this process makes its private spool folder (created 0700
        when first needed, removed by :meth:`aclose`); ``on_read``: called with the
        size of every chunk read from the store."""
        self.files = files
        self.folder = folder
        self.linger_s = linger_s
        self.on_read = on_read
        self._dir: Path | None = None
        self._current: dict[tuple[str, str, str], _Spool] = {}  # what new commands get
        self._all: set[_Spool] = set()  # also stale and failed ones still being read
        # Writes go to a thread: a write may wait on the kernel's dirty-page throttling
        # while other processes write large files. One thread keeps each spool's writes
        # in order and is all one stream from the store needs.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetbus-spool")
        self._closed = False

    @property
    def spools(self) -> int:
        """Spool files held open (being read, read by commands, or lingering)."""
        return len(self._all)

    async def open(self, name: str) -> SharedRead:
        """A read of object ``name`` as it is now; raises NotFound when it is not there."""
        if self._closed:
            raise Cancelled("the worker is stopping").not_started()
        info = await self.files.info(name)
        key = (name, str(info.nuid), str(info.digest))
        spool = self._current.get(key)
        if spool is None:
            self._drop_idle(name)  # an older version nobody reads: it is stale now
            spool = self._start(name, info)
        spool.users += 1
        if spool.linger is not None:
            spool.linger.cancel()
            spool.linger = None
        return SharedRead(self, spool, spool.size)

    async def aclose(self) -> None:
        """Stop every read, fail the commands still reading, remove the spool folder."""
        self._closed = True
        for spool in list(self._all):
            if spool.error is None and not spool.complete:
                spool.error = Cancelled("the worker is stopping")
            self._discard(spool)
        readers = [s.reader for s in self._all if s.reader is not None]
        self._all.clear()
        await asyncio.gather(*readers, return_exceptions=True)
        self._writer.shutdown(wait=False)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # spools ----------------------------------------------------------------------------
    def _start(self, name: str, info: api.ObjectInfo) -> _Spool:
        if self._dir is None:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="spool-", dir=self.folder))  # 0700
        fd, path = tempfile.mkstemp(dir=self._dir)  # 0600
        os.unlink(path)
        loop = asyncio.get_running_loop()
        spool = _Spool(name=name, info=info, fd=fd, progress=loop.create_future(),
                       size=int(info.size or 0))
        self._current[spool.key] = spool
        self._all.add(spool)
        spool.reader = asyncio.create_task(self._fill(spool), name=f"spool {name}")
        return spool

    async def _fill(self, spool: _Spool) -> None:
        """Read the object from the store into the spool, once."""
        watch = None

        def changed() -> None:
            if not spool.complete:
                self._fail(spool, TransportError(
                    f"object {spool.name} was deleted or replaced while it was read"))

        try:
            # Watched before its metadata is looked at again, so no change between the
            # first command's look and this one goes unseen.
            watch = await self.files.watch(spool.name, changed)
            now = await self.files.info(spool.name)
            if (now.nuid, now.digest) != (spool.info.nuid, spool.info.digest):
                raise TransportError(f"object {spool.name} was replaced while it was opened")
            async with contextlib.aclosing(self.files.chunks(spool.info)) as chunks:
                async for chunk in chunks:
                    if self.on_read is not None:
                        self.on_read(len(chunk))
                    await self._write(spool, chunk)
                    spool.written += len(chunk)
                    _wake(spool)
            spool.complete = True
            _wake(spool)
        except asyncio.CancelledError:
            self._fail(spool, Cancelled(f"the read of object {spool.name} was stopped"))
            raise
        except FleetbusError as exc:
            self._fail(spool, exc)
        except OSError as exc:  # the spool's disk: full, or failing
            self._fail(spool, TransportError(f"could not spool object {spool.name}: {exc}"))
        except Exception as exc:
            log.exception("reading object %s failed unexpectedly", spool.name)
            self._fail(spool, TransportError(f"reading object {spool.name} failed: {type(exc).__name__}"))
        finally:
            if watch is not None:
                with contextlib.suppress(Exception):
                    await watch.unsubscribe()

    async def _write(self, spool: _Spool, data: bytes) -> None:
        work = self._writer.submit(_write_all, spool.fd, data, spool.written)
        spool.last_write = work
        await asyncio.wrap_future(work)

    def _fail(self, spool: _Spool, error: FleetbusError) -> None:
        """End ``spool``'s read with ``error``: every command reading it raises it, and
        no new command gets it."""
        if spool.error is not None or spool.closed:
            return
        spool.error = error
        if self._current.get(spool.key) is spool:
            del self._current[spool.key]
        if spool.reader is not None and spool.reader is not asyncio.current_task():
            spool.reader.cancel()
        _wake(spool)
        if spool.users == 0:
            self._discard(spool)

    def _release(self, spool: _Spool) -> None:
        spool.users -= 1
        if spool.users > 0 or spool.closed:
            return
        if spool.error is not None or self._current.get(spool.key) is not spool:
            self._discard(spool)  # failed, or a newer version replaced it
        else:
            spool.linger = asyncio.get_running_loop().call_later(self.linger_s, self._discard, spool)

    def _drop_idle(self, name: str) -> None:
        for spool in [s for s in self._current.values() if s.name == name and s.users == 0]:
            self._discard(spool)

    def _discard(self, spool: _Spool) -> None:
        """Close the spool (its disk space returns); commands still reading it fail."""
        if spool.closed:
            return
        spool.closed = True
        if self._current.get(spool.key) is spool:
            del self._current[spool.key]
        self._all.discard(spool)
        if spool.linger is not None:
            spool.linger.cancel()
        if spool.reader is not None and not spool.reader.done() and spool.reader is not asyncio.current_task():
            spool.reader.cancel()
        _wake(spool)
        # A write cannot be stopped once its thread runs: the descriptor is closed when
        # it is done, never under it (the number could be reused by another file).
        write = spool.last_write
        if write is not None and not write.done():
            write.add_done_callback(lambda _: os.close(spool.fd))
        else:
            os.close(spool.fd)


def _wake(spool: _Spool) -> None:
    if not spool.progress.done():
        spool.progress.set_result(None)
    spool.progress = spool.progress.get_loop().create_future()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done
