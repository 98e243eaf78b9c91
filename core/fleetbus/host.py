"""The plugin host: all the NATS plumbing between the bus API and the transports.

This module is its lifecycle and serving: starting and stopping the transports (each
with its :class:`_Context`), a session pool per transport, subscribing to
``<prefix>.v1.servers.<name>.*`` for every server a loaded transport serves (in the
transport's queue group, so several worker processes share the load), and to
``<prefix>.v1.grants.<grant>.<name>.*`` for every user's grant that selects it (the
users bucket, grants.py), following the registry and the users, routing ``cancel``
to the command it names, who asks (the identity NATS authenticated, subjects.Identity),
and admission: weighing each request before any work is done on it (``too_large``, ``busy``).

An admitted request is handed to :mod:`fleetbus.commandrun`, which runs one command's
life (parse, claim, slot, run, reply, audit) with its one error ladder; the operations
themselves are :mod:`fleetbus.operations`. Transports see none of this; they implement
``fleetbus.transport``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from .admission import Admission, AdmissionSettings, ShedReport, Ticket, requester_of
from .audit import Auditor
from .auditspool import AuditSpool, log_unkept
from .commandrun import CHECKER_REQUESTER, DEADLINE_SKEW_S, CommandRunner, error_reply, reply_body
from .connection import publish_soon, unread_bytes, watch_errors
from .coreservices import CoreServices
from .dedupe import CommandMemory
from .dispatch import subscribe_direct
from .errors import Busy, FleetbusError, Forbidden, InternalError
from .gatewaystate import GatewayState
from .grants import UserDirectory
from .home import Home
from .jetstream import State
from .keys import AgentKeys
from .leases import WorkerLease
from .limits import DEFAULT_STREAM_WINDOW, MAX_REQUEST_BYTES
from .messages import DEFAULT_TAIL_BYTES, CancelRequest, too_large_body
from .metrics import Metrics
from .objects import ObjectFiles
from .objectshare import SharedObjects
from .operations import Operations
from .records import Server, utcnow
from .registry import Registry
from .sessions import SessionPool
from .subjects import (
    DEFAULT_REPLY_PREFIXES,
    Identity,
    Names,
    ReplySubjects,
    identity_in,
    reply_allowed,
    requester_in,
)
from .transport import Credential, Transport
from .vault import Vault

log = logging.getLogger("fleetbus.host")
# The public names; CHECKER_REQUESTER and DEADLINE_SKEW_S belong to the command path
# (commandrun.py) and stay importable from here, where the checker and tests find them.
__all__ = [
    "CANCEL_GRACE_S",
    "CHECKER_REQUESTER",
    "DEADLINE_SKEW_S",
    "READING_BEHIND_BYTES",
    "HostSettings",
    "PluginHost",
]
T = TypeVar("T")

# A killed process or closed channel should finish well within this after cancel().
CANCEL_GRACE_S = 15.0
# Delivered by NATS and not read yet: past this the worker is reading behind, and large
# bodies wait to be parsed until it catches up (admission.py).
READING_BEHIND_BYTES = MAX_REQUEST_BYTES


@dataclass
class HostSettings:
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )
    blocking_threads: int = 32
    open_timeout_s: float = 60.0
    transfer_timeout_s: float = 6 * 3600.0
    quick_timeout_s: float = 30.0
    # What a streamed put may have in flight from its requester (bounds worker memory).
    stream_window: int = DEFAULT_STREAM_WINDOW
    tail_bytes: int = DEFAULT_TAIL_BYTES
    # Where requesters' output and transfer subjects, and their reply subjects, must lie
    # (docs/bus-api.md, "Reply subjects"); FLEETBUS_REPLY_PREFIXES.
    reply_prefixes: tuple[str, ...] = DEFAULT_REPLY_PREFIXES
    home: Home = field(default_factory=Home.resolve)
    transport_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How much work this worker takes on before it answers `busy` (admission.py).
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)


class _Context:
    """The :class:`fleetbus.transport.TransportContext` one transport receives."""

    def __init__(self, host: PluginHost, name: str) -> None:
        self.host = host
        self.transport_name = name
        self.logger = logging.getLogger(f"fleetbus.transport.{name}")
        # Validated here, before the transport exists: a bad one stops the worker, one line.
        self.settings = host.transport_classes[name].load_settings(host.settings.transport_settings.get(name))
        self.services = host.services

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        gauge = self.host.metrics.blocking_busy
        gauge.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.host.pool, fn, *args)
        finally:
            gauge.dec()

    async def serve(self, server: Server, status: Mapping[str, Any] | None = None) -> None:
        await self.host.serve(self.transport_name, server, status)

    async def unserve(self, name: str) -> None:
        await self.host.unserve(name)

    async def lookup_server(self, name: str) -> Server | None:
        return await self.host.find_server(name)

    async def credential(self, name: str) -> Credential:
        return await self.host._credential(name)


@dataclass
class Served:
    """A server this process answers: its subscription, slots and running commands."""

    server: Server
    transport: str
    sub: Subscription
    slots: asyncio.Semaphore
    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    # Who sent each running command (by id): only that identity may cancel it.
    senders: dict[str, Identity] = field(default_factory=dict)
    # The request handler, for the grant subjects too; and grant id -> its subscription.
    dispatch: Callable[[Msg], None] | None = None
    grant_subs: dict[str, tuple[Subscription, asyncio.Task[None] | None]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None  # only where subscribe_direct needs one


class PluginHost:
    """Serves the servers of the loaded transports on the bus: :meth:`start`, then
    :meth:`serve`/:meth:`unserve` as the registry and the transports say, :meth:`stop`.
    Each admitted request runs in :attr:`commands` (commandrun.py)."""

    def __init__(
        self,
        nc: NATS,
        state: State,
        transports: dict[str, type[Transport]],
        vault: Vault | None,
        settings: HostSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.nc = nc
        self.state = state
        self.names: Names = state.names
        self.settings = settings or HostSettings()
        self.replies = self.names.reply_subjects(self.settings.reply_prefixes)
        self._user_replies: dict[Identity, ReplySubjects] = {}
        self.registry = Registry(state.servers, state.status)
        # This worker's liveness key; the claims it makes name it (leases.py, dedupe.py).
        self.lease = WorkerLease(state.workers, self.settings.worker_id)
        self.memory = CommandMemory(state.commands, state.workers, self.lease.key)
        # Records stay on this worker's disk until stored, so a crash loses none (audit.py).
        self.auditor = Auditor(nc, self.names, spool=_audit_spool(self.settings.home.path / "audit-spool"))
        self.files = ObjectFiles(state.js, self.names.files_bucket)
        self.vault = vault
        self.metrics = metrics or Metrics()
        # A put job's object is read from the store once, however many of its targets
        # this worker serves (objectshare.py).
        self.objects = SharedObjects(self.files, self.settings.home.path / "spool",
                                     on_read=self.metrics.object_read_bytes.inc)
        master = vault.master if vault else None
        self.services = CoreServices(
            home=self.settings.home, registry=self.registry, agent_keys=AgentKeys(state.agent_keys),
            gateway_state=GatewayState(state.gateway_state, state.gateways, self.settings.home, master,
                                       self.settings.worker_id),
            master=master, worker_id=self.settings.worker_id, metrics=self.metrics,
        )
        self.metrics.blocking_max.set(self.settings.blocking_threads)
        self.admission = Admission(
            self.settings.admission, behind=lambda: unread_bytes(nc) > READING_BEHIND_BYTES)
        self.metrics.requests_waiting.set_function(lambda: self.admission.waiting)
        self.metrics.requests_waiting_bytes.set_function(lambda: self.admission.waiting_bytes)
        self.operations = Operations(nc, self.settings, self.files, self.objects, self.names)
        self.commands = CommandRunner(self)
        self._shed_report = ShedReport(lambda reason: self.metrics.requests_shed.labels(reason).inc())
        self.pool = ThreadPoolExecutor(
            max_workers=self.settings.blocking_threads, thread_name_prefix="fleetbus-blocking"
        )
        self.transport_classes = transports
        self.transports: dict[str, Transport] = {}
        self.sessions: dict[str, SessionPool] = {}
        self.served: dict[str, Served] = {}
        # Every registered server as the registry watch last delivered it: a lookup
        # (a gateway checks one per agent that connects) costs a dict hit instead of a
        # KV read through nats-server.
        self.known: dict[str, Server] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._cancel_subs: list[Subscription] = []
        #: The users bucket, followed (grants.py); from start().
        self.users: UserDirectory | None = None
        self._serve_lock = asyncio.Lock()
        self._serve_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._online: set[str] = set()  # served, and shown online in the registry
        #: True once stop() began: a started command then ends with its request.
        self.stopping = False
        self._slow_logged = -60.0  # when the last slow-consumer line was written
        # Command ids without a getrandom() call per command: random per process, then
        # counted; 32 hex digits like a uuid4, unique across workers and restarts.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def new_id(self) -> str:
        """A fresh command id, for a request that names none."""
        return f"{self._id_prefix}{next(self._id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"

    # lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        watch_errors(self.nc, self._on_nats_error)
        for name, cls in list(self.transport_classes.items()):
            try:
                transport = cls(_Context(self, name))
                await transport.start()
            except FleetbusError:
                raise  # a clear, expected problem (e.g. a port taken): stop and say so
            except Exception as exc:
                # A broken plugin must not take the other transports down with it.
                log.error("transport %s failed to start (%s: %s); it is not served",
                          name, type(exc).__name__, str(exc)[:200])
                del self.transport_classes[name]
                continue
            self.transports[name] = transport
            self.sessions[name] = SessionPool(transport, self._credential, self.settings.open_timeout_s)
        # Before any subject is served, so before any claim can name it; after the
        # transports, so a transport that refuses to start leaves nothing running.
        await self.lease.start()
        await self.auditor.recover()
        for subject in (self.names.server("*", "cancel"), self.names.grant("*", "*", "cancel")):
            self._cancel_subs.append(await self.nc.subscribe(subject, cb=self._on_cancel))
        # The users before the registry: a server is then served with its grants at once.
        self.users = UserDirectory(self.state.users)
        users_ready = asyncio.Event()
        self._background.append(asyncio.create_task(self.users.watch(self._on_users, users_ready)))
        try:
            await asyncio.wait_for(users_ready.wait(), timeout=10)
        except TimeoutError:
            log.warning("the users did not load within 10 s; serving their grants as they arrive")
        ready = asyncio.Event()
        self._background.append(asyncio.create_task(self.registry.watch(self._on_registry, ready)))
        self._background.append(asyncio.create_task(self._reap_idle()))
        try:
            await asyncio.wait_for(ready.wait(), timeout=10)
        except TimeoutError:
            log.warning("the registry did not load within 10 s; serving what arrives later")
        await self.nc.flush()
        log.info("plugin host %s serving transports: %s", self.settings.worker_id,
                 ", ".join(self.transports) or "none")

    async def stop(self) -> None:
        self.stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        for sub in self._cancel_subs:
            await sub.unsubscribe()
        self._cancel_subs.clear()
        for name in list(self.served):
            await self.unserve(name, shutting_down=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CANCEL_GRACE_S)
        await self.objects.aclose()
        for pool in self.sessions.values():
            await pool.close_all()
        for transport in self.transports.values():
            try:
                await transport.stop()
            except Exception:
                log.exception("stopping transport %s failed", transport.name)
        await self.auditor.close()
        await self.lease.stop()
        self._shed_report.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _on_nats_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py dropped a message a subscription had no room for: with the direct
            # dispatch of served subjects this means a subscription read through a queue.
            self.metrics.nats_slow_consumer.inc()
            if self._slow_logged + 10.0 < time.monotonic():
                self._slow_logged = time.monotonic()
                log.warning("NATS slow consumer: a message on %s was dropped by nats-py (its "
                            "subscription's pending limit was reached)", exc.subject)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(5)
            for name, pool in self.sessions.items():
                await pool.close_idle(self.transports[name].idle_timeout_s)

    async def _credential(self, name: str) -> Credential:
        if self.vault is None:
            raise InternalError("this worker holds no master key and cannot open credentials")
        return await self.vault.get(name)

    # which servers we serve ------------------------------------------------------
    async def find_server(self, name: str) -> Server | None:
        """``name``'s registry record: as the watch delivered it, else read from the
        bucket (a server added a moment ago may not have reached the watch yet)."""
        known = self.known.get(name)
        return known if known is not None else await self.registry.find(name)

    async def _on_registry(self, name: str, server: Server | None) -> None:
        if server is None:
            self.known.pop(name, None)
        else:
            self.known[name] = server
        current = self.served.get(name)
        if server is None:
            if current is not None:
                await self.unserve(name)
            return
        transport = self.transports.get(server.transport)
        if current is not None:
            if current.transport != server.transport or transport is None or (
                transport.serves_registered and not transport.accepts(server)
            ):
                await self.unserve(name)
            else:
                current.server = server
                async with self._serve_lock:
                    await self._sync_grants(current)  # its roles or labels may have changed
                return
        if transport is not None and transport.serves_registered and transport.accepts(server):
            await self.serve(server.transport, server)

    async def serve(self, transport: str, server: Server, status: Mapping[str, Any] | None = None) -> None:
        """Answer ``server``'s subjects from this process and record it online, with the
        transport's ``status`` fields (one status write: a gateway's agent connecting
        costs a read and a write of the status bucket, not two of each)."""
        async with self._serve_lock:
            current = self.served.get(server.name)
            if current is not None:
                current.server = server
                await self._sync_grants(current)
            else:
                await self._subscribe(transport, server)
        if current is not None:
            if status:
                await self._set_status(server.name, "online", transport, status)
            return
        await self._set_status(server.name, "online", transport, status)
        log.info("serving %s (%s)", server.name, transport)
        if server.name in self.served:  # not unserved while its status was written
            self._online.add(server.name)
            for waiter in self._serve_waiters.pop(server.name, []):
                if not waiter.done():
                    waiter.set_result(None)

    async def _subscribe(self, transport: str, server: Server) -> None:
        """Subscribe ``server``'s subjects (and its grants'); called holding the serve lock."""
        # A queue group for every transport: where two processes answer one server
        # at once (workers sharing the registry, or two gateways while one takes an
        # agent over from the other), NATS hands each request to one of them.
        queue = self.names.queue_group(transport)
        served = Served(server=server, transport=transport, sub=None,  # type: ignore[arg-type]
                         slots=asyncio.Semaphore(server.max_concurrency))
        identify = self.identify

        def on_msg(msg: Msg) -> None:
            # Called from nats-py's read loop as the request is parsed (dispatch.py).
            if msg.subject.endswith(".cancel"):
                return  # answered by _on_cancel, which every host receives
            identity = identify(msg.headers)
            if msg.reply and not self.reply_allowed(msg.reply, identity):
                return  # its reply would be fleetbus publishing where the requester chose
            ticket = self._admit(msg, identity)
            if ticket is None:
                return
            task = asyncio.create_task(self.commands.handle(served, msg, ticket, identity))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        # nats-py queues nothing on the direct path; where it must (its internals
        # differ), the queue holds no more than admission would.
        limits = self.settings.admission
        served.sub, served.reader = await subscribe_direct(
            self.nc, self.names.server_all(server.name), on_msg, queue=queue,
            pending_msgs_limit=limits.max_waiting,
            pending_bytes_limit=limits.max_waiting_bytes + MAX_REQUEST_BYTES,
        )
        served.dispatch = on_msg
        self.served[server.name] = served
        self.metrics.served.labels(transport).inc()
        await self._sync_grants(served)

    async def wait_served(self, name: str, timeout: float) -> bool:
        """Wait until this process answers ``name``'s subjects; False after ``timeout`` s.

        A server registered a moment ago reaches the host through the registry watch,
        so a caller that registers one and then says "ready" (``fleetbus up`` and its
        ``local``) waits here first. True means NATS has our subscription (a request
        sent after it finds a responder) and the registry shows the server online.
        """
        if name not in self._online:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._serve_waiters.setdefault(name, []).append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                return False
            finally:
                waiting = self._serve_waiters.get(name, [])
                if waiter in waiting:
                    waiting.remove(waiter)
        await self.nc.flush(timeout=max(1, int(timeout)))
        return True

    async def unserve(self, name: str, shutting_down: bool = False) -> None:
        async with self._serve_lock:
            served = self.served.pop(name, None)
            self._online.discard(name)
            if served is None:
                return
            self.metrics.served.labels(served.transport).dec()
            for sub, reader in [(served.sub, served.reader), *served.grant_subs.values()]:
                await _stop_reading(sub, reader)
            served.grant_subs.clear()
        if not shutting_down:
            for task in served.running.values():
                task.cancel()
        await self.sessions[served.transport].drop(name)
        if shutting_down and not self.nc.is_connected:
            # No NATS to write "offline" to: waiting for each server's read to time out
            # made a worker serving many servers outlast its stop bound. The status
            # names this worker, whose lease expires, so readers see it offline anyway.
            log.info("stopped serving %s", name)
            return
        status = await self.registry.status(name)
        if status is not None and status.served_by == self.settings.worker_id:
            await self._set_status(name, "offline", served.transport)
        log.info("stopped serving %s", name)

    async def _set_status(self, name: str, state: str, transport: str,
                          fields: Mapping[str, Any] | None = None) -> None:
        if state == "offline" and await self.registry.find(name) is None:
            return
        await self.services.report_status(name, state, self.transport_classes[transport].version, **(fields or {}))

    # grants --------------------------------------------------------------------------
    async def _on_users(self) -> None:
        """A user or grant changed: every served server's grant subjects follow."""
        self._user_replies.clear()  # a user's name may have changed with its record
        async with self._serve_lock:
            for served in list(self.served.values()):
                await self._sync_grants(served)

    async def _sync_grants(self, served: Served) -> None:
        """Subscribe the grant subjects of every grant that selects ``served``'s server,
        and only those, in the transport's queue group. Called holding the serve lock."""
        if self.users is None or served.dispatch is None:
            return
        server = served.server
        wanted = {grant.id for grant in self.users.grants() if grant.covers(server)}
        for grant_id in set(served.grant_subs) - wanted:
            await _stop_reading(*served.grant_subs.pop(grant_id))
        limits = self.settings.admission
        for grant_id in sorted(wanted - set(served.grant_subs)):
            served.grant_subs[grant_id] = await subscribe_direct(
                self.nc, self.names.grant(grant_id, server.name, "*"), served.dispatch,
                queue=self.names.queue_group(served.transport), pending_msgs_limit=limits.max_waiting,
                pending_bytes_limit=limits.max_waiting_bytes + MAX_REQUEST_BYTES)
        if wanted:
            log.debug("%s served through grants %s", server.name, ", ".join(sorted(wanted)))

    # who asks ------------------------------------------------------------------------
    def identify(self, headers: Mapping[str, str] | None) -> Identity:
        """Who sent a request (subjects.identity_in), with the user's name from the users
        bucket for the audit trail (where fleetbus publishes for a user follows from its
        public key alone, Identity.inbox_prefix); called from the read loop for every
        request, so cheap for the owner."""
        identity = identity_in(headers)
        if identity.is_owner or self.users is None:
            return identity
        name = self.users.name_of(identity.user)
        return identity if name is None else dataclasses.replace(identity, name=name)

    def reply_allowed(self, reply: str, identity: Identity) -> bool:
        """Whether to answer a request from ``identity`` on ``reply`` (subjects.reply_allowed)."""
        return reply_allowed(self.replies, reply, identity)

    def replies_for(self, identity: Identity) -> ReplySubjects:
        """Where fleetbus may publish for ``identity``: the reply namespace for the
        owner, a user's own inboxes ``_I.<its public key>.`` for a user."""
        if identity.is_owner:
            return self.replies
        found = self._user_replies.get(identity)
        if found is None:
            if len(self._user_replies) >= 4096:
                self._user_replies.clear()  # users are few; this only bounds the cache
            found = self._user_replies[identity] = ReplySubjects.for_identity(identity, self.names.prefix)
        return found

    def denied(self, identity: Identity, op: str) -> None:
        """Count a request fleetbus refused as ``forbidden``."""
        self.metrics.denied.labels(identity.user, op).inc()

    # cancel ------------------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        server, _ = Names.server_op(msg.subject)
        try:
            req = CancelRequest.model_validate_json(msg.data)
        except ValidationError:
            return  # not ours to answer: another host may hold it, none should guess
        served = self.served.get(server)
        task = served.running.get(req.id) if served else None
        if task is None or served is None:
            return
        identity = self.identify(msg.headers)
        if msg.reply and not self.reply_allowed(msg.reply, identity):
            return  # not a reply subject: neither cancel nor answer
        sender = served.senders.get(req.id)
        if sender is not None and sender.key != identity.key and not identity.is_owner:
            # Another user's command: its id is no secret (it is in audit records and
            # job results), so knowing it must not be enough to stop it.
            await self._refuse_cancel(msg, served, req.id, identity, sender)
            return
        task.cancel("cancelled by request")
        if msg.reply:
            await self.nc.publish(msg.reply, json.dumps({"ok": True, "id": req.id, "cancelled": True}).encode())

    async def _refuse_cancel(self, msg: Msg, served: Served, command_id: str, identity: Identity,
                             sender: Identity) -> None:
        """Answer a cancel of another identity's command ``forbidden``; counted, audited."""
        error = Forbidden(f"command {command_id} on {served.server.name} was sent by another user; "
                          "only its sender (or the owner) may cancel it")
        self.denied(identity, "cancel")
        if msg.reply:
            await self.nc.publish(msg.reply, reply_body(error_reply(command_id, error)))
        await self.auditor.record({
            "ts": utcnow(), "id": command_id, "server": served.server.name, "transport": served.transport,
            "op": "cancel", "requester": requester_in(msg.headers), "identity": identity.record(),
            "outcome": error.code, "duration_s": 0.0, "worker": self.settings.worker_id,
        })

    # admission -----------------------------------------------------------------------
    def _admit(self, msg: Msg, identity: Identity) -> Ticket | None:
        """Weigh a request before any work is done on it (admission.py); None when it
        was answered already, ``too_large`` or ``busy``, without being read."""
        size = len(msg.data)
        requester = requester_of(msg.reply, identity)
        if size > MAX_REQUEST_BYTES:
            self._shed(msg, requester, too_large_body(size))
            return None
        ticket = self.admission.admit(requester, size)
        if ticket is None:
            self._shed(msg, requester, Busy(
                "the worker is shedding load (too much work waiting there, or too much of it "
                "from this requester); nothing was run: retry with backoff"))
        return ticket

    def _shed(self, msg: Msg, requester: str, error: FleetbusError) -> None:
        # Counted and logged in aggregate, not audited: nothing was read or run, and one
        # record per refused request would let a flood crowd out the real ones.
        self._shed_report.note(error.code, requester)
        body = reply_body(error_reply(self.new_id(), error)) if msg.reply else b""
        if msg.reply and not publish_soon(self.nc, msg.reply, body):
            log.debug("could not answer a shed request on %s", msg.reply)


def _audit_spool(folder: Path) -> AuditSpool | None:
    """The worker's audit spool, or None (logged) when its home cannot hold one: the
    records are then still sent, only not kept through a crash of this process."""
    try:
        return AuditSpool(folder)
    except OSError as exc:
        log_unkept(folder, exc)
        return None


async def _stop_reading(sub: Subscription, reader: asyncio.Task[None] | None) -> None:
    """Unsubscribe one of a served server's subscriptions and stop its reader, if any; a
    connection already gone has nothing left to unsubscribe."""
    try:
        await sub.unsubscribe()
    except Exception:
        pass
    if reader is not None:
        reader.cancel()
