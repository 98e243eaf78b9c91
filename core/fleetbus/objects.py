"""Streaming files through the JetStream object store, in bounded memory.

nats-py's ObjectStore.get gathers a whole object in memory (or writes it from a
thread), and put reads from a blocking file in a thread with one acknowledged publish
per chunk. Transfers here go between async sources and sinks of any size, so this
module writes and reads the same on-the-wire format (readable by the ``nats object``
tool) with a window of in-flight publishes and an ordered consumer for reads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_DIGEST_TYPE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from .errors import NotFound, TransportError

CHUNK_BYTES = 256 * 1024
PUBLISH_WINDOW = 16


@dataclass(frozen=True)
class StoredObject:
    name: str
    size: int
    sha256: str


class ObjectFiles:
    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)

    def _meta_subject(self, name: str) -> str:
        return OBJ_META_PRE_TEMPLATE.format(
            bucket=self.bucket, obj=base64.urlsafe_b64encode(name.encode()).decode()
        )

    async def info(self, name: str) -> api.ObjectInfo:
        try:
            msg = await self.js.get_last_msg(self.stream, self._meta_subject(name))
        except NotFoundError:
            raise NotFound(f"no object named {name} in {self.bucket}") from None
        info = api.ObjectInfo.from_response(json.loads(msg.data or b"{}"))
        if info.deleted:
            raise NotFound(f"no object named {name} in {self.bucket}")
        return info

    async def write(self, name: str, chunks: AsyncIterator[bytes]) -> StoredObject:
        """Store everything ``chunks`` yields under ``name``; return its size and sha256."""
        nuid = self.js._nc._nuid.next().decode()
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)
        digest = hashlib.sha256()
        size = 0
        count = 0
        pending: set[asyncio.Future[api.PubAck]] = set()
        buf = bytearray()

        async def flush_chunk(data: bytes) -> None:
            nonlocal count
            while len(pending) >= PUBLISH_WINDOW:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    fut.result()
            pending.add(await self.js.publish_async(chunk_subject, data))
            count += 1

        try:
            async for piece in chunks:
                digest.update(piece)
                size += len(piece)
                buf += piece
                while len(buf) >= CHUNK_BYTES:
                    await flush_chunk(bytes(buf[:CHUNK_BYTES]))
                    del buf[:CHUNK_BYTES]
            if buf:
                await flush_chunk(bytes(buf))
            for fut in asyncio.as_completed(list(pending)):
                await fut
            pending.clear()
            info = api.ObjectInfo(
                name=name,
                bucket=self.bucket,
                nuid=nuid,
                size=size,
                chunks=count,
                mtime=datetime.now(UTC).isoformat(),
                digest=OBJ_DIGEST_TEMPLATE.format(
                    digest=base64.urlsafe_b64encode(digest.digest()).decode()
                ),
                options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
            )
            await self.js.publish(
                self._meta_subject(name),
                json.dumps(info.as_dict()).encode(),
                headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
            )
        except BaseException:
            for fut in pending:
                fut.cancel()
            try:
                await self.js.purge_stream(self.stream, subject=chunk_subject)
            except Exception:
                pass
            raise
        return StoredObject(name=name, size=size, sha256=digest.hexdigest())

    async def read(self, name: str) -> tuple[int, AsyncIterator[bytes]]:
        """The object's size and an iterator over its bytes, checked against its digest."""
        info = await self.info(name)
        size = int(info.size or 0)
        expected = (info.digest or "").replace(OBJ_DIGEST_TYPE, "")

        async def chunks() -> AsyncIterator[bytes]:
            if size == 0:
                return
            subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
            sub = await self.js.subscribe(subject, ordered_consumer=True, pending_bytes_limit=8 * CHUNK_BYTES * PUBLISH_WINDOW)
            digest = hashlib.sha256()
            got = 0
            try:
                async for msg in sub.messages:
                    digest.update(msg.data)
                    got += len(msg.data)
                    yield msg.data
                    if msg.metadata.num_pending == 0 or got >= size:
                        break
            finally:
                await sub.unsubscribe()
            if got != size or (
                expected and base64.urlsafe_b64encode(digest.digest()).decode() != expected
            ):
                raise TransportError(f"object {name} is corrupt (size or digest mismatch)")

        return size, chunks()

    async def delete(self, name: str) -> None:
        try:
            info = await self.info(name)
        except NotFound:
            return
        info.deleted = True
        info.size = 0
        info.chunks = 0
        info.digest = ""
        await self.js.publish(
            self._meta_subject(name),
            json.dumps(info.as_dict()).encode(),
            headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
        )
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        await self.js.purge_stream(self.stream, subject=chunk_subject)
