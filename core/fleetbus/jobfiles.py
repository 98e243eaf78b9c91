"""Files to and from many servers as one job: the requester's side of ``put`` and ``get``
jobs (docs/bus-api.md, "Jobs").

A ``put`` job's file goes into the object store once (:func:`upload`); every target's
command is an ordinary ``put`` of that object, which its worker checks against the
sha256 before renaming the file into place. A ``get`` job's targets each store their
file as ``job/<job>/<server>`` (:func:`fleetbus.jobrequest.job_object`); the requester
fetches each one as its result is kept (:func:`download`), several at a time
(:class:`Downloads`), checks it and deletes it.

Neither side holds a file in memory: uploads read the local file in chunks, downloads
write each chunk as it comes. Objects the requester never deletes (it died) expire with
the file bucket's TTL (``jetstream.FILE_TTL_S``, one hour).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

from .client import FileSink, read_chunks
from .errors import TransportError
from .names import SERVER_NAME_RE
from .objects import ObjectFiles, StoredObject

JOB_PUT_PREFIX = "job-put"
#: Files a ``get`` job's requester fetches at once. One object is one ordered consumer
#: delivering 256 KiB chunks, so a single download waits on round trips and on the disk;
#: a few at a time hide that, while many more would only split the same bandwidth and
#: multiply the consumers and their buffers (each may hold up to 32 MiB pending).
DOWNLOADS_AT_ONCE = 8


async def upload(files: ObjectFiles, source: Path) -> StoredObject:
    """Store the local file ``source`` once for a ``put`` job, streamed from disk; the
    returned object carries its size and sha256 for the job request."""
    size = source.stat().st_size
    return await files.write(f"{JOB_PUT_PREFIX}/{uuid.uuid4().hex}", read_chunks(source, size, None))


def server_folder(dest: Path, server: str) -> Path:
    """``dest/<server>``; a server name is one path segment (the registry's rule), so it
    can never climb out of ``dest``."""
    if not SERVER_NAME_RE.fullmatch(server):  # it starts with a letter or digit: never "." or ".."
        raise TransportError(f"{server!r} cannot name a folder")
    return dest / server


class Downloads:
    """A ``get`` job's files, fetched as their results arrive, at most ``at_once`` at a
    time (:data:`DOWNLOADS_AT_ONCE`); each as :func:`download` does."""

    def __init__(self, files: ObjectFiles, dest: Path, filename: str, at_once: int = DOWNLOADS_AT_ONCE) -> None:
        self.files = files
        self.dest = dest
        self.filename = filename
        self._slots = asyncio.Semaphore(at_once)

    async def fetch(self, result: dict[str, Any]) -> Path:
        """Fetch one server's file once a slot is free; see :func:`download`."""
        async with self._slots:
            return await download(self.files, result, self.dest, self.filename)


async def download(files: ObjectFiles, result: dict[str, Any], dest: Path, filename: str) -> Path:
    """Fetch a ``get`` job's ``result`` into ``dest/<server>/<filename>``: written to a
    temporary name, checked against the sha256 the server reported, then renamed, so a
    failed download never leaves a partial file under the real name. The object is
    deleted whatever happens: nobody else fetches it."""
    data = result.get("data") or {}
    name = str(data.get("object") or "")
    try:
        folder = server_folder(dest, result["server"])
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / filename
        _size, chunks = await files.read(name)
        sink = FileSink(target)
        digest = hashlib.sha256()
        try:
            async for chunk in chunks:
                digest.update(chunk)
                await sink.write(chunk)
            if digest.hexdigest() != data.get("sha256"):
                raise TransportError(f"{result['server']}'s file does not match the sha256 it reported")
            await sink.commit()
        except BaseException:
            await sink.discard()
            raise
        return target
    finally:
        if name:
            await files.delete(name)
