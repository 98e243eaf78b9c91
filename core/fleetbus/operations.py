"""What each bus operation does with a server's open session.

The plugin host has parsed, claimed and given a slot to the command
(:mod:`fleetbus.commandrun`) and opened the server's session (:mod:`fleetbus.sessions`);
here the operation itself runs under its time limit and becomes the reply's body:
``exec`` with its live output on the requester's subject (``BusOutput``), ``put`` from
inline content, a stream from the requester (:mod:`fleetbus.streams`) or the object
store, ``get`` back the same three ways, ``info`` and ``ping``. Failures are raised
(fleetbus errors, or ``TimeoutError`` turned into ``timeout`` here); the command's one
error ladder in :mod:`fleetbus.commandrun` turns them into the reply. A transfer's
worker side listens on a fresh ``<p>.v1.xfer.<token>`` and takes messages from the
command's own requester only (:mod:`fleetbus.streams` says why).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS

from .errors import (
    Cancelled,
    FleetbusError,
    Forbidden,
    InternalError,
    InvalidRequest,
    Timeout,
    TooLarge,
    TransportError,
)
from .limits import MAX_INLINE_BYTES
from .messages import ExecRequest, GetRequest, PutRequest, Request
from .objects import ObjectFiles
from .objectshare import SharedObjects, SharedRead
from .output import BusOutput
from .records import Server
from .streams import BackgroundHash, Receiver, Sender, chunk_limit, xfer_token
from .subjects import OWNER, Identity, Names
from .transport import ExecSpec, PutSpec, Session

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .host import HostSettings

#: How much of a timed-out command's output its ``timeout`` error carries.
TIMEOUT_TAIL_CHARS = 4096


@dataclass
class Outcome:
    """How one command ended: the reply, and what its audit record and metrics count."""

    reply: dict[str, Any]
    exit_code: int | None = None
    bytes: int | None = None
    # False when the command never reached the server (FleetbusError.before_start):
    # its id claim is dropped instead of stored, so a retry runs it.
    ran: bool = True


@dataclass(slots=True)
class Target:
    """The server a command runs on, as the reply names it."""

    server: Server
    transport: str
    version: str


async def limited(coro: Awaitable[Outcome], seconds: float, what: str) -> Outcome:
    """``coro``'s outcome, or ``timeout`` when it runs longer than ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await coro
    except TimeoutError:
        raise Timeout(f"{what} did not finish within {seconds:g} s") from None


class Operations:
    """Runs exec, put, get, info and ping against an open session."""

    def __init__(self, nc: NATS, settings: HostSettings, files: ObjectFiles,
                 objects: SharedObjects, names: Names) -> None:
        self.nc = nc
        self.settings = settings
        self.files = files
        self.objects = objects
        self.names = names
        self.files_bucket = names.files_bucket

    async def run(self, session: Session, target: Target, op: str, req: Request,
                  command_id: str, identity: Identity = OWNER) -> Outcome:
        """Run ``req`` (operation ``op``) on ``session``, under its time limit: an exec's
        own ``timeout_s``, the transfer or quick limit of the host's settings.
        ``identity``: who sent the command, the only one a transfer takes messages from."""
        if isinstance(req, ExecRequest):
            return await self._exec(session, req, command_id)
        if isinstance(req, PutRequest):
            return await limited(self._put(session, req, command_id, identity),
                                 self.settings.transfer_timeout_s, "put")
        if isinstance(req, GetRequest):
            return await limited(self._get(session, target.server, req, command_id, identity),
                                 self.settings.transfer_timeout_s, "get")
        if op == "info":
            return await limited(self._info(session, target, command_id),
                                 self.settings.quick_timeout_s, "info")
        return await limited(self._ping(session, target, command_id),
                             self.settings.quick_timeout_s, "ping")

    async def _exec(self, session: Session, req: ExecRequest, command_id: str) -> Outcome:
        output = BusOutput(self.nc, command_id, req.output_subject, self.settings.tail_bytes)
        spec = ExecSpec(argv=req.argv, shell=req.shell, env=dict(req.env), cwd=req.cwd,
                        stdin=req.stdin_bytes(), timeout_s=req.timeout_s)
        started = time.monotonic()
        limit = asyncio.timeout(req.timeout_s)
        try:
            async with limit:
                result = await session.exec(spec, output)
            if limit.expired():
                # The transport swallowed our cancellation and returned: still a timeout.
                raise TimeoutError
        except TimeoutError:
            if not limit.expired():
                # A timeout inside the transport (a socket, a library), not our limit.
                await output.end(None, TransportError.code)
                raise TransportError(f"command {command_id} failed: the transport timed out") from None
            await output.end(None, Timeout.code)
            raise Timeout(
                f"command {command_id} ran past its {req.timeout_s:g} s limit and was killed",
                stdout=output.stdout.text()[-TIMEOUT_TAIL_CHARS:],
                stderr=output.stderr.text()[-TIMEOUT_TAIL_CHARS:],
            ) from None
        except asyncio.CancelledError:
            await output.end(None, Cancelled.code)
            raise
        except FleetbusError as exc:
            await output.end(None, exc.code)
            raise
        except BaseException:
            # Whatever went wrong, a consumer of the output subject must see the end.
            await output.end(None, TransportError.code)
            raise
        await output.end(result.exit_code)
        reply = {
            "ok": True,
            "id": command_id,
            "exit_code": result.exit_code,
            "signal": result.signal,
            "stdout": output.stdout.text(),
            "stderr": output.stderr.text(),
            "stdout_truncated": output.stdout.truncated,
            "stderr_truncated": output.stderr.truncated,
            "duration_s": round(time.monotonic() - started, 6),
        }
        return Outcome(reply=reply, exit_code=result.exit_code, bytes=output.bytes_out)

    async def _put(self, session: Session, req: PutRequest, command_id: str, identity: Identity) -> Outcome:
        content = req.content()
        if content is not None and len(content) > MAX_INLINE_BYTES:
            raise TooLarge(f"inline content is {len(content)} bytes; above {MAX_INLINE_BYTES} "
                           "send it through the object store")
        receiver: Receiver | None = None
        shared: SharedRead | None = None
        size: int | None
        if content is not None:
            size = len(content)

            async def inline() -> AsyncIterator[bytes]:
                yield content

            source: AsyncIterator[bytes] = inline()
        elif req.stream is not None:
            # The requester streams the content to us: one NATS hop, no object store.
            receiver = Receiver(self.nc, req.stream.subject, self.settings.stream_window,
                                req.stream.idle_s, "requester", sender=identity.key)
            await receiver.open(self.names.xfer(xfer_token()))
            size = req.stream.size
            source = receiver.chunks(grant_first=True)
        else:
            assert req.object is not None
            # Every put of this object on this worker shares one read of the store.
            shared = await self.objects.open(req.object)
            size, source = shared.size, shared.chunks()
        digest = hashlib.sha256()

        async def checked() -> AsyncIterator[bytes]:
            got = 0
            async for chunk in source:
                if receiver is None:
                    digest.update(chunk)  # a receiver hashes as it takes each chunk
                got += len(chunk)
                if size is not None and got > size:
                    raise TransportError(f"expected {size} bytes for {req.path}, got more")
                yield chunk
            # Raised before the transport renames the temporary file into place.
            if size is not None and got != size:
                raise TransportError(f"expected {size} bytes for {req.path}, got {got}")
            nonlocal sha256
            sha256 = receiver.sha256 if receiver is not None else digest.hexdigest()
            if req.sha256 is not None and sha256 != req.sha256:
                raise InvalidRequest(f"content of {req.path} does not match the given sha256")

        sha256: str | None = None
        try:
            stat = await session.put(PutSpec(path=req.path, mode=req.mode,
                                             make_parents=req.make_parents, size=size), checked())
        except BaseException as exc:
            if receiver is not None:
                # The requester may still be sending: tell it to stop now, not at a stall.
                error = exc if isinstance(exc, FleetbusError) else Cancelled("the put was stopped")
                await receiver.abort(error)
            raise
        finally:
            if receiver is not None:
                await receiver.close()
            if shared is not None:
                shared.release()
        if sha256 is None:
            # The transport returned without reading its source to the end (a plugin bug).
            if receiver is not None:  # the requester's digest was never checked: say so
                raise InternalError(f"the put of {req.path} finished without reading all its content")
            sha256 = digest.hexdigest()  # as before streams: the digest of what was read
        reply = {"ok": True, "id": command_id, "path": req.path, "size": stat.size,
                 "sha256": sha256, "mode": None if stat.mode is None else f"{stat.mode:04o}"}
        return Outcome(reply=reply, bytes=stat.size)

    async def _get(self, session: Session, server: Server, req: GetRequest, command_id: str,
                   identity: Identity) -> Outcome:
        remote = await session.get(req.path)
        digest = hashlib.sha256()
        reply: dict[str, Any] = {"ok": True, "id": command_id, "path": req.path,
                                 "mode": None if remote.mode is None else f"{remote.mode:04o}"}
        try:
            if req.object is None and remote.size <= req.max_inline:
                data = bytearray()
                async for chunk in remote.chunks:
                    data += chunk
                    if len(data) > req.max_inline:
                        raise TooLarge(f"{req.path} grew past {req.max_inline} bytes while being read")
                digest.update(data)
                reply.update(size=len(data), content_b64=base64.b64encode(data).decode())
            elif req.stream is not None:
                sent, sha256 = await self._send_stream(req, remote.size, remote.chunks, identity)
                reply.update(size=sent, sha256=sha256)
            else:
                if not identity.is_owner:
                    # The object store is fleetbus's own (commandrun refuses a user's named
                    # object): fleetbus must not write a user's file there either.
                    raise Forbidden(f"{req.path} is above the inline limit: as a user, get it with a "
                                    "streamed transfer (stream)", before_start=True)
                name = req.object or f"get/{server.name}/{command_id}"

                async def counted() -> AsyncIterator[bytes]:
                    async for chunk in remote.chunks:
                        digest.update(chunk)
                        yield chunk

                stored = await self.files.write(name, counted())
                reply.update(size=stored.size, object=name, bucket=self.files_bucket)
        finally:
            await remote.aclose()
        reply.setdefault("sha256", digest.hexdigest())
        return Outcome(reply=reply, bytes=reply["size"])

    async def _send_stream(self, req: GetRequest, size: int, chunks: AsyncIterator[bytes],
                           identity: Identity) -> tuple[int, str]:
        """Stream a file to the requester's subject within the credit it grants."""
        assert req.stream is not None
        sender = Sender(self.nc, req.stream.subject, req.stream.window, req.stream.idle_s, "requester",
                        sender=identity.key)
        sender.total = size or None
        await sender.open(self.names.xfer(xfer_token()))
        limit = chunk_limit(self.nc)
        hashing = BackgroundHash()
        try:
            async for chunk in chunks:
                await hashing.update(chunk)
                await sender.send(chunk, limit)
            sha256 = await hashing.hexdigest()
            await sender.end(sha256)
        except BaseException as exc:
            error = exc if isinstance(exc, FleetbusError) else Cancelled("the get was stopped")
            await sender.abort(error)
            raise
        finally:
            await hashing.settle()
            await sender.close()
        return sender.size, sha256

    async def _info(self, session: Session, target: Target, command_id: str) -> Outcome:
        facts = await session.info()
        reply = {
            "ok": True, "id": command_id, "server": target.server.name,
            "transport": target.transport,
            "transport_version": target.version,
            "hostname": facts.hostname, "os": facts.os, "os_version": facts.os_version,
            "kernel": facts.kernel, "arch": facts.arch, "uptime_s": facts.uptime_s,
            "extra": facts.extra,
        }
        return Outcome(reply=reply)

    async def _ping(self, session: Session, target: Target, command_id: str) -> Outcome:
        started = time.monotonic()
        await session.ping()
        return Outcome(reply={"ok": True, "id": command_id, "server": target.server.name,
                               "transport": target.transport,
                               "latency_s": round(time.monotonic() - started, 6)})
