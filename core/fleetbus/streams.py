"""Direct transfers: file content streamed between a requester and the worker running
its ``put`` or ``get``, with credit-based flow control, over plain NATS messages.

Why not only the object store: through ``<b>_files`` every byte crosses NATS twice and
is written to JetStream's file store once, and upload and download cannot overlap
(docs/performance.md has the figures). A stream sends each byte across NATS once,
and the worker hands it to the transport while the next chunk is on its way.

Both directions use the same messages (NATS headers; docs/bus-api.md, "Streamed
transfers"):

- ``data``: raw bytes, ``Fleetbus-Seq`` 1, 2, 3, ... A gap means NATS dropped a message
  (core NATS is at most once), which fails the transfer instead of corrupting a file.
- ``end``: ``Fleetbus-Size`` and ``Fleetbus-Sha256`` of everything sent.
- ``credit``: ``Fleetbus-Credit`` more bytes the receiver will take; the sender never
  has more than the granted bytes (plus one chunk) unconsumed, so memory on both
  sides is bounded by the window whatever the file size.
- ``alive``: sent every few seconds by a side that has nothing else to say, so the
  other side can tell a slow peer from a vanished one.
- ``abort``: ``Fleetbus-Error`` (a bus error code), the message as the body.

Every wait has a deadline (``idle_s`` without a message from the peer), so a stalled
or vanished peer ends the transfer with ``timeout`` instead of holding a worker.

Where each side listens. The requester's side is one of its own inboxes (``_INBOX.``
for the owner, ``_I.<public key>.`` for a user), which the request names and the worker
checks like any reply subject. The worker's side is ``<p>.v1.xfer.<token>``
(:meth:`Names.xfer`), a fresh random token per transfer, for every requester: fleetbus's
account exports ``<p>.v1.xfer.>`` to the users' as a service, and users may publish
there, so a user's data and credit reach the worker across the import. The requester
learns the subject from the worker's first message (``Fleetbus-Subject``) and accepts
exactly that form, one token under its deployment's ``xfer`` root: never an inbox,
another server's command or an admin subject, where a forged first message would
otherwise have it publish a file.

Who may write to the worker's side. Any user may publish on ``<p>.v1.xfer.>``, so the
worker accepts a message only from the identity that sent the command
(``Nats-Request-Info``, :func:`subjects.identity_in`). Measured on nats-server 2.15.1
(issue 21 research, e9; tests/test_users_transfer.py checks it): a PLAIN publish, without a reply subject,
crossing the ``share: true`` service import carries ``Nats-Request-Info`` just as a
request does, with the publishing user's ``acc`` and ``user``; one the client wrote
itself is replaced (bob forging alice's key arrives as bob), a message without headers
gets it too, and a publish inside fleetbus's own account gets none (the owner).
A stranger's message is dropped and counted, never allowed to end the transfer (else
bob could abort alice's upload with one message). The token is random (128 bits, not a
sequential nuid) and kept out of logs and the audit trail, so a stranger cannot even
aim at a transfer it did not see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .errors import Cancelled, FleetbusError, InvalidRequest, Timeout, TransportError
from .limits import DEFAULT_STREAM_IDLE_S, DEFAULT_STREAM_WINDOW
from .subjects import HDR_CREDIT, HDR_ERROR, HDR_SEQ, HDR_SHA256, HDR_SIZE, HDR_SUBJECT, identity_in
from .subjects import HDR_TRANSFER as HDR_KIND

_log = logging.getLogger("fleetbus.streams")

KIND_DATA = "data"
KIND_END = "end"
KIND_CREDIT = "credit"
KIND_ALIVE = "alive"
KIND_ABORT = "abort"

DEFAULT_WINDOW = DEFAULT_STREAM_WINDOW
DEFAULT_IDLE_S = DEFAULT_STREAM_IDLE_S
# One data message: large enough that per-message costs vanish; the size of a chunk
# read by the agent ops (GET_CHUNK), so it travels on as one message. On a NATS with a
# smaller max_payload (1 MiB by default, headers included) chunks are split to fit.
MAX_CHUNK = 1024 * 1024
_HEADROOM = 16 * 1024
ALIVE_EVERY_S = 5.0
# Credit goes back in batches of this fraction of the window.
_GRANT_FRACTION = 4
# The token of a worker's subject: what xfer_token makes (token_urlsafe's alphabet).
_XFER_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def xfer_token() -> str:
    """A fresh token for a worker's side of a transfer (:meth:`Names.xfer`): 128 random
    bits, so nobody who did not see it can aim at the transfer (a nuid is sequential)."""
    return secrets.token_urlsafe(16)


def is_worker_subject(root: str, subject: str) -> bool:
    """Whether ``subject`` is a worker's side of a transfer: exactly one token under
    ``root`` (:attr:`Names.xfer_root`). What a requester learns from a first message
    must be that and nothing else: whoever wrote it must not choose where the
    requester publishes a file."""
    return subject.startswith(root) and _XFER_TOKEN_RE.fullmatch(subject[len(root):]) is not None


class BackgroundHash:
    """SHA-256 computed in a thread, one chunk behind the caller.

    hashlib releases the GIL on large inputs, so hashing a chunk overlaps the event
    loop's work on the next one (on the worker, feeding the transport) instead of
    adding about a millisecond per MiB to it. Updates stay in order: each waits for the
    previous one.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._behind: asyncio.Future[None] | None = None

    async def update(self, data: bytes | memoryview) -> None:
        if self._behind is not None:
            await self._behind
        self._behind = asyncio.get_running_loop().run_in_executor(None, self._digest.update, data)

    async def hexdigest(self) -> str:
        if self._behind is not None:
            await self._behind
            self._behind = None
        return self._digest.hexdigest()

    async def settle(self) -> None:
        """Wait for a hash still running (before its chunk's buffer may be reused)."""
        if self._behind is not None:
            await asyncio.gather(self._behind, return_exceptions=True)
            self._behind = None


def chunk_limit(nc: NATS) -> int:
    """The largest data body this connection may publish (leaving room for headers)."""
    return max(1024, min(MAX_CHUNK, nc.max_payload - _HEADROOM))


def _int_header(msg: Msg, name: str) -> int:
    try:
        value = int((msg.headers or {}).get(name, ""))
    except ValueError:
        raise TransportError(f"transfer message without a valid {name} header") from None
    if value < 0:
        raise TransportError(f"transfer message with a negative {name}")
    return value


def _abort_error(msg: Msg, who: str) -> FleetbusError:
    code = (msg.headers or {}).get(HDR_ERROR, "")
    text = msg.data.decode("utf-8", errors="replace")[:500] or "no reason given"
    if who == "requester":
        # The requester stopped its own command: that is a cancel, whatever code it
        # names; its code must not pass for the worker's (auth_failed, server_offline).
        return Cancelled(f"the requester aborted the transfer ({code or 'no code'}): {text}")
    return FleetbusError.from_wire({"code": code, "message": f"the {who} aborted the transfer: {text}"})


class _Peer:
    """One side of a transfer: its own inbox, the peer's subject once known, when the
    peer was last heard from, and a task that tells the peer we are still here."""

    def __init__(self, nc: NATS, own: str, peer: str | None, idle_s: float, who: str,
                 peer_root: str | None) -> None:
        self.nc = nc
        self.own = own
        self.peer = peer
        self.peer_root = peer_root
        self.idle_s = idle_s
        self.who = who
        self.heard = time.monotonic()
        self.said = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._alive())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def say(self, kind: str, body: bytes | memoryview = b"", **headers: str) -> None:
        if self.peer is None:
            return
        await self.nc.publish(self.peer, body, headers={HDR_KIND: kind, HDR_SUBJECT: self.own, **headers})  # type: ignore[arg-type]
        self.said = time.monotonic()

    def hear(self, msg: Msg) -> str:
        """Note a message from the peer; return its kind (raise if it aborted)."""
        self.heard = time.monotonic()
        headers = msg.headers or {}
        if self.peer is None and headers.get(HDR_SUBJECT):
            peer = headers[HDR_SUBJECT]
            if self.peer_root is None or not is_worker_subject(self.peer_root, peer):
                # Whoever wrote to our inbox must not choose where we publish a file.
                raise TransportError(f"the {self.who} named {peer[:64]!r} as its subject, "
                                     f"which is not a worker's transfer subject ({self.peer_root or '?'}<token>)")
            self.peer = peer
        kind = headers.get(HDR_KIND, "")
        if kind == KIND_ABORT:
            raise _abort_error(msg, self.who)
        return kind

    def stalled(self) -> Timeout:
        return Timeout(f"the transfer stalled: no message from the {self.who} for {self.idle_s:g} s")

    async def _alive(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.said + ALIVE_EVERY_S - time.monotonic()))
            if time.monotonic() - self.said >= ALIVE_EVERY_S:
                with contextlib.suppress(nats.errors.Error):
                    await self.say(KIND_ALIVE)
                self.said = time.monotonic()


def _subscribe_limits(window: int) -> dict[str, int]:
    # nats-py's own queue in front of our callback; credit bounds what the peer sends.
    # Beyond it nats-py drops messages, which the sequence numbers turn into an error.
    return {"pending_bytes_limit": window + 4 * MAX_CHUNK, "pending_msgs_limit": 1 << 16}


class _Endpoint:
    """What both ends of a transfer share: the own subject, the link to the peer, who may
    write to us, closing.

    The requester's side learns the worker's subject (``peer`` None) and must be given
    ``peer_root``, the deployment's :attr:`Names.xfer_root`. The worker's side knows the
    requester's subject and is given ``sender``, the :attr:`Identity.key` of the command's
    requester: a message from any other identity is dropped and counted in ``strangers``.
    """

    def __init__(self, nc: NATS, peer: str | None, idle_s: float, who: str, *,
                 peer_root: str | None = None, sender: str | None = None) -> None:
        self.nc = nc
        self.who = who
        self.idle_s = idle_s
        self._peer_subject = peer
        self._peer_root = peer_root
        self._sender = sender
        self.strangers = 0  # messages dropped because another identity sent them
        self.sub: Subscription | None = None
        self.link: _Peer | None = None

    def _own_subject(self, own: str | None) -> str:
        return own if own is not None else self.nc.new_inbox()

    def _stranger(self, msg: Msg) -> bool:
        """Whether ``msg`` came from someone other than the command's requester (then it
        is dropped: never heard, never counted against credit, never an abort)."""
        if self._sender is None:
            return False
        found = identity_in(msg.headers).key
        if found == self._sender:
            return False
        self.strangers += 1
        if self.strangers == 1 or self.strangers % 1000 == 0:
            # The subject stays out of the log: it is what a stranger would aim at.
            _log.debug("transfer: dropped %d message(s) from %s, not the %s", self.strangers, found[:80], self.who)
        return True

    async def close(self) -> None:
        if self.link is not None:
            await self.link.stop()
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    async def abort(self, error: FleetbusError) -> None:
        """Tell the peer the transfer is over (best effort: it may be gone already)."""
        link = self.link
        if link is None or link.peer is None:
            return
        with contextlib.suppress(Exception):
            await link.say(KIND_ABORT, error.message.encode()[:1000], **{HDR_ERROR: error.code})


class Receiver(_Endpoint):
    """Receives one stream of ``data`` messages on its own inbox and yields the chunks.

    Credit is granted as the consumer of :meth:`chunks` takes chunks, not when they
    arrive, so a slow consumer (a disk, a transport) slows the sender down.
    ``peer`` is where credit goes; when None it is learned from the first message.
    """

    def __init__(self, nc: NATS, peer: str | None, window: int, idle_s: float, who: str, *,
                 peer_root: str | None = None, sender: str | None = None) -> None:
        super().__init__(nc, peer, idle_s, who, peer_root=peer_root, sender=sender)
        self.window = window
        self._inbox: asyncio.Queue[Msg] = asyncio.Queue()
        self._queued = 0  # bytes in _inbox
        self._overrun = False
        self.size = 0
        self.expected: int | None = None  # the size the sender announced, if it did
        self.sha256: str | None = None  # the content's digest, once the end matched it
        self.digest = BackgroundHash()

    async def open(self, own: str | None = None) -> str:
        """Subscribe to ``own`` (a worker's :meth:`Names.xfer` subject), by default a fresh
        inbox; returns it (the subject the sender sends to)."""
        own = self._own_subject(own)
        # A callback into our own queue: nats-py's next_msg costs a task, a wait_for and a
        # uuid4 per message.
        self.sub = await self.nc.subscribe(own, cb=self._on_msg, **_subscribe_limits(self.window))
        self.link = _Peer(self.nc, own, self._peer_subject, self.idle_s, self.who, self._peer_root)
        return own

    async def close(self) -> None:
        await self.digest.settle()
        await super().close()

    async def _on_msg(self, msg: Msg) -> None:
        # Credit bounds what an honest sender has in flight; one that ignores it must not
        # fill our memory: drop, and fail the transfer when the consumer gets there.
        if self._stranger(msg):
            return
        if self._overrun or self._queued + len(msg.data) > self.window + _HEADROOM:
            self._overrun = True
            return
        self._queued += len(msg.data)
        self._inbox.put_nowait(msg)

    async def _next(self) -> Msg:
        assert self.link is not None
        while True:
            try:
                msg = self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                if self._overrun:
                    raise TransportError(f"the {self.who} sent more than its credit") from None
            else:
                self._queued -= len(msg.data)
                return msg
            if self.nc.is_closed:
                raise TransportError("the NATS connection closed during the transfer")
            left = self.link.heard + self.idle_s - time.monotonic()
            if left <= 0:
                raise self.link.stalled()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, ALIVE_EVERY_S)):
                    msg = await self._inbox.get()
                    self._queued -= len(msg.data)
                    return msg

    async def chunks(self, grant_first: bool) -> AsyncIterator[bytes]:
        """Yield the data in order; check size and digest against the sender's end.

        ``grant_first``: open with a window of credit (else the request carried it).
        """
        link = self.link
        assert link is not None
        link.start()
        if grant_first:
            await link.say(KIND_CREDIT, **{HDR_CREDIT: str(self.window)})
        seq = 0
        consumed = 0
        while True:
            msg = await self._next()
            kind = link.hear(msg)
            if kind == KIND_DATA:
                seq += 1
                if _int_header(msg, HDR_SEQ) != seq:
                    raise TransportError(f"transfer message {seq} was lost in NATS "
                                         "(the receiver fell behind)")
                if seq == 1 and HDR_SIZE in (msg.headers or {}):
                    self.expected = _int_header(msg, HDR_SIZE)
                data = msg.data
                self.size += len(data)
                await self.digest.update(data)
                yield data
                consumed += len(data)
                if consumed >= self.window // _GRANT_FRACTION:
                    await link.say(KIND_CREDIT, **{HDR_CREDIT: str(consumed)})
                    consumed = 0
            elif kind == KIND_END:
                size = _int_header(msg, HDR_SIZE)
                if size != self.size:
                    raise TransportError(f"the {self.who} sent {size} bytes but {self.size} arrived")
                sent = (msg.headers or {}).get(HDR_SHA256)
                got = await self.digest.hexdigest()
                if sent is not None and sent != got:
                    raise InvalidRequest("the content does not match the sha256 its sender computed")
                self.sha256 = got
                return
            # alive, credit echoes and kinds from a later revision: liveness only


class Sender(_Endpoint):
    """Sends one stream of ``data`` messages within the credit its receiver grants.

    ``peer`` is where data goes; when None it is learned from the first credit.
    """

    def __init__(self, nc: NATS, peer: str | None, credit: int, idle_s: float, who: str, *,
                 peer_root: str | None = None, sender: str | None = None) -> None:
        super().__init__(nc, peer, idle_s, who, peer_root=peer_root, sender=sender)
        self.credit = credit
        self.seq = 0
        self.size = 0
        self.total: int | None = None  # the expected size, when known
        self._changed = asyncio.Event()
        self._error: FleetbusError | None = None

    async def open(self, own: str | None = None) -> str:
        """Subscribe to ``own`` for credit (a worker's :meth:`Names.xfer` subject), by
        default a fresh inbox; returns it."""
        own = self._own_subject(own)
        self.link = _Peer(self.nc, own, self._peer_subject, self.idle_s, self.who, self._peer_root)
        self.sub = await self.nc.subscribe(own, cb=self._on_msg, pending_msgs_limit=1 << 16)
        self.link.start()
        return own

    async def _on_msg(self, msg: Msg) -> None:
        assert self.link is not None
        if self._stranger(msg):
            return
        try:
            if self.link.hear(msg) == KIND_CREDIT:
                self.credit += _int_header(msg, HDR_CREDIT)
        except FleetbusError as exc:
            self._error = self._error or exc
        self._changed.set()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        link = self.link
        assert link is not None
        while True:
            if self._error is not None:
                raise self._error
            if ready():
                return
            left = link.heard + self.idle_s - time.monotonic()
            if left <= 0:
                raise link.stalled()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()

    async def send(self, data: bytes | memoryview, limit: int) -> None:
        """Send ``data`` in messages of at most ``limit`` bytes, never beyond the credit."""
        assert self.link is not None
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            await self._wait(lambda: self.credit > 0 and self.link.peer is not None)  # type: ignore[union-attr]
            n = min(len(view) - offset, limit, self.credit)
            piece = view[offset : offset + n]
            offset += n
            self.seq += 1
            self.credit -= n
            self.size += n
            headers = {HDR_SEQ: str(self.seq)}
            if self.seq == 1 and self.total is not None:
                headers[HDR_SIZE] = str(self.total)  # for the receiver's progress display
            await self.link.say(KIND_DATA, piece, **headers)

    async def end(self, sha256: str) -> None:
        assert self.link is not None
        await self._wait(lambda: self.link.peer is not None)  # type: ignore[union-attr]
        await self.link.say(KIND_END, **{HDR_SIZE: str(self.size), HDR_SHA256: sha256})

    async def watch(self, done: Awaitable[Any]) -> Any:
        """Await ``done`` (the reply) while watching the peer: an abort or a silence of
        ``idle_s`` ends the wait first."""
        waiter = asyncio.ensure_future(done)
        waiter.add_done_callback(lambda _: self._changed.set())
        try:
            await self._wait(waiter.done)
            return waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)


async def keep_alive(nc: NATS, subject: str, waiting: Awaitable[Any]) -> Any:
    """Await ``waiting`` while telling a requester at ``subject`` every few seconds that
    we are still here (a retried put waiting for the first run of its command id), so
    its idle deadline does not end a transfer that is merely queued."""

    async def tell() -> None:
        while True:
            await asyncio.sleep(ALIVE_EVERY_S)
            with contextlib.suppress(nats.errors.Error):
                await nc.publish(subject, b"", headers={HDR_KIND: KIND_ALIVE})

    teller = asyncio.create_task(tell())
    try:
        return await waiting
    finally:
        teller.cancel()
        await asyncio.gather(teller, return_exceptions=True)
