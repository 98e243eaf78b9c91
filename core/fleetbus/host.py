"""The plugin host: all the NATS plumbing between the bus API and the transports.

For every server a loaded transport serves, the host subscribes to
``<prefix>.v1.servers.<name>.*`` (in the transport's queue group, so several worker
processes share the load), and for each request it: checks the size, parses and
validates the JSON, deduplicates by command id, waits for a slot under the server's
concurrency limit, opens or reuses the server's session, runs the operation under its
time limit, streams output, replies with the fixed error codes, and writes the audit
record. Transports see none of this; they implement ``fleetbus.transport``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
from fleetbus_agent.heap import keep_large_buffers
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from .admission import Admission, AdmissionSettings, ShedReport, Ticket, requester_of
from .audit import Auditor, StagedRecord, summarize
from .auditspool import AuditSpool
from .collector import relax_gc
from .connection import publish_now, publish_soon, send_now, unread_bytes, watch_errors
from .dedupe import CommandMemory, fingerprint
from .dispatch import subscribe_direct
from .errors import (
    Busy,
    Cancelled,
    FleetbusError,
    InternalError,
    InvalidRequest,
    Lost,
    ServerOffline,
    Timeout,
    TooLarge,
    TransportError,
)
from .home import Home
from .jetstream import State
from .keys import AgentKeys
from .leases import WorkerLease
from .limits import DEFAULT_STREAM_WINDOW, MAX_INLINE_BYTES, MAX_REQUEST_BYTES
from .messages import (
    DEFAULT_TAIL_BYTES,
    OPERATIONS,
    CancelRequest,
    ExecRequest,
    GetRequest,
    PutRequest,
    Request,
    parse_request,
    too_large_body,
)
from .metrics import Metrics
from .objects import ObjectFiles
from .objectshare import SharedObjects, SharedRead
from .output import BusOutput
from .records import Server, utcnow
from .registry import Registry
from .services import CoreServices
from .sessions import SessionPool
from .streams import BackgroundHash, Receiver, Sender, chunk_limit, keep_alive
from .subjects import DEFAULT_REPLY_PREFIXES, HDR_DEADLINE, HDR_REQUESTER, Names
from .transport import Credential, ExecSpec, PutSpec, Session, Transport
from .vault import Vault

log = logging.getLogger("fleetbus.host")
# default=str: a transport's odd `extra` value must not cost the requester its reply.
# One encoder for every reply: json.dumps with any option builds a new one per call.
_REPLY_JSON = json.JSONEncoder(default=str)
T = TypeVar("T")

# How far a requester's clock may run ahead of ours before its Fleetbus-Deadline
# (subjects.HDR_DEADLINE) would drop work it still waits for.
DEADLINE_SKEW_S = 2.0
CHECKER_REQUESTER = "fleetbus-checker"
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

    async def serve(self, server: Server) -> None:
        await self.host.serve(self.transport_name, server)

    async def unserve(self, name: str) -> None:
        await self.host.unserve(name)

    async def lookup_server(self, name: str) -> Server | None:
        return await self.host.registry.find(name)

    async def credential(self, name: str) -> Credential:
        return await self.host._credential(name)


@dataclass
class _Served:
    server: Server
    transport: str
    sub: Subscription
    slots: asyncio.Semaphore
    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None  # only where subscribe_direct needs one


@dataclass
class _Outcome:
    reply: dict[str, Any]
    exit_code: int | None = None
    bytes: int | None = None
    # False when the command never reached the server (FleetbusError.before_start):
    # its id claim is dropped instead of stored, so a retry runs it.
    ran: bool = True


class PluginHost:
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
        self.registry = Registry(state.servers, state.status)
        # This worker's liveness key; the claims it makes name it (leases.py, dedupe.py).
        self.lease = WorkerLease(state.workers, self.settings.worker_id)
        self.memory = CommandMemory(state.commands, state.workers, self.lease.key)
        # Records stay on this worker's disk until stored, so a crash loses none (audit.py).
        self.auditor = Auditor(nc, self.names, spool=AuditSpool(self.settings.home.path / "audit-spool"))
        self.files = ObjectFiles(state.js, self.names.files_bucket)
        self.vault = vault
        self.metrics = metrics or Metrics()
        # A put job's object is read from the store once, however many of its targets
        # this worker serves (objectshare.py).
        self.objects = SharedObjects(self.files, self.settings.home.path / "spool",
                                     on_read=self.metrics.object_read_bytes.inc)
        self.services = CoreServices(
            nc=nc, names=self.names, home=self.settings.home, registry=self.registry,
            agent_keys=AgentKeys(state.agent_keys), gateways=state.gateways,
            gateway_state_kv=state.gateway_state, master=vault.master if vault else None, worker_id=self.settings.worker_id,
            metrics=self.metrics,
        )
        self.metrics.blocking_max.set(self.settings.blocking_threads)
        self.admission = Admission(
            self.settings.admission, behind=lambda: unread_bytes(nc) > READING_BEHIND_BYTES)
        self.metrics.requests_waiting.set_function(lambda: self.admission.waiting)
        self.metrics.requests_waiting_bytes.set_function(lambda: self.admission.waiting_bytes)
        self._shed_report = ShedReport(lambda reason: self.metrics.requests_shed.labels(reason).inc())
        self.pool = ThreadPoolExecutor(
            max_workers=self.settings.blocking_threads, thread_name_prefix="fleetbus-blocking"
        )
        self.transport_classes = transports
        self.transports: dict[str, Transport] = {}
        self.sessions: dict[str, SessionPool] = {}
        self.served: dict[str, _Served] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._cancel_sub: Subscription | None = None
        self._serve_lock = asyncio.Lock()
        self._serve_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._online: set[str] = set()  # served, and shown online in the registry
        self._stopping = False
        self._slow_logged = -60.0  # when the last slow-consumer line was written
        # Command ids without a getrandom() call per command: random per process, then
        # counted; 32 hex digits like a uuid4, unique across workers and restarts.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"

    # lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        # Every process that serves commands holds long-lived state per server, and
        # moves files in 1 MiB buffers; see each.
        relax_gc()
        keep_large_buffers()
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
        self._cancel_sub = await self.nc.subscribe(
            f"{self.names.prefix}.v1.servers.*.cancel", cb=self._on_cancel
        )
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
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        if self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()
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
    async def _on_registry(self, name: str, server: Server | None) -> None:
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
                return
        if transport is not None and transport.serves_registered and transport.accepts(server):
            await self.serve(server.transport, server)

    async def serve(self, transport: str, server: Server) -> None:
        """Answer ``server``'s subjects from this process."""
        async with self._serve_lock:
            if server.name in self.served:
                self.served[server.name].server = server
                return
            # A queue group for every transport: where two processes answer one server
            # at once (workers sharing the registry, or two gateways while one takes an
            # agent over from the other), NATS hands each request to one of them.
            queue = self.names.queue_group(transport)
            served = _Served(server=server, transport=transport, sub=None,  # type: ignore[arg-type]
                             slots=asyncio.Semaphore(server.max_concurrency))

            def on_msg(msg: Msg) -> None:
                # Called from nats-py's read loop as the request is parsed (dispatch.py).
                if msg.subject.endswith(".cancel"):
                    return  # answered by _on_cancel, which every host receives
                if msg.reply and not self.replies.allows(msg.reply):
                    return  # its reply would be fleetbus publishing where the requester chose
                ticket = self._admit(msg)
                if ticket is None:
                    return
                task = asyncio.create_task(self._handle(served, msg, ticket))
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
            self.served[server.name] = served
            self.metrics.served.labels(transport).inc()
        await self._set_status(server.name, "online", transport)
        log.info("serving %s (%s)", server.name, transport)
        if server.name in self.served:  # not unserved while its status was written
            self._online.add(server.name)
            for waiter in self._serve_waiters.pop(server.name, []):
                if not waiter.done():
                    waiter.set_result(None)

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
            try:
                await served.sub.unsubscribe()
            except Exception:
                pass
            if served.reader is not None:
                served.reader.cancel()
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

    async def _set_status(self, name: str, state: str, transport: str) -> None:
        if state == "offline" and await self.registry.find(name) is None:
            return
        await self.services.report_status(name, state, self.transport_classes[transport].version)

    # cancel ------------------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        server = msg.subject.split(".")[-2]
        try:
            req = CancelRequest.model_validate_json(msg.data)
        except ValidationError:
            return  # not ours to answer: another host may hold it, none should guess
        served = self.served.get(server)
        task = served.running.get(req.id) if served else None
        if task is None:
            return
        if msg.reply and not self.replies.allows(msg.reply):
            return  # not a reply subject: neither cancel nor answer
        task.cancel("cancelled by request")
        if msg.reply:
            await self.nc.publish(msg.reply, json.dumps({"ok": True, "id": req.id, "cancelled": True}).encode())

    # admission -----------------------------------------------------------------------
    def _admit(self, msg: Msg) -> Ticket | None:
        """Weigh a request before any work is done on it (admission.py); None when it
        was answered already, ``too_large`` or ``busy``, without being read."""
        size = len(msg.data)
        requester = requester_of(msg.reply)
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
        if msg.reply:
            body = _REPLY_JSON.encode({"ok": False, "id": self._new_id(), "error": error.to_wire()})
            if not publish_soon(self.nc, msg.reply, body.encode()):
                log.debug("could not answer a shed request on %s", msg.reply)

    # one request ---------------------------------------------------------------------
    async def _handle(self, served: _Served, msg: Msg, ticket: Ticket) -> None:
        try:
            await self._handle_admitted(served, msg, ticket)
        finally:
            ticket.release()

    async def _handle_admitted(self, served: _Served, msg: Msg, ticket: Ticket) -> None:
        started = time.monotonic()
        server = served.server
        op = msg.subject.rsplit(".", 1)[-1]
        command_id = self._new_id()
        requester = "bus"
        if msg.headers:
            requester = str(msg.headers.get(HDR_REQUESTER, "bus"))[:128]
        body: dict[str, Any] = {}
        replayed = False
        remember: Any = None
        deadline = _deadline_of(msg)
        try:
            if op not in OPERATIONS:
                raise InvalidRequest(f"unknown operation {op[:32]!r}; use one of {', '.join(OPERATIONS)}")
            deduplicated = False
            body_fp = ""
            async with self.admission.parse_turn(ticket):
                body, req = parse_request(op, msg.data, self.replies)
                if req.id is not None and op in ("exec", "put"):
                    deduplicated = True
                    body_fp = fingerprint(req)  # as costly as the parse on a large body
            if req.id is not None:
                command_id = req.id
            _check_deadline(deadline, command_id)  # before a claim: nothing to undo
            outcome: _Outcome
            if deduplicated:
                assert req.id is not None
                outcome, remember, replayed = await self._deduplicated(
                    served, op, req, req.id, body_fp, ticket, deadline)
            else:
                outcome = await self._dispatch(served, op, req, command_id, ticket, deadline)
        except FleetbusError as exc:
            # Refused before it reached a transport (malformed, a conflicting id, ...).
            outcome = _Outcome(reply={"ok": False, "id": command_id, "error": exc.to_wire()}, ran=False)
        except asyncio.CancelledError:
            # Our own shutdown: tell the requester rather than leaving it to time out.
            outcome = _Outcome(reply={"ok": False, "id": command_id,
                                      "error": Cancelled("the worker is shutting down").to_wire()})
            staged = self._audit(served, op, body, command_id, requester, started, outcome, replayed)
            await self._respond(msg, outcome.reply)
            await self.auditor.send(staged)
            raise
        except Exception:
            log.exception("command %s on %s failed unexpectedly", command_id, server.name)
            outcome = _Outcome(reply={"ok": False, "id": command_id, "error": InternalError(
                "internal error in the plugin host; see its log").to_wire()})
        # The reply is on the socket already (send_now), or batched with the others of
        # this loop turn for nats-py's flusher, which the bookkeeping below holds back by
        # a few microseconds; yielding to it here cost every command a loop turn.
        # The record is on disk before the reply leaves: a worker that dies after replying
        # still has it for the next start (auditspool.py).
        staged = self._audit(served, op, body, command_id, requester, started, outcome, replayed)
        await self._respond(msg, outcome.reply)
        if remember is not None:
            try:
                await remember
            except Exception as exc:
                log.error("could not store the reply of command %s: %s", command_id, type(exc).__name__)
        await self.auditor.send(staged)

    async def _deduplicated(self, served: _Served, op: str, req: Request, command_id: str,
                            body_fp: str, ticket: Ticket,
                            deadline: float | None) -> tuple[_Outcome, Any, bool]:
        """Run a command that carries an id at most once (dedupe.py): the outcome, the
        claim's update to await after replying (or None), and whether it was replayed."""
        server = served.server
        # A claim dropped while this request waited on it (that command never started)
        # is claimed again: this request then runs the command itself.
        for _ in range(3):
            claim = await self.memory.claim(server.name, op, command_id, body_fp)
            if claim.outcome == "dropped":
                continue  # deleted between our create and our read: claim it again
            if claim.outcome == "conflict":
                raise InvalidRequest(
                    f"command id {command_id} was already used for a different {op} on {server.name}")
            if claim.outcome == "run":
                outcome = await self._dispatch(served, op, req, command_id, ticket, deadline)
                # Stored after the reply is sent: the requester does not wait for it, and
                # a retry arriving in between waits for the stored reply.
                if outcome.ran:
                    return outcome, self.memory.finish(server.name, op, command_id, body_fp,
                                                       outcome.reply), False
                # It never reached the server: a retry may run it.
                return outcome, self.memory.forget(server.name, op, command_id), False
            if claim.outcome == "lost":
                raise _lost(command_id, server.name)
            if claim.outcome == "running":
                wait_s = (req.timeout_s if isinstance(req, ExecRequest)
                          else self.settings.transfer_timeout_s)
                waiting = self.memory.wait(server.name, op, command_id, wait_s)
                if isinstance(req, PutRequest) and req.stream is not None:
                    waiting = keep_alive(self.nc, req.stream.subject, waiting)
                claim = await waiting
                if claim.outcome == "dropped":
                    continue
                if claim.outcome == "lost":
                    raise _lost(command_id, server.name)
                if claim.outcome != "replay":
                    raise Timeout(f"command {command_id} is still running elsewhere; "
                                  "this retry stopped waiting for it")
            reply = claim.reply or {}
            outcome = _Outcome(reply=reply, exit_code=reply.get("exit_code"))
            if isinstance(req, ExecRequest) and req.output_subject:
                await self._replay_output(req.output_subject, command_id, reply)
            return outcome, None, True
        raise Busy(f"command {command_id} was claimed and dropped again and again; retry it")

    def _audit(self, served: _Served, op: str, body: dict[str, Any], command_id: str,
               requester: str, started: float, outcome: _Outcome, replayed: bool) -> StagedRecord | None:
        """Count the command and stage its audit record (None when it has none)."""
        error = outcome.reply.get("error") or {}
        if op == "ping" and requester == CHECKER_REQUESTER:
            return None  # health checks have their own metrics and would drown the trail
        elapsed = time.monotonic() - started
        label_op = op if op in OPERATIONS else "invalid"
        result = "ok" if outcome.reply.get("ok") else str(error.get("code", "internal"))
        self.metrics.for_transport(served.transport).finished(label_op, result, elapsed, outcome.bytes)
        # A malformed request's record may be skipped while the audit stream lags, so a
        # flood of them cannot crowd out the records of commands that ran (audit.py).
        malformed = not outcome.ran and result in (InvalidRequest.code, TooLarge.code)
        # The fields of an AuditRecord, from our own values: building and validating a
        # model on every command would only cost time.
        return self.auditor.stage({
            "ts": utcnow(), "id": command_id, "server": served.server.name,
            "transport": served.transport, "op": label_op, "requester": requester,
            "outcome": result, "exit_code": outcome.exit_code, "duration_s": round(elapsed, 6),
            "worker": self.settings.worker_id, "summary": summarize(op, body),
            "bytes": outcome.bytes, "replayed": replayed,
        }, skippable=malformed)

    async def _replay_output(self, subject: str, command_id: str, reply: dict[str, Any]) -> None:
        """A retry's live output is the stored tail, so consumers see the same shape."""
        output = BusOutput(self.nc, command_id, subject, self.settings.tail_bytes)
        details = (reply.get("error") or {}).get("details") or {}
        for stream in ("stdout", "stderr"):
            text = reply.get(stream) or details.get(stream) or ""
            if text:
                await output.write(stream, text.encode())  # type: ignore[arg-type]
        error = (reply.get("error") or {}).get("code")
        await output.end(reply.get("exit_code"), error)

    async def _respond(self, msg: Msg, reply: dict[str, Any]) -> None:
        if not msg.reply:
            return
        try:
            # Not msg.respond(): nats-py's copies the request's headers onto the reply, which
            # the requester then parses again on every command.
            body = _REPLY_JSON.encode(reply).encode()
            if not publish_now(self.nc, msg.reply, body):
                await self.nc.publish(msg.reply, body)
                send_now(self.nc)
        except Exception as exc:
            log.warning("could not send a reply: %s", type(exc).__name__)

    async def _dispatch(self, served: _Served, op: str, req: Request, command_id: str,
                        ticket: Ticket, deadline: float | None = None) -> _Outcome:
        try:
            return await self._run_tracked(served, op, req, command_id, ticket, deadline)
        except FleetbusError as exc:
            return _Outcome(reply={"ok": False, "id": command_id, "error": exc.to_wire()},
                            ran=not exc.before_start)
        except Exception:
            # A transport bug: reply (and remember) internal, so a retry does not hang.
            log.exception("command %s on %s failed unexpectedly", command_id, served.server.name)
            return _Outcome(reply={"ok": False, "id": command_id, "error": InternalError(
                "internal error in the plugin host; see its log").to_wire()})

    async def _run_tracked(self, served: _Served, op: str, req: Request, command_id: str,
                           ticket: Ticket, deadline: float | None = None) -> _Outcome:
        if command_id in served.running:
            raise InvalidRequest(f"command {command_id} is already running on {served.server.name}")
        # The command runs in the request's own task (a task of its own would cost two
        # event-loop hops per command); registered before it waits for a slot, so a
        # queued command can be cancelled too.
        task = asyncio.current_task()
        assert task is not None
        served.running[command_id] = task
        counted = self.metrics.for_transport(served.transport)
        counted.inflight.inc()
        try:
            if served.slots.locked():  # only a command that has to wait is counted as queued
                counted.queued.inc()
                try:
                    await served.slots.acquire()
                except asyncio.CancelledError:
                    self._cancelled_by_request(task, started=False)
                    why = " (the worker is shutting down)" if self._stopping else ""
                    raise Cancelled(f"command {command_id} was cancelled while queued for a "
                                    f"slot{why}; it never started").not_started() from None
                finally:
                    counted.queued.dec()
            else:
                await served.slots.acquire()  # free: returns without waiting
            ticket.release()  # running now: no longer waiting work (admission.py)
            try:
                # A command that waited for its slot past its requester's deadline: nobody
                # is waiting for it any more (its claim, if any, is dropped).
                _check_deadline(deadline, command_id)
                return await self._run(served, op, req, command_id)
            finally:
                served.slots.release()
        finally:
            counted.inflight.dec()
            served.running.pop(command_id, None)

    def _cancelled_by_request(self, task: asyncio.Task[Any], started: bool) -> None:
        """Called on CancelledError inside a command: a cancel request (or unserve) ends
        the command with the ``cancelled`` error. The host stopping ends a command that
        has started together with its request, so it propagates (and the requester is
        told the worker is shutting down); one that never started ends like any other
        cancelled one, so its claim is dropped and a retry (elsewhere, or after the
        restart) runs it."""
        if self._stopping and started:
            raise asyncio.CancelledError
        task.uncancel()  # handled here: later awaits of this request must not see it

    async def _run(self, served: _Served, op: str, req: Request, command_id: str) -> _Outcome:
        server = served.server
        pool = self.sessions[served.transport]
        # Whether the command reached the session; an error before that (opening it,
        # a cancel while it opened) ends a command that never started.
        started = False
        try:
            async with pool.use(server) as session:
                if not session.alive:
                    # Closed under us (an agent that just dropped): nothing was sent.
                    raise ServerOffline(f"the session to {server.name} closed before the command "
                                        "started").not_started()
                started = True
                if isinstance(req, ExecRequest):
                    return await self._exec(session, req, command_id)
                if isinstance(req, PutRequest):
                    return await self._limit(self._put(session, req, command_id),
                                             self.settings.transfer_timeout_s, "put")
                if isinstance(req, GetRequest):
                    return await self._limit(self._get(session, server, req, command_id),
                                             self.settings.transfer_timeout_s, "get")
                if op == "info":
                    return await self._limit(self._info(session, served, command_id),
                                             self.settings.quick_timeout_s, "info")
                return await self._limit(self._ping(session, served, command_id),
                                         self.settings.quick_timeout_s, "ping")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            self._cancelled_by_request(task, started)
            cancelled = Cancelled(f"command {command_id} was cancelled")
            raise (cancelled if started else cancelled.not_started()) from None
        except FleetbusError as exc:
            if not started:
                exc.not_started()
            raise
        except (ConnectionError, OSError) as exc:
            error = TransportError(f"{served.transport} transport failed: {_short(exc)}")
            raise (error if started else error.not_started()) from None

    @staticmethod
    async def _limit(coro: Any, seconds: float, what: str) -> _Outcome:
        try:
            async with asyncio.timeout(seconds):
                return await coro
        except TimeoutError:
            raise Timeout(f"{what} did not finish within {seconds:g} s") from None

    async def _exec(self, session: Session, req: ExecRequest, command_id: str) -> _Outcome:
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
                stdout=output.stdout.text()[-4096:], stderr=output.stderr.text()[-4096:],
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
        return _Outcome(reply=reply, exit_code=result.exit_code, bytes=output.bytes_out)

    async def _put(self, session: Session, req: PutRequest, command_id: str) -> _Outcome:
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
                                req.stream.idle_s, "requester")
            await receiver.open()
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
        return _Outcome(reply=reply, bytes=stat.size)

    async def _get(self, session: Session, server: Server, req: GetRequest, command_id: str) -> _Outcome:
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
                sent, sha256 = await self._send_stream(req, remote.size, remote.chunks)
                reply.update(size=sent, sha256=sha256)
            else:
                name = req.object or f"get/{server.name}/{command_id}"

                async def counted() -> AsyncIterator[bytes]:
                    async for chunk in remote.chunks:
                        digest.update(chunk)
                        yield chunk

                stored = await self.files.write(name, counted())
                reply.update(size=stored.size, object=name, bucket=self.names.files_bucket)
        finally:
            await remote.aclose()
        reply.setdefault("sha256", digest.hexdigest())
        return _Outcome(reply=reply, bytes=reply["size"])

    async def _send_stream(self, req: GetRequest, size: int,
                           chunks: AsyncIterator[bytes]) -> tuple[int, str]:
        """Stream a file to the requester's subject within the credit it grants."""
        assert req.stream is not None
        sender = Sender(self.nc, req.stream.subject, req.stream.window, req.stream.idle_s, "requester")
        sender.total = size or None
        await sender.open()
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

    async def _info(self, session: Session, served: _Served, command_id: str) -> _Outcome:
        facts = await session.info()
        reply = {
            "ok": True, "id": command_id, "server": served.server.name,
            "transport": served.transport,
            "transport_version": self.transport_classes[served.transport].version,
            "hostname": facts.hostname, "os": facts.os, "os_version": facts.os_version,
            "kernel": facts.kernel, "arch": facts.arch, "uptime_s": facts.uptime_s,
            "extra": facts.extra,
        }
        return _Outcome(reply=reply)

    async def _ping(self, session: Session, served: _Served, command_id: str) -> _Outcome:
        started = time.monotonic()
        await session.ping()
        return _Outcome(reply={"ok": True, "id": command_id, "server": served.server.name,
                               "transport": served.transport,
                               "latency_s": round(time.monotonic() - started, 6)})


def _deadline_of(msg: Msg) -> float | None:
    """The request's ``Fleetbus-Deadline`` (Unix seconds), None when absent or unreadable
    (an unreadable one is ignored rather than refused: it only ever drops work)."""
    if not msg.headers:
        return None
    value = msg.headers.get(HDR_DEADLINE)
    if value is None:
        return None
    try:
        deadline = float(value)
    except ValueError:
        return None
    return deadline if math.isfinite(deadline) else None


def _check_deadline(deadline: float | None, command_id: str) -> None:
    """Raise ``timeout`` (not started) when the requester gave up on this command."""
    if deadline is not None and time.time() > deadline + DEADLINE_SKEW_S:
        late = time.time() - deadline
        raise Timeout(f"command {command_id} reached the worker {late:.1f} s after its requester's "
                      "deadline; it was not run").not_started()


def _lost(command_id: str, server: str) -> Lost:
    return Lost(f"command {command_id} on {server}: the worker running it died before it answered; "
                "whether the process ran is unknown (retry with a new id to run it again)")


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__

