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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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
# A reader gives up when no chunk arrives for this long: the object's chunks were purged
# under it (deleted), or JetStream stalled far past anything a healthy server does.
IDLE_S = 60.0
# nats-py drops a message that would take a subscription past its pending limit, and an
# ordered consumer then loses it unnoticed (it tracks the sequence before the drop): the
# read ends corrupt. JetStream's flow control holds a reader that falls behind to about
# 32 MiB in flight (measured with nats-server 2.15), so the limit sits well above that:
# flow control, not this limit, bounds the memory.
READ_PENDING_BYTES = 128 * 1024 * 1024


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
        return int(info.size or 0), self.chunks(info)

    async def chunks(self, info: api.ObjectInfo) -> AsyncIterator[bytes]:
        """The bytes of the object version ``info`` describes (its ``nuid``), as stored;
        raises TransportError at the end when they do not match its size and digest, and
        when none arrives for ``IDLE_S`` (chunks purged under the reader: deleted)."""
        size = int(info.size or 0)
        if size == 0:
            return
        expected = (info.digest or "").replace(OBJ_DIGEST_TYPE, "")
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        sub = await self.js.subscribe(subject, ordered_consumer=True,
                                      pending_bytes_limit=READ_PENDING_BYTES)
        digest = hashlib.sha256()
        got = 0
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=IDLE_S)
                except nats.errors.TimeoutError:
                    raise TransportError(f"object {info.name}: nothing arrived for {IDLE_S:g} s "
                                         f"after {got} of {size} bytes (deleted or expired?)") from None
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
            raise TransportError(f"object {info.name} is corrupt (size or digest mismatch)")

    async def watch(self, name: str, on_change: Callable[[], None]) -> Subscription:
        """Call ``on_change`` whenever ``name``'s metadata is written from now on: the
        object was replaced or deleted. Unsubscribe the returned subscription to stop."""

        async def changed(_msg: Msg) -> None:
            on_change()

        return await self.js._nc.subscribe(self._meta_subject(name), cb=changed)

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
