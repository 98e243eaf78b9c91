"""One command's life on a worker, from the request's bytes to its audit record.

The plugin host (:mod:`fleetbus.host`) subscribes, admits a request and hands it here,
where it goes, in order:

1. **parse**: JSON (a large body waits for its parse turn, admission.py), the
   operation's pydantic model;
2. **claim**: a command with an id (``exec``, ``put``) is claimed in
   ``fleetbus_commands`` (dedupe.py): this request runs it, or a retry gets the stored
   reply (or waits for the one still running); a user's claim records its identity, so
   the id cannot be replayed or taken over by another (``forbidden``);
3. **slot**: a place under the server's ``max_concurrency``;
4. **run**: the server's session (sessions.py) and the operation under its time limit
   (operations.py);
5. **reply** on the requester's reply subject, then the claim is settled (the reply
   stored, or the claim dropped when the command never started);
6. **audit**: the audit record, its fixed fields encoded while the command runs, staged
   on the worker's disk before the reply leaves (auditspool.py) and sent to the audit
   stream after it; the metrics are counted after the reply.

Every failure on that path ends in one place, :meth:`CommandRunner._handle`'s ladder
(as nats-py's ``micro`` ``Endpoint`` turns a handler's exception into an error reply):
a fleetbus error is its code; the host's own shutdown is ``cancelled`` and
propagates; anything else is a bug, logged and answered ``internal``. Below it,
errors are only raised (the OS's through ``errors.mapped_errors``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from .admission import Ticket
from .audit import PreparedRecord, StagedRecord, summarize
from .connection import publish_now, send_now
from .dedupe import fingerprint
from .errors import (
    RUNNING,
    Busy,
    Cancelled,
    FleetbusError,
    Forbidden,
    InternalError,
    InvalidRequest,
    Lost,
    ServerOffline,
    Timeout,
    TooLarge,
    mapped_errors,
)
from .messages import OPERATIONS, REQUEST_MODELS, ExecRequest, GetRequest, PutRequest, Request, parse_request
from .operations import Outcome, Target
from .output import BusOutput
from .records import utcnow
from .streams import keep_alive
from .subjects import Identity, Names, deadline_in, on_behalf_identity, on_behalf_in, requester_in

if TYPE_CHECKING:
    from .host import PluginHost, Served

log = logging.getLogger("fleetbus.host")
# default=str: a transport's odd `extra` value must not cost the requester its reply.
# One encoder for every reply: json.dumps with any option builds a new one per call.
_REPLY_JSON = json.JSONEncoder(default=str)

# How far a requester's clock may run ahead of ours before its Fleetbus-Deadline
# (subjects.HDR_DEADLINE) would drop work it still waits for.
DEADLINE_SKEW_S = 2.0
CHECKER_REQUESTER = "fleetbus-checker"
# How often a request finds the claim of its command id dropped under it before it
# gives up with `busy`.
CLAIM_ATTEMPTS = 3
# The model of an empty body (what clients send for these) is always the same, and a
# request's model is never changed once parsed: one instance serves every such command,
# with no JSON parse or validation.
_EMPTY_BODIES = (b"{}", b"")
_EMPTY_REQUESTS: dict[str, Request] = {op: REQUEST_MODELS[op].model_validate({}) for op in ("ping", "info")}


def reply_body(reply: dict[str, Any]) -> bytes:
    """A reply as the bytes sent on the bus."""
    return _REPLY_JSON.encode(reply).encode()


def error_reply(command_id: str, error: FleetbusError) -> dict[str, Any]:
    """The reply of a command that ended with ``error``."""
    return {"ok": False, "id": command_id, "error": error.to_wire()}


@dataclass(slots=True)
class _Command:
    """What the path knows of one command as it goes."""

    served: Served
    op: str
    id: str
    requester: str
    identity: Identity
    deadline: float | None
    started: float
    body: dict[str, Any]
    #: The audit identity of a command the job service sent for a user (subjects.on_behalf_in).
    on_behalf: dict[str, Any] | None = None
    #: Its audit record's fixed fields, encoded while it runs (CommandRunner._prepare).
    prepared: PreparedRecord | None = None
    preparing: asyncio.Handle | None = None
    #: Seconds from the request to its outcome, for the record and the metrics.
    elapsed: float = 0.0


class CommandRunner:
    """Runs the commands a :class:`~fleetbus.host.PluginHost` admits, one request each."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    async def handle(self, served: Served, msg: Msg, ticket: Ticket, identity: Identity) -> None:
        """Answer one admitted request from ``identity`` (as NATS authenticated it); its
        admission ticket is released when done."""
        try:
            await self._handle(served, msg, ticket, identity)
        finally:
            ticket.release()

    async def _handle(self, served: Served, msg: Msg, ticket: Ticket, identity: Identity) -> None:
        host = self.host
        _, op = Names.server_op(msg.subject)
        command = _Command(served=served, op=op, id=host.new_id(), requester=requester_in(msg.headers),
                           identity=identity, deadline=deadline_in(msg.headers), started=time.monotonic(), body={},
                           on_behalf=on_behalf_in(msg.headers, identity))
        claimed: str | None = None  # this request holds the command id's claim (its fingerprint)
        replayed = False
        running = False  # the command was handed to a slot: from here an error may have run it
        try:
            req, body_fp = await self._parse(command, msg, ticket)
            _check_deadline(command.deadline, command.id)  # before a claim: nothing to undo
            outcome: Outcome | None = None
            if body_fp is not None:
                outcome = await self._claim(command, req, body_fp)
                replayed = outcome is not None
                claimed = None if replayed else body_fp
            if outcome is None:
                running = True
                if command.op in _WAITING_OPS:
                    # Runs in the loop turn after the command first waits (its process
                    # started), so the record's fixed fields cost no latency.
                    command.preparing = asyncio.get_running_loop().call_soon(self._prepare, command)
                outcome = await self._run_tracked(command, req, ticket)
        except FleetbusError as exc:
            outcome = Outcome(reply=error_reply(command.id, exc), ran=running and not exc.before_start)
        except asyncio.CancelledError:
            # Our own shutdown: tell the requester rather than leaving it to time out. The
            # claim stays: the command may have started, and this worker's lease ends.
            outcome = Outcome(reply=error_reply(command.id, Cancelled("the worker is shutting down")))
            result = _result(outcome)
            staged = self._stage(command, outcome, result, replayed)
            await self._respond(msg, outcome.reply)
            self._count(command, outcome, result)
            await self.host.auditor.send(staged)
            raise
        except Exception:
            # A bug (ours or a transport's): reply (and remember) internal, so a retry
            # does not hang on a claim nobody settles.
            log.exception("command %s on %s failed unexpectedly", command.id, served.server.name)
            outcome = Outcome(reply=error_reply(command.id, InternalError(
                "internal error in the plugin host; see its log")))
        # The reply is on the socket already (send_now), or batched with the others of
        # this loop turn for nats-py's flusher, which the bookkeeping below holds back by
        # a few microseconds; yielding to it here cost every command a loop turn.
        # The record is on disk before the reply leaves: a worker that dies after replying
        # still has it for the next start (auditspool.py). Metrics promise nothing of the
        # kind, so they are counted after it.
        result = _result(outcome)
        staged = self._stage(command, outcome, result, replayed)
        await self._respond(msg, outcome.reply)
        self._count(command, outcome, result)
        if claimed is not None:
            await self._settle(command, claimed, outcome)
        await self.host.auditor.send(staged)

    # 1. parse ------------------------------------------------------------------------
    async def _parse(self, command: _Command, msg: Msg, ticket: Ticket) -> tuple[Request, str | None]:
        """The request's model, and its fingerprint when it runs at most once by id."""
        if msg.data in _EMPTY_BODIES:
            empty = _EMPTY_REQUESTS.get(command.op)
            if empty is not None:
                return empty, None  # command.body stays {}
        if command.op not in OPERATIONS:
            raise InvalidRequest(f"unknown operation {command.op[:32]!r}; use one of {', '.join(OPERATIONS)}")
        body_fp: str | None = None
        async with self.host.admission.parse_turn(ticket):
            # A user's output and transfer subjects must be its own inboxes (forbidden
            # otherwise): fleetbus publishes them in its own account, as itself.
            # A user's job command (from the job service, for the user): its live output goes
            # where that user may subscribe, not into fleetbus's own reply namespace.
            whose = command.identity if command.on_behalf is None else on_behalf_identity(command.on_behalf)
            command.body, req = parse_request(command.op, msg.data, self.host.replies_for(whose))
            if (not command.identity.is_owner and isinstance(req, PutRequest | GetRequest)
                    and req.object is not None):
                # The object store is fleetbus's own and holds every requester's files: a
                # user naming an object would have fleetbus read another's upload onto a
                # server, or overwrite it with a file (a user reaches no JetStream itself).
                raise Forbidden("the object store is fleetbus's own: as a user, move files with a "
                                "streamed transfer (stream)", before_start=True)
            if req.id is not None and command.op in ("exec", "put"):
                body_fp = fingerprint(req)  # as costly as the parse on a large body
                if not command.identity.is_owner:
                    # Whose claim it is goes with the body: another identity's retry
                    # conflicts (and is told so below) instead of replaying its output.
                    body_fp = f"{command.identity.key}/{body_fp}"
        if req.id is not None:
            command.id = req.id
        return req, body_fp

    # 2. claim ------------------------------------------------------------------------
    async def _claim(self, command: _Command, req: Request, body_fp: str) -> Outcome | None:
        """Claim the command id (dedupe.py): None when this request runs the command,
        else the outcome of the run that holds it (replayed)."""
        memory = self.host.memory
        server = command.served.server.name
        # A claim dropped while this request waited on it (that command never started)
        # is claimed again: this request then runs the command itself.
        for _ in range(CLAIM_ATTEMPTS):
            claim = await memory.claim(server, command.op, command.id, body_fp)
            if claim.outcome == "dropped":
                continue  # deleted between our create and our read: claim it again
            if claim.outcome == "conflict":
                await self._check_claimant(command, body_fp)
                raise InvalidRequest(
                    f"command id {command.id} was already used for a different {command.op} on {server}")
            if claim.outcome == "run":
                return None
            if claim.outcome == "lost":
                raise _lost(command.id, server)
            if claim.outcome == "running":
                wait_s = (req.timeout_s if isinstance(req, ExecRequest)
                          else self.host.settings.transfer_timeout_s)
                waiting: Awaitable[Any] = memory.wait(server, command.op, command.id, wait_s)
                if isinstance(req, PutRequest) and req.stream is not None:
                    waiting = keep_alive(self.host.nc, req.stream.subject, waiting)
                claim = await waiting
                if claim.outcome == "dropped":
                    continue
                if claim.outcome == "lost":
                    raise _lost(command.id, server)
                if claim.outcome != "replay":
                    raise Timeout(f"command {command.id} is still running elsewhere; "
                                  "this retry stopped waiting for it")
            reply = claim.reply or {}
            if isinstance(req, ExecRequest) and req.output_subject:
                await self._replay_output(req.output_subject, command.id, reply)
            return Outcome(reply=reply, exit_code=reply.get("exit_code"))
        raise Busy(f"command {command.id} was claimed and dropped again and again; retry it")

    async def _check_claimant(self, command: _Command, body_fp: str) -> None:
        """Raise ``forbidden`` when the id's claim belongs to another identity (whose
        fingerprints carry its key; the owner's carry none)."""
        server = command.served.server.name
        stored = await self.host.memory.load(server, command.op, command.id)
        theirs = str((stored or {}).get("fp") or "")
        if theirs.rpartition("/")[0] != body_fp.rpartition("/")[0]:
            raise Forbidden(f"command id {command.id} on {server} belongs to another user; "
                            "send your command with an id of your own", before_start=True)

    async def _replay_output(self, subject: str, command_id: str, reply: dict[str, Any]) -> None:
        """A retry's live output is the stored tail, so consumers see the same shape."""
        output = BusOutput(self.host.nc, command_id, subject, self.host.settings.tail_bytes)
        details = (reply.get("error") or {}).get("details") or {}
        for stream in ("stdout", "stderr"):
            text = reply.get(stream) or details.get(stream) or ""
            if text:
                await output.write(stream, text.encode())  # type: ignore[arg-type]
        error = (reply.get("error") or {}).get("code")
        await output.end(reply.get("exit_code"), error)

    # 3. slot -------------------------------------------------------------------------
    async def _run_tracked(self, command: _Command, req: Request, ticket: Ticket) -> Outcome:
        served = command.served
        if command.id in served.running:
            raise InvalidRequest(f"command {command.id} is already running on {served.server.name}")
        # The command runs in the request's own task (a task of its own would cost two
        # event-loop hops per command); registered before it waits for a slot, so a
        # queued command can be cancelled too.
        task = asyncio.current_task()
        assert task is not None
        served.running[command.id] = task
        served.senders[command.id] = command.identity
        counted = self.host.metrics.for_transport(served.transport)
        counted.inflight.inc()
        try:
            if served.slots.locked():  # only a command that has to wait is counted as queued
                counted.queued.inc()
                try:
                    await served.slots.acquire()
                except asyncio.CancelledError:
                    self._cancelled_by_request(task, started=False)
                    why = " (the worker is shutting down)" if self.host.stopping else ""
                    raise Cancelled(f"command {command.id} was cancelled while queued for a "
                                    f"slot{why}; it never started", before_start=True) from None
                finally:
                    counted.queued.dec()
            else:
                await served.slots.acquire()  # free: returns without waiting
            ticket.release()  # running now: no longer waiting work (admission.py)
            try:
                # A command that waited for its slot past its requester's deadline: nobody
                # is waiting for it any more (its claim, if any, is dropped).
                _check_deadline(command.deadline, command.id)
                return await self._run(command, req)
            finally:
                served.slots.release()
        finally:
            counted.inflight.dec()
            served.running.pop(command.id, None)
            served.senders.pop(command.id, None)

    def _cancelled_by_request(self, task: asyncio.Task[Any], started: bool) -> None:
        """Called on CancelledError inside a command: a cancel request (or unserve) ends
        the command with the ``cancelled`` error. The host stopping ends a command that
        has started together with its request, so it propagates (and the requester is
        told the worker is shutting down); one that never started ends like any other
        cancelled one, so its claim is dropped and a retry (elsewhere, or after the
        restart) runs it."""
        if self.host.stopping and started:
            raise asyncio.CancelledError
        task.uncancel()  # handled here: later awaits of this request must not see it

    # 4. run --------------------------------------------------------------------------
    async def _run(self, command: _Command, req: Request) -> Outcome:
        served = command.served
        server = served.server
        target = Target(server=server, transport=served.transport,
                        version=self.host.transport_classes[served.transport].version)
        # Whether the command reached the session; an error before that (opening it,
        # a cancel while it opened) ends a command that never started. The pool marks
        # its own failures so (sessions.py).
        started = False
        try:
            async with self.host.sessions[served.transport].use(server) as session:
                if not session.alive:
                    # Closed under us (an agent that just dropped): nothing was sent.
                    raise ServerOffline(f"the session to {server.name} closed before the command "
                                        "started", before_start=True)
                started = True
                with mapped_errors(RUNNING, f"{served.transport} transport failed"):
                    return await self.host.operations.run(session, target, command.op, req, command.id,
                                                          command.identity)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            self._cancelled_by_request(task, started)
            raise Cancelled(f"command {command.id} was cancelled", before_start=not started) from None

    # 5. reply ------------------------------------------------------------------------
    async def _respond(self, msg: Msg, reply: dict[str, Any]) -> None:
        if not msg.reply:
            return
        try:
            # Not msg.respond(): nats-py's copies the request's headers onto the reply, which
            # the requester then parses again on every command.
            body = reply_body(reply)
            if not publish_now(self.host.nc, msg.reply, body):
                await self.host.nc.publish(msg.reply, body)
                send_now(self.host.nc)
        except Exception as exc:
            log.warning("could not send a reply: %s", type(exc).__name__)

    async def _settle(self, command: _Command, body_fp: str, outcome: Outcome) -> None:
        """Store the claimed command's reply, or drop its claim when it never reached the
        server (a retry may run it). After the reply: the requester does not wait for
        it, and a retry arriving in between waits for the stored reply."""
        memory = self.host.memory
        server = command.served.server.name
        try:
            if outcome.ran:
                await memory.finish(server, command.op, command.id, body_fp, outcome.reply)
            else:
                await memory.forget(server, command.op, command.id)
        except Exception as exc:
            log.error("could not store the reply of command %s: %s", command.id, type(exc).__name__)

    # 6. audit ------------------------------------------------------------------------
    def _prepare(self, command: _Command) -> None:
        """Encode the fields of the command's record that its run cannot change."""
        command.preparing = None
        served = command.served
        command.prepared = self.host.auditor.prepare(
            command.id, served.server.name, served.transport, _label_op(command.op), command.requester,
            command.on_behalf or command.identity.record(), self.host.settings.worker_id,
            summarize(command.op, command.body))

    def _stage(self, command: _Command, outcome: Outcome, result: str, replayed: bool) -> StagedRecord | None:
        """Stage the command's audit record (None when it has none); ``result`` is
        ``_result(outcome)``."""
        command.elapsed = time.monotonic() - command.started
        if command.preparing is not None:  # the run never waited
            command.preparing.cancel()
            command.preparing = None
        if _unaudited(command):
            return None
        # A malformed request's record may be skipped while the audit stream lags, so a
        # flood of them cannot crowd out the records of commands that ran (audit.py).
        malformed = not outcome.ran and result in (InvalidRequest.code, TooLarge.code)
        if not malformed:
            # The id is final before anything prepares (_parse sets it from the request).
            if command.prepared is None:
                self._prepare(command)  # a ping or info, or a run that never waited
            assert command.prepared is not None
            return self.host.auditor.stage_prepared(command.prepared, utcnow(), result, outcome.exit_code,
                                                    round(command.elapsed, 6), outcome.bytes, replayed)
        served = command.served
        # The fields of an AuditRecord, from our own values: building and validating a
        # model on every command would only cost time.
        return self.host.auditor.stage({
            "ts": utcnow(), "id": command.id, "server": served.server.name,
            "transport": served.transport, "op": _label_op(command.op), "requester": command.requester,
            "identity": command.on_behalf or command.identity.record(),
            "outcome": result, "exit_code": outcome.exit_code, "duration_s": round(command.elapsed, 6),
            "worker": self.host.settings.worker_id, "summary": summarize(command.op, command.body),
            "bytes": outcome.bytes, "replayed": replayed,
        }, skippable=malformed)

    def _count(self, command: _Command, outcome: Outcome, result: str) -> None:
        """The command's metrics (after the reply: they promise nothing to the requester)."""
        label_op = _label_op(command.op)
        if result == Forbidden.code:
            self.host.denied(command.identity, label_op)
        self.host.metrics.for_transport(command.served.transport).finished(
            label_op, result, command.elapsed, outcome.bytes)


def _label_op(op: str) -> str:
    return op if op in OPERATIONS else "invalid"


def _result(outcome: Outcome) -> str:
    """``ok`` or the error code the command ended with."""
    if outcome.reply.get("ok"):
        return "ok"
    return str((outcome.reply.get("error") or {}).get("code", "internal"))


# Operations whose run waits (for a process, a transfer): their record is prepared in
# that wait. A ping or info is prepared after its run, in one go, which costs less CPU.
_WAITING_OPS = frozenset(("exec", "put", "get"))


def _unaudited(command: _Command) -> bool:
    # Health checks have their own metrics and would drown the trail.
    return command.op == "ping" and command.requester == CHECKER_REQUESTER


def _check_deadline(deadline: float | None, command_id: str) -> None:
    """Raise ``timeout`` (not started) when the requester gave up on this command."""
    if deadline is not None and time.time() > deadline + DEADLINE_SKEW_S:
        late = time.time() - deadline
        raise Timeout(f"command {command_id} reached the worker {late:.1f} s after its requester's "
                      "deadline; it was not run", before_start=True)


def _lost(command_id: str, server: str) -> Lost:
    return Lost(f"command {command_id} on {server}: the worker running it died before it answered; "
                "whether the process ran is unknown (retry with a new id to run it again)")
