"""The async Python client: what the CLI uses, and what other Python systems import.

    async with await Client.connect() as fb:
        result = await fb.exec("web1", ["uname", "-a"], on_output=print_chunk)
        await fb.put("web1", Path("app.tar"), "/srv/app.tar", mode=0o640)

Every failure raises a :class:`fleetbus.errors.FleetbusError` subclass whose ``code`` is
the bus error code. A request to a server no process serves fails at once: NATS answers
"no responders", and the client asks the registry whether the server exists to raise
:class:`NotFound` or :class:`ServerOffline`.

A command with an id whose worker dies while running it raises :class:`Lost` within
seconds (the client reads the command's claim while it waits); see docs/bus-api.md,
"Command ids and at-most-once".

Connected with a user's nkey seed or creds file (docs/security.md, "Connecting as a
user"), the client takes its inboxes under ``_I.<its public key>`` and sends a server's
operations on the subjects its grants allow (:mod:`fleetbus.userroutes`); it reads no
JetStream, which a user may not (so no claim watching: ``lost`` is not reported early).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import getpass
import hashlib
import inspect
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import nats.errors
from fleetbus_base.pagecache import DropBehind
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from .connection import NatsSettings, connect, user_inbox_prefix
from .dedupe import CommandMemory
from .errors import (
    Cancelled,
    FleetbusError,
    Forbidden,
    InvalidRequest,
    Lost,
    NotFound,
    ServerOffline,
    Timeout,
    TransportError,
)
from .home import Home
from .lastseen import age_s, last_seen
from .limits import DEFAULT_STREAM_IDLE_S, DEFAULT_STREAM_WINDOW, MAX_INLINE_BYTES
from .names import check_server_name
from .objects import ObjectFiles
from .output import HDR_END, HDR_STREAM
from .replies import Replies
from .streams import Receiver, Sender, chunk_limit
from .subjects import DEFAULT_REPLY_PREFIXES, USER_INBOX_ROOT, Names, request_headers
from .userroutes import UserRoutes, ask_user_info

_log = logging.getLogger("fleetbus.client")
OutputCallback = Callable[[str, bytes], Awaitable[None] | None]
ProgressCallback = Callable[[int, int], None]
# Extra time beyond a command's own limit before the client stops waiting for a reply.
REPLY_GRACE_S = 30.0
# A server registered this recently and never served yet is probably about to be:
# workers subscribe its subjects when the registry watch reaches them, milliseconds
# after `servers add` returns (and a status saying "online since a moment ago" means
# that happened after the request went out). A request finding nobody then is
# retried for this long.
JUST_REGISTERED_S = 10.0
# users.reach answers from the registry and the users bucket, both in the core's reach.
ADMIN_REACH_TIMEOUT_S = 5.0
NOT_YET_SERVED_WAIT_S = 2.0
# A command with an id that has not answered within this is watched: its claim is read
# every CLAIM_CHECK_S, so a worker that died running it is known within seconds (the
# claim's worker lease expires, leases.py) instead of after the command's time limit.
CLAIM_CHECK_S = 1.0
# A request with an id that no worker has claimed this long after it went out was lost
# on its way (with the NATS node its worker was connected to, which our connection never
# saw go): it is sent again. A copy that did arrive meanwhile cannot run it twice: the
# claim is taken once, and the other copy is answered from it.
UNCLAIMED_RESEND_S = 5.0
MAX_RESENDS = 5
FILE_CHUNK = 256 * 1024
# A user (whose connection's inboxes are _I.<its public key>.) reaches none of fleetbus's JetStream:
# asking the object store would only time out.
_USERS_STREAM_ONLY = ("the object store is fleetbus's own: as a user, move files by streaming "
                      "(via='stream', the default)")
# How often a user's client asks for a job it follows (users cannot read job events).
JOB_POLL_S = 1.0


@dataclass(frozen=True)
class ExecOutcome:
    id: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    raw: dict[str, Any]


def default_requester() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Client:
    def __init__(self, nc: NATS, names: Names, requester: str | None = None,
                 routes: UserRoutes | None = None) -> None:
        self.nc = nc
        self.names = names
        self.requester = requester or default_requester()
        #: Set when connected as a user: where its permissions let it send (userroutes).
        self.routes = routes
        self.files = ObjectFiles(nc.jetstream(timeout=30), names.files_bucket)
        self.replies = Replies(nc)
        self._memory: CommandMemory | None = None  # opened when a command is first watched
        # How the job service says this connection follows jobs ("events": the jobs
        # stream; "poll": jobs.get, for a user); learned from its replies.
        self._job_follow: str | None = None

    @classmethod
    async def connect(
        cls,
        settings: NatsSettings | None = None,
        *,
        url: str | None = None,
        home: str | Path | None = None,
        requester: str | None = None,
    ) -> Client:
        """Connect with ``settings`` (default: :meth:`NatsSettings.resolve`, so the
        environment, a context or ``fleetbus up``'s run file). With a user's nkey seed or
        creds file, the client is that user's (see the module); ``requester`` is what the
        audit trail records as declared, beside the identity NATS authenticated."""
        settings = settings or NatsSettings.resolve(url=url, home=Home.resolve(home))
        names = Names(settings.prefix)
        inbox = user_inbox_prefix(settings)
        nc = await connect(settings, name="fleetbus-client", reconnect_forever=False, user_inbox=True)
        if inbox is None:
            return cls(nc, names, requester)
        # An nkey or creds: a user's when NATS says its subscriptions are its own inboxes
        # (userperms.permissions, which also let it ask). Anyone else (the owner, fleetbus's
        # own identity on a shared NATS, an operator's creds) is answered on _INBOX as before.
        routes = await ask_user_info(nc, names, (inbox, DEFAULT_REPLY_PREFIXES[0]))
        if routes is None or not routes.is_user:
            await nc.close()
            nc = await connect(settings, name="fleetbus-client", reconnect_forever=False)
            return cls(nc, names, requester)
        return cls(nc, names, requester, routes)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()
        await self.replies.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # plumbing ---------------------------------------------------------------------
    async def _request(self, subject: str, body: dict[str, Any], timeout: float,
                       server: str | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode()
        # With a deadline for a server's command, when this client stops waiting: a
        # worker that reaches the request later (it was stopped, or far behind) answers
        # `timeout` instead of running it.
        headers = request_headers(self.requester, time.time() + timeout if server is not None else None)
        try:
            msg = await self.replies.request(subject, data, timeout, headers)
        except nats.errors.NoRespondersError:
            raise await self._nobody_serves(server) from None
        except nats.errors.TimeoutError:
            raise Timeout(f"no reply on {subject} within {timeout:g} s") from None
        except nats.errors.MaxPayloadError:
            raise InvalidRequest("the request is larger than NATS accepts") from None
        try:
            reply = json.loads(msg.data)
        except ValueError:
            raise FleetbusError(f"unreadable reply on {subject}") from None
        if not reply.get("ok"):
            raise FleetbusError.from_wire(reply.get("error") or {})
        return reply

    async def _nobody_serves(self, server: str | None) -> FleetbusError:
        if server is None:
            return ServerOffline("the fleetbus core is not running (nobody answers the admin API)")
        if self.routes is not None:
            # A user cannot ask the registry, and a grant that does not cover the server
            # looks to NATS exactly like a server nobody serves.
            return _NoGrantReaches(f"no grant of yours reaches {server}: it is outside your grants, "
                                   "or nobody serves it right now")
        try:
            found = await self.get_server(server)
        except NotFound:
            return NotFound(f"no server named {server}")
        except ServerOffline:
            return ServerOffline(f"nobody serves {server} right now")
        transport = found["server"]["transport"]
        status = found.get("status")
        if await _serves_connected_only(transport):
            message = f"nobody serves {server} right now: its agent is not connected ({last_seen(status)})"
        else:
            message = f"nobody serves {server} right now: no running worker has the {transport!r} transport for it"
        if status is None:  # never served: about to be, if it was registered just now
            fresh = age_s(found["server"].get("created")) < JUST_REGISTERED_S
        else:  # a worker began serving it just now, after our request found nobody
            fresh = status.get("state") == "online" and age_s(status.get("since")) < JUST_REGISTERED_S
        return _NotServedYet(message) if fresh else ServerOffline(message)

    async def _server(self, server: str, op: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        check_server_name(server)
        if self.routes is not None:
            return await self._through_grants(server, op, body, timeout)
        subject = self.names.server(server, op)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + NOT_YET_SERVED_WAIT_S
        command_id = body.get("id") if op in ("exec", "put") else None
        while True:
            try:
                if command_id is None:
                    return await self._request(subject, body, timeout, server=server)
                return await self._watched(
                    lambda: self._request(subject, body, timeout, server=server), server, op,
                    command_id, resendable="stream" not in body)
            except _NotServedYet:
                # Nobody received the request, so sending it again cannot run it twice.
                if loop.time() >= give_up:
                    raise
                await asyncio.sleep(0.05)

    async def _through_grants(self, server: str, op: str, body: dict[str, Any],
                              timeout: float) -> dict[str, Any]:
        """A user's request: on each subject its permissions allow for ``op`` on
        ``server`` in turn (userroutes), until one has a responder; when none has, the
        error says why (:meth:`_unreached`), after a short wait for a server that a
        worker is just starting to serve."""
        assert self.routes is not None
        subjects = self.routes.subjects(server, op) or [self.names.server(server, op)]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + NOT_YET_SERVED_WAIT_S
        while True:
            for subject in subjects:
                try:
                    return await self._request(subject, body, timeout, server=server)
                except _NoGrantReaches:
                    continue  # nobody received it: nothing ran
            if op == "cancel":  # nothing to explain: nobody runs the command there
                raise _NoGrantReaches(f"nobody runs that command on {server} through your grants")
            why = await self._unreached(server, op)
            if not isinstance(why, _NotServedYet) or loop.time() >= give_up:
                raise why
            await asyncio.sleep(0.05)  # nobody received it, so sending again cannot run it twice

    async def _unreached(self, server: str, op: str) -> FleetbusError:
        """Why none of a user's grant subjects for ``op`` on ``server`` had a responder:
        the core's ``users.reach`` tells a server outside the user's grants (forbidden)
        from one inside them that nobody serves (server_offline, with when it was last
        seen), which NATS answers alike."""
        try:
            reach = await self._request(self.names.admin("users.reach"), {"server": server, "op": op},
                                        ADMIN_REACH_TIMEOUT_S)
        except FleetbusError:
            # No core answering, or one from before users.reach: both stay possible.
            return _NoGrantReaches(f"no grant of yours reaches {server}: it is outside your grants, "
                                   "or nobody serves it right now")
        if reach.get("reach") != "granted":
            return _NoGrantReaches(f"{server} is outside your grants for {op}")
        status = reach.get("status")
        message = f"nobody serves {server} right now ({last_seen(status)})"
        if status is None:
            fresh = age_s(reach.get("created")) < JUST_REGISTERED_S
        else:
            fresh = status.get("state") == "online" and age_s(status.get("since")) < JUST_REGISTERED_S
        return _NotServedYet(message) if fresh else ServerOffline(message)

    async def _watched(self, send: Callable[[], Awaitable[dict[str, Any]]], server: str, op: str,
                       command_id: str, resendable: bool) -> dict[str, Any]:
        """``send()``'s reply, or sooner what the command's claim says: ``lost`` once the
        worker holding it died, or the stored reply (one the worker stored and whose
        answer to us was lost, as across a NATS reconnect).

        A request that NATS lost (no claim exists for it once our connection is back
        from a reconnect, or :data:`UNCLAIMED_RESEND_S` after it went out) is sent again,
        ``resendable`` permitting: with the same id, a second copy that did arrive is
        answered from the first, never run twice."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_RESENDS + 1):
            reconnects = self.nc.stats["reconnects"]
            sent_at = loop.time()
            asked = asyncio.ensure_future(send())
            watch: asyncio.Future[dict[str, Any] | None] | None = None
            try:
                # Most commands answer within the first check's delay: no watch for them.
                done, _ = await asyncio.wait({asked}, timeout=CLAIM_CHECK_S)
                if done:
                    return asked.result()
                watch = asyncio.ensure_future(self._watch_claim(
                    server, op, command_id, reconnects if resendable else None, sent_at, first_wait=False))
                done, _ = await asyncio.wait({asked, watch}, return_when=asyncio.FIRST_COMPLETED)
                if asked in done:
                    return asked.result()
                reply = watch.result()
                if reply is not None:
                    return reply
            finally:
                await _stop(asked, *([watch] if watch is not None else []))
        return await send()  # lost again and again: wait for this one to the end

    async def _watch_claim(self, server: str, op: str, command_id: str, reconnects: int | None,
                           sent_at: float, first_wait: bool = True) -> dict[str, Any] | None:
        """Returns the stored reply, None when the request was lost (``reconnects``: our
        reconnect count when it was sent, at loop time ``sent_at``; None: never say so),
        or raises the stored error or ``lost``. Reads the claim every
        :data:`CLAIM_CHECK_S` (the first time at once unless ``first_wait``)."""
        loop = asyncio.get_running_loop()
        while True:
            if first_wait:
                await asyncio.sleep(CLAIM_CHECK_S)
            first_wait = True
            try:
                memory = await self._command_memory()
                claim = await memory.settle(await memory.load(server, op, command_id), None)
            except Exception as exc:
                # JetStream unavailable for now, or a deployment without leases: watching
                # is a bonus, the reply may still come.
                _log.debug("command %s: could not read its claim: %s", command_id, type(exc).__name__)
                continue
            if claim.outcome == "lost":
                raise Lost(f"command {command_id} on {server}: the worker running it died before it "
                           "answered; whether the process ran is unknown (retry with a new id to "
                           "run it again)")
            if claim.outcome == "replay" and claim.reply is not None:
                if not claim.reply.get("ok"):
                    raise FleetbusError.from_wire(claim.reply.get("error") or {})
                return claim.reply
            if (claim.outcome == "dropped" and reconnects is not None and self.nc.is_connected
                    and (self.nc.stats["reconnects"] != reconnects
                         or loop.time() - sent_at >= UNCLAIMED_RESEND_S)):
                return None

    async def _command_memory(self) -> CommandMemory:
        if self._memory is None:
            js = self.nc.jetstream(timeout=5)
            commands = await js.key_value(self.names.commands_bucket)
            workers = await js.key_value(self.names.workers_bucket)
            self._memory = CommandMemory(commands, workers)
        return self._memory

    async def _admin(self, endpoint: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        return await self._request(self.names.admin(endpoint), body, timeout)

    async def admin(self, endpoint: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Call the admin endpoint ``endpoint`` (``users.add``, ...; docs/bus-api.md) with
        ``body``: its reply, or the error it answered raised as its exception."""
        return await self._admin(endpoint, body, timeout)

    # commands -------------------------------------------------------------------------
    async def exec(
        self,
        server: str,
        argv: list[str] | None = None,
        *,
        shell: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float = 600.0,
        on_output: OutputCallback | None = None,
        command_id: str | None = None,
    ) -> ExecOutcome:
        """Run a process on ``server``; stream its output to ``on_output(stream, bytes)``.

        Pass ``command_id`` to make the command retry-safe (a retry with the same id is
        not run twice) and cancellable with :meth:`cancel`; it costs one JetStream
        round trip. Without it fleetbus names the command itself (see the result's id).
        """
        body: dict[str, Any] = {"timeout_s": timeout_s}
        if command_id is not None:
            body["id"] = command_id
        if shell is not None:
            body["shell"] = shell
        else:
            body["argv"] = argv
        if env:
            body["env"] = env
        if cwd:
            body["cwd"] = cwd
        if stdin is not None:
            body["stdin_b64"] = base64.b64encode(stdin).decode()
        stream = None
        if on_output is not None:
            stream = _OutputStream(on_output)
            body["output_subject"] = self.nc.new_inbox()
            stream.sub = await self.nc.subscribe(body["output_subject"], cb=stream.on_msg)
        try:
            reply = await self._server(server, "exec", body, timeout_s + REPLY_GRACE_S)
        except FleetbusError:
            if stream is not None:
                await stream.finish(1.0)
            raise
        if stream is not None:
            await stream.finish(5.0)
        return ExecOutcome(
            id=reply["id"], exit_code=reply.get("exit_code"), signal=reply.get("signal"),
            stdout=reply.get("stdout", ""), stderr=reply.get("stderr", ""),
            stdout_truncated=bool(reply.get("stdout_truncated")),
            stderr_truncated=bool(reply.get("stderr_truncated")),
            duration_s=float(reply.get("duration_s", 0.0)), raw=reply,
        )

    async def cancel(self, server: str, command_id: str, timeout: float = 3.0) -> bool:
        """Ask whoever runs ``command_id`` on ``server`` to stop it; False if none did."""
        check_server_name(server)
        try:
            if self.routes is not None:
                await self._through_grants(server, "cancel", {"id": command_id}, timeout)
            else:
                await self._request(self.names.server(server, "cancel"), {"id": command_id}, timeout, server)
        except (Timeout, ServerOffline, NotFound, _NoGrantReaches):
            return False
        return True

    async def put(
        self,
        server: str,
        source: bytes | Path,
        path: str,
        *,
        mode: int | None = None,
        make_parents: bool = True,
        progress: ProgressCallback | None = None,
        command_id: str | None = None,
        timeout_s: float = 6 * 3600.0,
        via: str = "stream",
        idle_s: float = DEFAULT_STREAM_IDLE_S,
    ) -> dict[str, Any]:
        """Write ``source`` (bytes or a local file) to ``path`` on ``server`` atomically.

        Content above the inline limit is streamed straight to the worker (``via
        "stream"``) or goes through the object store (``via="object"``). ``idle_s``:
        a worker silent this long mid-transfer ends it with :class:`Timeout`. A user
        (a connection whose inboxes are ``_I.<public key>.``) may only stream: ``via="object"``
        raises :class:`Forbidden` at once.
        """
        if via not in ("stream", "object"):
            raise ValueError("via must be 'stream' or 'object'")
        if via == "object" and self.nc.new_inbox().startswith(f"{USER_INBOX_ROOT}."):
            raise Forbidden(_USERS_STREAM_ONLY, before_start=True)
        body: dict[str, Any] = {"path": path, "make_parents": make_parents}
        if command_id is not None:
            body["id"] = command_id
        if mode is not None:
            body["mode"] = f"{mode:04o}"
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        if size <= MAX_INLINE_BYTES:
            data = source if isinstance(source, bytes) else source.read_bytes()
            body["content_b64"] = base64.b64encode(data).decode()
            reply = await self._server(server, "put", body, timeout_s)
            if progress:
                progress(size, size)
            return reply
        check_server_name(server)
        if via == "stream":
            return await self._put_stream(server, source, size, body, progress, timeout_s, idle_s)
        name = f"put/{server}/{command_id or uuid.uuid4().hex}"
        stored = await self.files.write(name, read_chunks(source, size, progress))
        body.update(object=name, sha256=stored.sha256)
        try:
            return await self._server(server, "put", body, timeout_s)
        finally:
            await self.files.delete(name)

    async def _put_stream(self, server: str, source: bytes | Path, size: int, body: dict[str, Any],
                          progress: ProgressCallback | None, timeout_s: float,
                          idle_s: float) -> dict[str, Any]:
        # The worker names its side in its first credit: one token under our xfer root.
        sender = Sender(self.nc, None, 0, idle_s, "worker", peer_root=self.names.xfer_root)
        body["stream"] = {"subject": await sender.open(), "size": size, "idle_s": idle_s}
        request = asyncio.ensure_future(self._server(server, "put", body, timeout_s))
        digest = hashlib.sha256()
        limit = chunk_limit(self.nc)

        async def pump() -> None:
            async for chunk in _read_hashed(source, limit, digest):
                await sender.send(chunk, limit)
                if progress:
                    progress(sender.size, size)
            await sender.end(digest.hexdigest())

        pumping = asyncio.ensure_future(pump())
        try:
            await asyncio.wait({request, pumping}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                return request.result()  # an early reply: an error, or a replayed retry
            try:
                pumping.result()
            except FleetbusError as exc:
                # The worker aborted or went silent: its reply, if one comes, says why.
                return await _authoritative(request, exc)
            reply = await sender.watch(request)
            if reply.get("sha256") != digest.hexdigest():
                raise TransportError(f"{server} stored content whose sha256 differs from {path_of(source)}")
            return reply
        except BaseException as exc:
            if not request.done() or request.cancelled() or request.exception() is None:
                await sender.abort(exc if isinstance(exc, FleetbusError) else Cancelled("the requester stopped"))
            raise
        finally:
            await _stop(pumping, request)
            await sender.close()

    async def get(
        self,
        server: str,
        path: str,
        dest: Path | None = None,
        *,
        progress: ProgressCallback | None = None,
        timeout_s: float = 6 * 3600.0,
        via: str = "stream",
        idle_s: float = DEFAULT_STREAM_IDLE_S,
        window: int = DEFAULT_STREAM_WINDOW,
    ) -> tuple[dict[str, Any], bytes | None]:
        """Read ``path`` from ``server``: into ``dest`` if given (any size), else into memory.

        A file above the inline limit is streamed from the worker (``via="stream"``) or
        fetched through the object store (``via="object"``, not for a user: raises
        :class:`Forbidden`). ``dest`` is replaced only once the whole file arrived and
        matched its sha256.
        """
        if via not in ("stream", "object"):
            raise ValueError("via must be 'stream' or 'object'")
        if via == "object" and self.nc.new_inbox().startswith(f"{USER_INBOX_ROOT}."):
            raise Forbidden(_USERS_STREAM_ONLY, before_start=True)
        if via == "stream":
            return await self._get_stream(server, path, dest, progress, timeout_s, idle_s, window)
        body: dict[str, Any] = {"path": path}
        reply = await self._server(server, "get", body, timeout_s)
        if "content_b64" in reply:
            return await _inline_result(reply, dest, progress)
        name = reply["object"]
        try:
            size, chunks = await self.files.read(name)
            if dest is None:
                buf = bytearray()
                async for chunk in chunks:
                    buf += chunk
                    if progress:
                        progress(len(buf), size)
                return reply, bytes(buf)
            await _stream_to_file(dest, chunks, size, progress)
            return reply, None
        finally:
            await self.files.delete(name)

    async def _get_stream(self, server: str, path: str, dest: Path | None,
                          progress: ProgressCallback | None, timeout_s: float, idle_s: float,
                          window: int) -> tuple[dict[str, Any], bytes | None]:
        check_server_name(server)
        receiver = Receiver(self.nc, None, window, idle_s, "worker", peer_root=self.names.xfer_root)
        body = {"path": path, "stream": {"subject": await receiver.open(), "window": window,
                                         "idle_s": idle_s}}
        request = asyncio.ensure_future(self._server(server, "get", body, timeout_s))
        sink = FileSink(dest) if dest is not None else _MemorySink()

        async def pump() -> None:
            async for chunk in receiver.chunks(grant_first=False):
                await sink.write(chunk)
                if progress:
                    progress(receiver.size, receiver.expected or -1)
            await sink.flush()

        pumping = asyncio.ensure_future(pump())
        try:
            await asyncio.wait({request, pumping}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                reply = request.result()
                if "content_b64" in reply:  # small files come back inline
                    return await _inline_result(reply, dest, progress)
                await pumping
            else:
                try:
                    pumping.result()
                except FleetbusError as exc:
                    await _authoritative(request, exc)
                    raise
                # The reply follows the end at once: a worker that sent the end but never
                # replies is gone.
                try:
                    async with asyncio.timeout(idle_s):
                        reply = await request
                except TimeoutError:
                    raise Timeout(f"no reply from {server} within {idle_s:g} s after the file arrived") from None
            if reply.get("sha256") != receiver.sha256 or reply.get("size") != receiver.size:
                raise TransportError(f"the file from {server} does not match the size and sha256 "
                                     "the worker reported")
            if progress:
                progress(receiver.size, receiver.size)
            return reply, await sink.commit()
        except BaseException as exc:
            await receiver.abort(exc if isinstance(exc, FleetbusError) else Cancelled("the requester stopped"))
            raise
        finally:
            await _stop(pumping, request)
            await receiver.close()
            await sink.discard()

    async def info(self, server: str, timeout_s: float = 60.0) -> dict[str, Any]:
        return await self._server(server, "info", {}, timeout_s)

    async def ping(self, server: str, timeout_s: float = 30.0) -> dict[str, Any]:
        return await self._server(server, "ping", {}, timeout_s)

    # jobs --------------------------------------------------------------------------------
    async def _jobs(self, verb: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = await self._request(self.names.jobs(verb), body, timeout)
        if reply.get("follow") in ("events", "poll"):
            self._job_follow = reply["follow"]
        return reply

    async def start_job(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Start a job (the body of ``jobs.start``: docs/bus-api.md, "Jobs"); returns at
        once with its ``id`` and ``targets`` (with ``dry_run``: the targets only)."""
        return await self._jobs("start", request, timeout)

    async def rerun_job(self, job: str, failed: bool = False, dry_run: bool = False,
                        client_notes: dict[str, Any] | None = None, put_object: str | None = None) -> dict[str, Any]:
        """Start ``job``'s request again on its targets (``failed``: those not ``ok``);
        returns as :meth:`start_job` does. ``client_notes`` replace the job's own;
        ``put_object``: a ``put`` job's content stored again (same sha256)."""
        body: dict[str, Any] = {"id": job, "failed": failed, "dry_run": dry_run}
        if client_notes is not None:
            body["client_notes"] = client_notes
        if put_object is not None:
            body["put_object"] = put_object
        return await self._jobs("rerun", body, 30.0)

    async def get_job(self, job: str) -> dict[str, Any]:
        return await self._jobs("get", {"id": job}, 30.0)

    async def list_jobs(self, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs, newest first; ``before``: those older than that job."""
        body: dict[str, Any] = {"limit": limit} if before is None else {"limit": limit, "before": before}
        return (await self._request(self.names.jobs("list"), body, 30.0))["jobs"]

    async def cancel_job(self, job: str) -> dict[str, Any]:
        return await self._request(self.names.jobs("cancel"), {"id": job}, 10.0)

    async def follows_by_polling(self, job: str) -> bool:
        """Whether this connection follows ``job`` by polling ``jobs.get`` (a user's:
        users may not read job events) rather than from the jobs stream; asks the job
        service once when no reply has said yet."""
        if self._job_follow is None:
            await self.get_job(job)
        return self._job_follow == "poll"

    async def follow_job(self, job: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """A job's kept records from its start, as they come: ``("started", definition)``,
        ``("result", server result)`` ..., then ``("finished", summary)``, where it ends.

        Read from the jobs stream, so none is missed however late this begins; a user's
        connection asks ``jobs.get`` every :data:`JOB_POLL_S` instead, and also yields
        ``("progress", {"job", "counts"})`` each time. Close it (``contextlib.aclosing``)
        when leaving early.
        """
        if await self.follows_by_polling(job):
            async for item in self._poll_job(job):
                yield item
            return
        sub = await self.nc.jetstream().subscribe(
            self.names.job_event(job, "*"), stream=self.names.jobs_stream, ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0)
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                kind = msg.subject.rsplit(".", 1)[-1]
                yield kind, json.loads(msg.data)
                if kind == "finished":
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):  # closing anyway: the consumer expires
                await sub.unsubscribe()

    async def _poll_job(self, job: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """:meth:`follow_job` through ``jobs.get``: results are kept in order, so the new
        ones are those past the count already yielded."""
        seen = -1  # results yielded; -1: not even the definition yet
        started = time.monotonic()
        while True:
            got = await self.get_job(job)
            if seen < 0:
                yield "started", got["job"]
                seen = 0
            results = got.get("results") or []
            for result in results[seen:]:
                yield "result", result
            seen = max(seen, len(results))
            if got.get("summary") is not None:
                yield "finished", got["summary"]
                return
            yield "progress", {"job": job, "counts": got.get("counts") or {},
                               "elapsed_s": round(time.monotonic() - started, 3)}
            await asyncio.sleep(JOB_POLL_S)

    # admin -------------------------------------------------------------------------------
    async def add_server(self, server: dict[str, Any], replace: bool = False) -> dict[str, Any]:
        return await self._admin("servers.add", {"server": server, "replace": replace})

    async def list_servers(self) -> list[dict[str, Any]]:
        return (await self._admin("servers.list", {}))["servers"]

    async def get_server(self, name: str) -> dict[str, Any]:
        return await self._admin("servers.get", {"name": name})

    async def remove_server(self, name: str) -> None:
        await self._admin("servers.remove", {"name": name})

    async def rotate_key(self, name: str) -> dict[str, Any]:
        """A new secret key for an outbound-agent server; the old one stops working at once."""
        return await self._admin("servers.rotate-key", {"name": name})

    async def revoke_key(self, name: str) -> None:
        await self._admin("servers.revoke-key", {"name": name})

    async def list_gateways(self) -> list[dict[str, Any]]:
        return (await self._admin("gateways.list", {}))["gateways"]

    async def add_credential(
        self, name: str, type: str, secret: bytes, *, user: str | None = None,
        passphrase: bytes | None = None, description: str | None = None, replace: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name, "type": type, "user": user, "description": description,
            "secret_b64": base64.b64encode(secret).decode(), "replace": replace,
        }
        if passphrase is not None:
            body["passphrase_b64"] = base64.b64encode(passphrase).decode()
        return (await self._admin("credentials.add", body))["credential"]

    async def list_credentials(self) -> list[dict[str, Any]]:
        return (await self._admin("credentials.list", {}))["credentials"]

    async def remove_credential(self, name: str, force: bool = False) -> dict[str, Any]:
        return await self._admin("credentials.remove", {"name": name, "force": force})


class _OutputStream:
    """Delivers live output in publish order and notices the end marker."""

    def __init__(self, callback: OutputCallback) -> None:
        self.callback = callback
        self.sub: Any = None
        self.ended = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get(HDR_END):
            self.ended.set()
            return
        result = self.callback(headers.get(HDR_STREAM, "stdout"), msg.data)
        if inspect.isawaitable(result):
            await result

    async def finish(self, wait_s: float) -> None:
        # The reply can overtake the last output chunks (separate subscriptions), so wait
        # for the end marker before returning: no output is lost.
        try:
            await asyncio.wait_for(self.ended.wait(), timeout=wait_s)
        except TimeoutError:
            pass
        if self.sub is not None:
            await self.sub.unsubscribe()


async def read_chunks(source: bytes | Path, size: int, progress: ProgressCallback | None) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        for offset in range(0, len(source), FILE_CHUNK):
            yield source[offset : offset + FILE_CHUNK]
            if progress:
                progress(min(offset + FILE_CHUNK, size), size)
        return
    done = 0
    # Opening a local file does not wait on anything; the reads go to a thread.
    with open(source, "rb") as fh:  # noqa: ASYNC230
        while True:
            chunk = await asyncio.to_thread(fh.read, 4 * FILE_CHUNK)
            if not chunk:
                break
            done += len(chunk)
            yield chunk
            if progress:
                progress(done, size)


def _write_file(dest: Path, parts: list[bytes]) -> None:
    with open(dest, "wb") as fh:
        fh.writelines(parts)


def path_of(source: bytes | Path) -> str:
    return "the bytes given" if isinstance(source, bytes) else str(source)


async def _stop(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they have ended, whatever they raise."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _authoritative(request: asyncio.Future[dict[str, Any]], failure: FleetbusError,
                         wait_s: float = 2.0) -> dict[str, Any]:
    """After the stream failed, the worker's reply (if it comes soon) has the real error;
    without one, ``failure`` (what the stream saw) is raised."""
    try:
        async with asyncio.timeout(wait_s):
            return await asyncio.shield(request)
    except TimeoutError:
        raise failure from None


async def _inline_result(reply: dict[str, Any], dest: Path | None,
                         progress: ProgressCallback | None) -> tuple[dict[str, Any], bytes | None]:
    data = base64.b64decode(reply.pop("content_b64"))
    if progress:
        progress(len(data), len(data))
    if dest is None:
        return reply, data
    await asyncio.to_thread(_write_file, dest, [data])
    return reply, None


async def _read_hashed(source: bytes | Path, limit: int, digest: Any) -> AsyncIterator[bytes | memoryview]:
    """The content in pieces of ``limit`` bytes, hashed as read; a file is read (and
    hashed) in a thread one piece ahead, so disk and hashing overlap the sending."""
    if isinstance(source, bytes):
        view = memoryview(source)
        for offset in range(0, len(view), limit):
            piece = view[offset : offset + limit]
            digest.update(piece)
            yield piece
        return

    def read(fh: Any) -> bytes:
        data = fh.read(limit)
        digest.update(data)
        return data

    fh = await asyncio.to_thread(open, source, "rb")
    ahead: asyncio.Future[bytes] | None = None
    try:
        ahead = asyncio.ensure_future(asyncio.to_thread(read, fh))
        while True:
            data = await ahead
            if not data:
                break
            ahead = asyncio.ensure_future(asyncio.to_thread(read, fh))
            yield data
    finally:
        if ahead is not None and not ahead.done():
            await asyncio.gather(ahead, return_exceptions=True)
        await asyncio.to_thread(fh.close)


class _MemorySink:
    def __init__(self) -> None:
        self.buf = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.buf += chunk

    async def flush(self) -> None:
        pass

    async def commit(self) -> bytes:
        return bytes(self.buf)

    async def discard(self) -> None:
        self.buf = bytearray()


class FileSink:
    """Writes into a temporary file beside ``dest``, renamed over it only on commit, so
    a failed download never leaves a partial file under the destination's name. Writes
    are gathered to about 1 MiB and run in a thread one batch behind the receiving; a
    large file is kept out of the page cache as it is written (``DropBehind``), and
    flushed to disk before the rename so that none of it stays cached."""

    BATCH = 1024 * 1024

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.temp = dest.with_name(f".{dest.name}.fleetbus-{uuid.uuid4().hex[:8]}")
        self.fh: Any = None
        self.batch: list[bytes] = []
        self.batched = 0
        self.behind: asyncio.Future[None] | None = None
        self.drop: DropBehind | None = None

    async def write(self, chunk: bytes) -> None:
        self.batch.append(chunk)
        self.batched += len(chunk)
        if self.batched >= self.BATCH:
            await self._write_behind()

    async def _write_behind(self) -> None:
        if self.fh is None:
            self.fh = await asyncio.to_thread(open, self.temp, "xb")
            self.drop = DropBehind(self.fh.fileno())
        if self.behind is not None:
            await self.behind
        batch, batched, self.batch, self.batched = self.batch, self.batched, [], 0
        self.behind = asyncio.ensure_future(asyncio.to_thread(self._write, batch, batched))

    def _write(self, batch: list[bytes], batched: int) -> None:
        self.fh.writelines(batch)
        self.fh.flush()
        assert self.drop is not None
        self.drop.wrote(batched)

    async def flush(self) -> None:
        await self._write_behind()
        if self.behind is not None:
            await self.behind

    async def commit(self) -> None:
        await self.flush()
        fh, self.fh = self.fh, None
        assert self.drop is not None
        await asyncio.to_thread(self.drop.finish, True)
        await asyncio.to_thread(fh.close)
        await asyncio.to_thread(os.replace, self.temp, self.dest)

    async def discard(self) -> None:
        if self.behind is not None and not self.behind.done():
            await asyncio.gather(self.behind, return_exceptions=True)
        fh, self.fh = self.fh, None
        if fh is not None:
            await asyncio.to_thread(fh.close)
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, self.temp)


async def _stream_to_file(dest: Path, chunks: AsyncIterator[bytes], size: int,
                          progress: ProgressCallback | None) -> None:
    done = 0
    fh = await asyncio.to_thread(open, dest, "wb")
    try:
        async for chunk in chunks:
            await asyncio.to_thread(fh.write, chunk)
            done += len(chunk)
            if progress:
                progress(done, size)
    finally:
        await asyncio.to_thread(fh.close)


class _NoGrantReaches(Forbidden):
    """A user's request that nobody received on a grant subject (see _nobody_serves)."""


class _NotServedYet(ServerOffline):
    """Nobody answered for a server registered, or served again, moments ago: the
    workers' subscriptions are about to reach NATS, so the request is worth resending."""


async def _serves_connected_only(transport: str) -> bool:
    """Whether ``transport`` serves a server only while the server is connected to it
    (``Transport.serves_registered`` is False), as an outbound agent is.

    Then nobody serving a server means its agent is away, not that no worker runs the
    transport. Read from the installed plugins off the event loop (importing them takes
    a while), and only on this error path. A transport not installed here reads as one
    that serves every registered server, which keeps the general message.
    """
    return transport in await asyncio.to_thread(_connected_only_transports)


@functools.cache
def _connected_only_transports() -> frozenset[str]:
    from .plugins import load_plugins  # they import their client libraries: only when needed

    return frozenset(name for name, cls in load_plugins().transports.items() if not cls.serves_registered)
