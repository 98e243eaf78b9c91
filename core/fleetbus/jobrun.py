"""Running one job in the core: bus requests to each target, as :class:`JobPlan` decides.

Each server's command is an ordinary request on ``<prefix>.v1.servers.<server>.<op>``
(so the plugin host validates, limits, audits and dedupes it as any other), with a
command id derived from the job id and the server (:func:`command_id`): a retried or
resumed job never runs an ``exec`` twice on one server. Results go to the jobs stream
as they arrive (:class:`~fleetbus.jobrecords.JobStore`); counts go out as ``progress``.

A job with ``wait_online_s`` does not end an offline server's turn at its first
``server_offline``: the server waits (:meth:`JobPlan.wait`) until the status bucket says
it is online (:class:`~fleetbus.jobwait.OnlineWatch`), then it is sent the request
again; past its wait it is an ``offline`` error. The wait is timed from the first
``server_offline``, so a server that flaps is not waited for twice.

What is durable before what: a server's command is sent only once the ``jobs_live``
entry listing it (:class:`~fleetbus.jobleases.JobLeases`) and the job's ``started``
record are stored, so a core that dies leaves it ``unknown``, never ``skipped``. That
write is not awaited by the loop: the servers it lets start wait for it in their own
tasks while the loop goes on, and one is in flight at a time (starts made meanwhile
share the next). Results are sent without waiting for each
acknowledgement; a server stays listed in ``jobs_live`` until its result is stored. The
``finished`` record is sent after every result (the stream keeps them in that order)
and the ``jobs_live`` entry is deleted once all of them are acknowledged.

Cancel and the deadline stop the plan and send each running command the ordinary
per-server ``cancel`` request, repeated until the command has answered, since a cancel
that reaches a worker before the command does finds nothing to stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from fleetbus_base.text import one_line, shorten
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from .jobleases import JobLeases
from .jobplan import JobPlan, Outcome, StopReason
from .jobrecords import JobCounts, JobDefinition, JobStore, JobSummary, ServerResult, acked, tail
from .jobrequest import job_object
from .jobwait import OnlineWatch, shown_duration
from .lastseen import last_seen
from .names import COMMAND_ID_RE
from .records import ServerStatus
from .replies import Replies
from .subjects import HDR_ON_BEHALF_OF, Names, request_headers

log = logging.getLogger("fleetbus.jobs")

# How long a job waits for a server's status when it explains why nobody serves it.
STATUS_READ_S = 2.0

ENV_JOB = "FLEETBUS_JOB"
ENV_SERVER = "FLEETBUS_SERVER"
# Beyond a command's own limit, how long the job waits for the worker's reply.
REPLY_GRACE_S = 30.0
# How often a cancel is sent again to a command that has not answered yet.
CANCEL_REPEAT_S = 0.5
# Progress goes out on every start and result, and at least this often: a follower that
# subscribes while nothing changes (a long command, a server waiting to come online)
# still gets the counts soon. Plain NATS events, so one a second costs nothing.
PROGRESS_EVERY_S = 1.0

_ERROR_OUTCOMES: dict[str, Outcome] = {"timeout": "timeout", "server_offline": "offline",
                                       "cancelled": "cancelled"}


def command_id(job: str, server: str) -> str:
    """The id of ``server``'s command in ``job``: ``<job>-<server>`` when that fits a
    command id (64 characters), else ``<job>-`` and a hash of the server name."""
    plain = f"{job}-{server}"
    if COMMAND_ID_RE.fullmatch(plain):
        return plain
    return f"{job}-{hashlib.sha256(server.encode()).hexdigest()[:24]}"


@dataclass
class JobSpec:
    """A validated job, ready to run (built by the job service from a ``JobRequest``)."""

    definition: JobDefinition
    plan: JobPlan
    op: str
    body: dict[str, Any]  # the per-server request body, without its id
    timeout_s: float
    deadline_s: float | None
    wait_online_s: float | None = None  # how long an offline server may wait to come online
    #: A user's job: server -> the grant its command is sent through (jobaccess.py), so
    #: the worker's subscription checks the grant again; None: the servers' own subjects.
    grants: dict[str, str] | None = None
    #: A user's job: the ``Fleetbus-On-Behalf-Of`` header naming the user to the worker.
    on_behalf: str | None = None


@dataclass
class JobRun:
    """One job running in this process: started with :meth:`start`, stopped with :meth:`cancel`."""

    nc: NATS
    names: Names
    store: JobStore
    spec: JobSpec
    requester: str
    # The core's requests, each reply resolved straight from the read loop, as the
    # client's are (nats-py's request() adds a task and loop turns per reply). The job
    # service always gives one; without it, nats-py's request() is used.
    replies: Replies | None = None
    leases: JobLeases | None = None
    status: KeyValue | None = None  # the status bucket, watched when the job waits for servers
    task: asyncio.Task[None] | None = None
    # The write of the ``started`` record, when the job service has not awaited it yet:
    # no command is sent before it is acknowledged.
    kept: asyncio.Future[None] | None = None
    summary: JobSummary | None = None  # set once the end is recorded
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _started: float = field(default_factory=time.monotonic)
    _online: OnlineWatch | None = None
    _progressed: float = 0.0  # when progress last went out (monotonic)
    _sent_at: dict[str, int] = field(default_factory=dict)  # server -> OnlineWatch mark at its last send
    _wait_until: dict[str, float] = field(default_factory=dict)  # server -> monotonic end of its wait
    # Servers whose last request found no responder: only those wait. A worker's own
    # server_offline reply (an agent lost mid-command) is an error as it stands.
    _unserved: set[str] = field(default_factory=set)
    # Result records sent and not yet acknowledged: their servers stay in jobs_live.
    _unacked: dict[asyncio.Future[Any], str] = field(default_factory=dict)
    _live_busy: asyncio.Future[Any] | None = None  # the jobs_live write in flight
    _live_next: asyncio.Future[Any] | None = None  # done when the write after it is stored
    _done: list[asyncio.Task[ServerResult]] = field(default_factory=list)  # ended, not yet handled
    _wake: asyncio.Future[None] | None = None  # what the loop waits on while nothing has ended
    # The first starts and what they wait for, decided in start().
    _first: tuple[list[str], asyncio.Future[Any] | None] | None = None

    @property
    def id(self) -> str:
        return self.spec.definition.id

    def start(self) -> asyncio.Task[None]:
        """Start running. The first starts' ``jobs_live`` write is sent from here, so
        it goes out in the same loop turn (and socket write) as the ``started`` record
        the job service sent just before, and both acknowledgements come back together."""
        starts = self.spec.plan.next_starts()
        self._first = (starts, self._before_sending(starts, set) if starts else None)
        self.task = asyncio.create_task(self._run(), name=f"job {self.id}")
        return self.task

    def cancel(self) -> None:
        """Start nothing more and cancel what runs; the job then records how it ended."""
        self.spec.plan.stop("cancelled")
        self._stop.set()

    # running ------------------------------------------------------------------------------
    async def _run(self) -> None:
        plan = self.spec.plan
        running: dict[asyncio.Task[ServerResult], str] = {}
        cancelling: asyncio.Task[None] | None = None
        stop_wait = asyncio.create_task(self._stop.wait())
        online_wait: asyncio.Task[Any] | None = None
        deadline = None if self.spec.deadline_s is None else self._started + self.spec.deadline_s
        try:
            if self.spec.wait_online_s is not None and self.status is not None:
                self._online = OnlineWatch(self.status, set(plan.targets))
                await self._online.start()
            while True:
                if self._first is not None:
                    (starts, gate), self._first = self._first, None
                else:
                    starts = plan.next_starts()
                    gate = self._before_sending(starts, lambda: set(running.values())) if starts else None
                if gate is not None and self.kept is not None:
                    # The first starts: a job whose started record was not kept must not
                    # run at all (its start was answered with an error).
                    await asyncio.wait([gate])  # it waits for self.kept too
                    if self.kept.cancelled() or self.kept.exception() is not None:
                        if self.leases is not None:
                            await self.leases.ended(self.id)
                        return
                    self.kept = None
                for server in starts:
                    if self._online is not None:
                        self._sent_at[server] = self._online.mark()
                    task = asyncio.create_task(self._one(server, gate))
                    task.add_done_callback(self._on_done)
                    running[task] = server
                await self._progress()
                if plan.done:
                    break
                # Wake for the deadline, the first wait to run out, or the next progress.
                ends = [self._progressed + PROGRESS_EVERY_S, *self._waits(), *([deadline] if deadline else [])]
                timeout = max(0.0, min(ends) - time.monotonic())
                if not self._done:
                    # Not asyncio.wait over the running tasks: that adds and removes a
                    # callback on each of them every turn, a cost that grows with the
                    # concurrency. Each task reports itself through _on_done instead.
                    self._wake = asyncio.get_running_loop().create_future()
                    waiting: set[asyncio.Future[Any]] = {self._wake}
                    if not stop_wait.done():
                        waiting.add(stop_wait)
                    if self._online is not None and plan.waiting:
                        if online_wait is None or online_wait.done():
                            online_wait = asyncio.create_task(self._online.changed.wait())
                        waiting.add(online_wait)
                    await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    self._wake = None
                done, self._done = self._done, []
                if deadline is not None and time.monotonic() >= deadline:
                    plan.stop("deadline")
                    deadline = None
                if self._online is not None:
                    self._online.changed.clear()  # before looking, so no change falls between
                await self._check_waiting()
                if plan.stopped in ("cancelled", "deadline") and cancelling is None:
                    cancelling = asyncio.create_task(self._cancel_running(running))
                for task in done:
                    server = running.pop(task)
                    result = task.result()
                    if server in self._unserved and self._may_wait(server):
                        plan.wait(server)  # its result comes when it is served or its wait ends
                        await self._check_waiting()
                        continue
                    plan.finished(server, result.outcome)  # type: ignore[arg-type]
                    await self._keep(result)
            for server in plan.given_up:
                await self._keep(self._offline(server, f"{server} was still offline when the job stopped"))
            for server in plan.skipped():
                await self._keep(ServerResult(job=self.id, server=server, outcome="skipped"))
            summary = self._summary()
            if self.kept is not None:
                await self.kept  # a job with nothing to start
            finished = await self.store.send(self.id, "finished", summary)
            await self._results_acked()
            await acked(finished)
            self.summary = summary
            if self.leases is not None:
                while self._live_busy is not None and not self._live_busy.done():
                    await asyncio.wait([self._live_busy])  # no write may land after the delete
                await self.leases.ended(self.id)
        except Exception:
            log.exception("job %s failed", self.id)
            raise
        finally:
            stop_wait.cancel()
            if online_wait is not None:
                online_wait.cancel()
            if self._online is not None:
                await self._online.aclose()
            if cancelling is not None:
                cancelling.cancel()
            for task in running:
                task.cancel()

    def _on_done(self, task: asyncio.Task[ServerResult]) -> None:
        self._done.append(task)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # waiting for offline servers ---------------------------------------------------------
    async def _unserved_message(self, server: str) -> str:
        """Why nobody serves ``server``, as its status record tells it: its state, when it
        was last seen, and what its last server said (an agent that went away)."""
        message = f"nobody serves {server} right now"
        if self.status is None:
            return message
        try:
            entry = await asyncio.wait_for(self.status.get(server), STATUS_READ_S)
            status = ServerStatus.model_validate_json(entry.value or b"")
        except Exception:  # no record (never served), or the bucket is unavailable
            return message
        said = f"; {shorten(one_line(status.detail), 200)}" if status.detail else ""
        return f"{message}: {status.state} ({last_seen(status.model_dump(mode='json'))}){said}"

    def _may_wait(self, server: str) -> bool:
        """Whether an offline ``server`` waits (rather than being an error now); its
        wait starts at its first ``server_offline``."""
        if self._online is None or self.spec.wait_online_s is None or self.spec.plan.stopped is not None:
            return False
        until = self._wait_until.setdefault(server, time.monotonic() + self.spec.wait_online_s)
        return time.monotonic() < until

    def _waits(self) -> list[float]:
        return [self._wait_until[s] for s in self.spec.plan.waiting]

    async def _check_waiting(self) -> None:
        """Send again to waiting servers reported online since their last send; end the
        waits that ran out as ``offline`` errors."""
        plan = self.spec.plan
        if self._online is None:
            return
        now = time.monotonic()
        for server in list(plan.waiting):
            if self._online.since(server, self._sent_at.get(server, 0)):
                plan.online(server)
            elif now >= self._wait_until[server]:
                plan.expired(server)
                wait = shown_duration(self.spec.wait_online_s or 0)
                await self._keep(self._offline(server, f"{server} did not come online within {wait}"))

    def _offline(self, server: str, message: str) -> ServerResult:
        origin = self.spec.definition.command_origins.get(server, self.id)
        return ServerResult(job=self.id, server=server, outcome="offline", command_id=command_id(origin, server),
                            error={"code": "server_offline", "message": message})

    def _before_sending(self, starts: list[str], running: Callable[[], set[str]]) -> asyncio.Future[Any] | None:
        """What must be stored before the commands of ``starts`` are sent: the
        ``jobs_live`` entry listing them with every server whose result is not stored
        yet (if this core dies, those may be running: ``unknown``), and the ``started``
        record."""
        waits: list[Awaitable[Any]] = []
        if self.leases is not None:
            waits.append(self._live_write(set(starts), running))
        if self.kept is not None:
            waits.append(self.kept)
        if not waits:
            return None
        return asyncio.ensure_future(asyncio.gather(*waits))

    def _live_write(self, starts: set[str], running: Callable[[], set[str]]) -> asyncio.Future[Any]:
        """A ``jobs_live`` write listing ``starts``. One is in flight at a time: starts
        made meanwhile share the next one, written once it is stored with what is
        running then (they are in ``running`` by then). So a wave of starts costs one
        or two writes, not one per loop turn, and the last write stored lists them all."""
        assert self.leases is not None
        leases = self.leases

        def write(servers: set[str]) -> asyncio.Future[Any]:
            self._live_busy = asyncio.ensure_future(
                leases.running(self.id, servers | set(self._unacked.values())))
            return self._live_busy

        if self._live_busy is None or self._live_busy.done():
            return write(starts | running())
        if self._live_next is None:
            following: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._live_next = following

            def after(_: asyncio.Future[Any]) -> None:
                self._live_next = None
                write(running()).add_done_callback(lambda done: _settle(following, done))

            self._live_busy.add_done_callback(after)
        return self._live_next

    async def _keep(self, result: ServerResult) -> None:
        # One record the stream would not take must not stop the job with commands
        # still running on servers; the summary's counts still include it.
        try:
            ack = await self.store.send(self.id, "result", result)
        except Exception as exc:
            log.error("job %s: the result of %s was not kept: %s", self.id, result.server, type(exc).__name__)
            return
        self._unacked[ack] = result.server
        ack.add_done_callback(self._on_result_acked)

    def _on_result_acked(self, ack: asyncio.Future[Any]) -> None:
        server = self._unacked.get(ack)
        if ack.cancelled():
            return  # waited for too long in _results_acked, which says so
        if ack.exception() is not None:
            # Still listed in jobs_live: if this core dies, the server is unknown.
            log.error("job %s: the result of %s was not kept: %s", self.id, server,
                      type(ack.exception()).__name__)
            return
        self._unacked.pop(ack, None)

    async def _results_acked(self) -> None:
        """Wait for the result records still unacknowledged (a failed one is logged by
        :meth:`_on_result_acked`)."""
        for ack, server in list(self._unacked.items()):
            if ack.done():
                continue
            try:
                await acked(ack)
            except TimeoutError:
                log.error("job %s: the result of %s was not acknowledged in time", self.id, server)
            except Exception:
                pass

    async def _one(self, server: str, gate: asyncio.Future[Any] | None = None) -> ServerResult:
        origin = self._origin(server)
        cid = command_id(origin, server)
        body = {**self.spec.body, "id": cid}
        if self.spec.op == "exec":
            # A command learns where and in which job it runs; the request's own env wins.
            body["env"] = {ENV_JOB: origin, ENV_SERVER: server, **body.get("env", {})}
        elif self.spec.op == "get":
            body["object"] = job_object(self.id, server)  # where the requester fetches it
        started = time.monotonic()
        self._unserved.discard(server)
        if gate is not None:
            try:
                await asyncio.shield(gate)
            except Exception as exc:
                # Not recorded as maybe running: it must not run. Nothing was sent.
                return ServerResult(job=self.id, server=server, outcome="error", command_id=cid,
                                    duration_s=_since(started),
                                    error={"code": "internal", "message": "the core could not record the job's "
                                           f"progress, so the command was not sent: {type(exc).__name__}"})
        try:
            request = self.replies.request if self.replies is not None else self.nc.request
            wait = self.spec.timeout_s + REPLY_GRACE_S
            # A worker that reaches the request after the job stopped waiting (it was
            # stopped, or far behind) answers `timeout` instead of running it unseen.
            headers = request_headers(self.requester, time.time() + wait)
            if self.spec.on_behalf is not None:
                headers[HDR_ON_BEHALF_OF] = self.spec.on_behalf
            msg = await request(self._subject(server), json.dumps(body).encode(), timeout=wait, headers=headers)
            reply = json.loads(msg.data)
        except nats.errors.NoRespondersError:
            refused = await self._grant_gone(server, cid, started)
            if refused is not None:
                return refused
            self._unserved.add(server)
            return ServerResult(job=self.id, server=server, outcome="offline", command_id=cid,
                                duration_s=_since(started),
                                error={"code": "server_offline", "message": await self._unserved_message(server)})
        except nats.errors.TimeoutError:
            return ServerResult(job=self.id, server=server, outcome="timeout", command_id=cid,
                                duration_s=_since(started),
                                error={"code": "timeout", "message": "no reply from the worker in time"})
        except nats.errors.Error as exc:
            # The core's own connection failed (closed, draining): whether the command
            # reached the server is unknown, so it is an error, never retried here.
            return ServerResult(job=self.id, server=server, outcome="error", command_id=cid,
                                duration_s=_since(started),
                                error={"code": "internal",
                                       "message": f"the core could not send the request: {type(exc).__name__}"})
        except ValueError:
            reply = {"ok": False, "error": {"code": "internal", "message": "unreadable reply"}}
        return _result(self.id, server, cid, reply, _since(started))

    def _subject(self, server: str) -> str:
        """Where ``server``'s command goes: a user's grant subject, else the server's own."""
        grants = self.spec.grants
        if grants is not None:
            return self.names.grant(grants[server], server, self.spec.op)
        return self.names.server(server, self.spec.op)

    async def _grant_gone(self, server: str, cid: str, started: float) -> ServerResult | None:
        """A user's command found nobody on its grant subject while the server is
        online: the grant no longer selects it (changed or removed mid-job), so the
        worker's check refused it. ``forbidden`` then; None when the server is not
        online (an offline server, handled as for any job)."""
        if self.spec.grants is None or self.status is None:
            return None
        try:
            entry = await asyncio.wait_for(self.status.get(server), STATUS_READ_S)
            online = ServerStatus.model_validate_json(entry.value or b"").state == "online"
        except Exception:  # no record, or the bucket is unavailable: say offline
            return None
        if not online:
            return None
        return ServerResult(job=self.id, server=server, outcome="error", command_id=cid,
                            duration_s=_since(started),
                            error={"code": "forbidden", "message": (
                                f"{server} is online but not served through grant {self.spec.grants[server]}: "
                                "the user's grants no longer cover it; nothing was run")})

    def _origin(self, server: str) -> str:
        """The job whose id ``server``'s command carries: a rerun keeps an abandoned
        job's id for a server whose command may have run."""
        return self.spec.definition.command_origins.get(server, self.id)

    def _command_id(self, server: str) -> str:
        return command_id(self._origin(server), server)

    async def _cancel_running(self, running: dict[asyncio.Task[ServerResult], str]) -> None:
        while running:
            for server in list(running.values()):
                try:
                    await self.nc.publish(self.names.server(server, "cancel"),
                                          json.dumps({"id": self._command_id(server)}).encode())
                except Exception as exc:
                    log.warning("job %s: could not cancel on %s: %s", self.id, server, type(exc).__name__)
            await asyncio.sleep(CANCEL_REPEAT_S)

    # reporting ---------------------------------------------------------------------------
    def counts(self) -> JobCounts:
        plan = self.spec.plan
        # The rule of jobrecords.count (every outcome but ok and cancelled is failed; a
        # running job has no skipped or unknown outcome yet), read from the plan's tally:
        # progress goes out on every result, and counting every outcome each time adds up.
        tally = plan.tally
        finished = len(plan.outcomes)
        return JobCounts(
            total=len(plan.targets), ok=tally["ok"], cancelled=tally["cancelled"],
            failed=finished - tally["ok"] - tally["cancelled"],
            skipped=plan.skipped_count, running=len(plan.running), waiting=len(plan.waiting),
            pending=0 if plan.stopped else len(plan.pending),
        )

    async def _progress(self) -> None:
        self._progressed = time.monotonic()
        body = {"job": self.id, "counts": self.counts().model_dump(),
                "elapsed_s": round(time.monotonic() - self._started, 3)}
        try:
            await self.nc.publish(self.names.job_event(self.id, "progress"), json.dumps(body).encode())
        except Exception:
            pass  # progress is a courtesy; the records are what counts

    def _summary(self) -> JobSummary:
        plan = self.spec.plan
        counts = self.counts()
        reason: StopReason | None = plan.stopped
        if reason == "cancelled":
            state = "cancelled"
        elif reason is not None:
            state = "stopped"
        elif counts.failed or counts.cancelled:
            state = "failed"
        else:
            state = "succeeded"
        return JobSummary(job=self.id, state=state, stop_reason=reason, counts=counts,  # type: ignore[arg-type]
                          duration_s=_since(self._started))


def _settle(future: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Give ``future`` the outcome of ``done``."""
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif done.exception() is not None:
        future.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        future.set_result(done.result())


def _since(started: float) -> float:
    return round(time.monotonic() - started, 6)


def _result(job: str, server: str, cid: str, reply: dict[str, Any], elapsed: float) -> ServerResult:
    if reply.get("ok"):
        exit_code = reply.get("exit_code")
        signal = reply.get("signal")
        failed = "exit_code" in reply and (exit_code != 0 or signal is not None)
        data = None
        if "exit_code" not in reply:  # ping, info: their facts
            data = {k: v for k, v in reply.items() if k not in ("ok", "id")}
        return ServerResult(
            job=job, server=server, outcome="failed" if failed else "ok", command_id=cid,
            exit_code=exit_code, signal=signal,
            duration_s=float(reply.get("duration_s", elapsed)),
            stdout=tail(reply.get("stdout")), stderr=tail(reply.get("stderr")), data=data)
    error = reply.get("error") or {}
    details = error.get("details") or {}
    code = str(error.get("code", "internal"))
    return ServerResult(
        job=job, server=server, outcome=_ERROR_OUTCOMES.get(code, "error"), command_id=cid,
        duration_s=elapsed,
        error={"code": code, "message": str(error.get("message", ""))[:1024]},
        stdout=tail(details.get("stdout")), stderr=tail(details.get("stderr")))
