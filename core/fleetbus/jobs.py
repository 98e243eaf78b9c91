"""The job service: ``<prefix>.v1.jobs.start|get|list|cancel|rerun`` as a NATS micro service.

A job is one operation on many servers (docs/bus-api.md, "Jobs"). ``start`` validates
the request (:class:`~fleetbus.jobrequest.JobRequest`), resolves the selection against the registry
(:mod:`fleetbus.selection`), keeps the definition in the jobs stream and answers with
the job id at once; the job then runs in this process as a task (:mod:`fleetbus.jobrun`)
under the rules of :mod:`fleetbus.jobplan`, so it outlives whoever started it. ``get``
and ``list`` answer from the jobs stream (:mod:`fleetbus.jobrecords`), during the job
and after it. Only the core runs this service (``fleetbus-jobs``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from fleetbus_base.text import shorten
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.object_store import OBJ_DIGEST_TYPE
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Service
from pydantic import ValidationError

from . import __version__
from .audit import Auditor, AuditRecord
from .endpoint import answer
from .errors import InvalidRequest, NotFound
from .jetstream import State
from .jobaccess import Asker, JobAccess
from .jobleases import JobLeases
from .jobplan import JobPlan
from .jobrecords import JobCounts, JobDefinition, JobStore, JobSummary, ServerResult, count
from .jobrequest import REDACTED, JobId, JobList, JobRequest, JobRerun
from .jobrun import JobRun, JobSpec, command_id
from .messages import reply_context
from .metrics import Metrics
from .objects import ObjectFiles
from .records import utcnow
from .registry import Registry
from .registryview import RegistryView
from .replies import Replies
from .selection import resolve
from .subjects import OWNER, Identity, ReplySubjects, requester_in

log = logging.getLogger("fleetbus.jobs")

# On shutdown, how long running jobs get to cancel their commands and record the end.
STOP_GRACE_S = 10.0
# How long a core asks the core running a job for its live counts before it counts
# from the records instead (that core answers at once unless it is dying).
COUNTS_WAIT_S = 1.0

# (body, declared requester, identity NATS authenticated): called from inside the core
# (tests, a sibling service) without an identity, a request is the owner's.
Handler = Callable[[dict[str, Any], str, Identity], Awaitable[dict[str, Any]]]


class JobService:
    """Serves ``jobs.*`` and runs the jobs it started. ``start``/``stop`` in that order."""

    def __init__(self, nc: NATS, state: State, registry: Registry,
                 metrics: Metrics | None = None, replies: ReplySubjects | None = None) -> None:
        self.nc = nc
        self.names = names = state.names
        # Where a job's output_subject may point: the deployment's reply namespace.
        self.replies = replies or names.reply_subjects()
        self.registry = registry
        self.requests = Replies(nc)  # the jobs' requests to servers, and the view's
        # Selections are resolved against this, not a snapshot per start (registryview.py).
        self.view = RegistryView(state.js, registry, names.servers_bucket, self.requests)
        self.metrics = metrics or Metrics()
        self.store = JobStore(state.js, names)
        self.leases = JobLeases(state.job_cores, state.jobs_live, self._abandon)
        self.auditor = Auditor(nc, names)
        self.files = ObjectFiles(state.js, names.files_bucket)  # a put job's content, for reruns
        # Users' grants and names: the rules of a deputy (jobaccess.py).
        self.access = JobAccess(state.users, names, self.metrics)
        self.running: dict[str, JobRun] = {}
        self.service: Service | None = None
        self._handoffs: list[Subscription] = []

    async def start(self) -> None:
        await self.view.start()
        await self.access.start()  # before serving: a user's first start is checked
        self.service = await add_service(
            self.nc, name="fleetbus-jobs", version=__version__,
            description="fleetbus jobs: one operation on many servers",
        )
        endpoints: dict[str, Handler] = {
            "start": self.start_job, "get": self.get_job, "list": self.list_jobs,
            "cancel": self.cancel_job, "rerun": self.rerun_job,
        }
        for verb, handler in endpoints.items():
            await self.service.add_endpoint(name=verb, subject=self.names.jobs(verb),
                                            handler=self._wrap(verb, handler))
        await self.leases.start()
        # jobs.* reach one core of several (a queue group). That core hands a cancel on
        # to the one running the job through this event, and asks it for the live counts
        # with a request on ``counts``: every core receives both, only the one running
        # the job acts.
        self._handoffs = [
            await self.nc.subscribe(self.names.job_event("*", "cancelling"), cb=self._on_cancelling),
            await self.nc.subscribe(self.names.job_event("*", "counts"), cb=self._on_counts),
        ]

    async def _on_cancelling(self, msg: Msg) -> None:
        run = self.running.get(msg.subject.split(".")[-2])
        if run is not None:
            run.cancel()

    async def _on_counts(self, msg: Msg) -> None:
        run = self.running.get(msg.subject.split(".")[-2])
        if run is not None and msg.reply:
            await msg.respond(run.counts().model_dump_json().encode())

    async def stop(self) -> None:
        for sub in self._handoffs:
            await sub.unsubscribe()
        if self.service is not None:
            await self.service.stop()
        runs = list(self.running.values())
        for run in runs:
            run.cancel()  # a job cannot outlive its process yet; it records that it was cancelled
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        await self.leases.stop()
        await self.access.stop()
        await self.view.aclose()
        await self.requests.close()
        await self.auditor.close()

    async def _abandon(self, job: str, maybe_running: list[str]) -> None:
        """Record the end of a job whose core died: what may have run is ``unknown``."""
        try:
            definition = await self.store.definition(job)
        except NotFound:
            return  # its started record was never kept, so none of its commands was sent
        if await self.store.summary(job) is not None:
            return  # its end was recorded after all
        results = await self.store.results(job)
        have = {r.server for r in results}
        for server in definition.targets:
            if server in have:
                continue
            unknown = server in maybe_running
            origin = definition.command_origins.get(server, job)
            result = ServerResult(job=job, server=server, outcome="unknown" if unknown else "skipped",
                                  command_id=command_id(origin, server) if unknown else None)
            await self.store.result(result)
            results.append(result)
        await self.store.finished(JobSummary(
            job=job, state="abandoned", counts=count(len(definition.targets), [r.outcome for r in results]),
            duration_s=round((utcnow() - definition.created).total_seconds(), 6)))
        self.metrics.jobs_finished.labels(str(definition.request.get("op")), "abandoned", "none").inc()

    def _wrap(self, verb: str, handler: Handler) -> Callable[[MicroRequest], Awaitable[None]]:
        async def serve(req: MicroRequest) -> None:
            started = time.monotonic()
            asker = self.access.asker(req.headers, requester_in(req.headers))
            answered = await answer(req, self.replies, lambda body: handler(body, asker.requester, asker.identity))
            if answered is not None and verb in ("start", "cancel", "rerun"):
                await self._audit(verb, asker.requester, asker.identity.record(), answered[1], started)

        return serve

    async def _audit(self, verb: str, requester: str, identity: dict[str, Any], reply: dict[str, Any],
                     started: float) -> None:
        """Who started or cancelled which job (each server's command is audited by its worker)."""
        error = reply.get("error") or {}
        job = str(reply.get("id") or "")
        summary = f"jobs.{verb} {job}".strip()
        if reply.get("targets") is not None:
            summary += f" on {len(reply['targets'])} servers" + (" (dry run)" if reply.get("dry_run") else "")
        await self.auditor.record(AuditRecord(
            ts=utcnow(), id=job or uuid.uuid4().hex, server="", transport="jobs", op=f"jobs.{verb}",
            requester=requester, identity=identity,
            outcome="ok" if reply.get("ok") else str(error.get("code", "internal")),
            duration_s=round(time.monotonic() - started, 6), worker="core", summary=summary), admin=True)

    # endpoints ---------------------------------------------------------------------------
    async def start_job(self, body: dict[str, Any], requester: str, identity: Identity = OWNER) -> dict[str, Any]:
        asker = Asker(requester, identity)
        replies = self.access.replies_for(asker, self.replies)
        return await self._start(JobRequest.model_validate(body, context=reply_context(replies)), asker)

    async def _visible(self, job: str, asker: Asker) -> JobDefinition:
        """The job's definition, if ``asker`` may see it; else the ``not_found`` of an
        unknown id, so that a user learns nothing of another's jobs."""
        definition = await self.store.definition(job)
        if not self.access.visible(definition, asker.identity):
            raise NotFound(f"no job with id {job}")
        return definition

    async def rerun_job(self, body: dict[str, Any], requester: str, identity: Identity = OWNER) -> dict[str, Any]:
        """The same request again, on every target of a job that has ended, or (``failed``)
        on those whose result was not ``ok``. Each server's command gets a new id: a
        rerun runs again what failed."""
        asker = Asker(requester, identity)
        ask = JobRerun.model_validate(body)
        definition = await self._visible(ask.id, asker)
        if await self.store.summary(ask.id) is None:
            raise InvalidRequest(f"job {ask.id} has not ended; cancel it or wait for it first")
        request = dict(definition.request)
        if request.get("op") == "put" and not ask.dry_run:  # a dry run only lists the servers
            request["put"] = await self._put_content(ask, dict(request["put"]))
        if ask.client_notes is not None:
            request["client_notes"] = ask.client_notes
        command = dict(request.get("exec") or {})
        if REDACTED in (command.get("env") or {}).values() or "stdin_bytes" in command:
            raise InvalidRequest(f"job {ask.id} gave its command environment values or standard input, "
                                 "which jobs do not keep; start it again with them")
        servers = definition.targets
        results = await self.store.results(ask.id)
        if ask.failed:
            ok = {r.server for r in results if r.outcome == "ok"}
            servers = [s for s in definition.targets if s not in ok]
            if not servers:
                raise InvalidRequest(f"every server of job {ask.id} succeeded: nothing to rerun")
        # An abandoned job's unknown servers may have run: their commands keep the ids
        # they had, so the worker answers from its memory (1 h) instead of running again.
        origins = {r.server: definition.command_origins.get(r.server, ask.id)
                   for r in results if r.outcome == "unknown" and r.server in servers}
        if command:
            command.pop("output_subject", None)  # the first requester's, gone with it
            request["exec"] = command
        request.update(selection={"servers": servers}, dry_run=ask.dry_run)
        req = JobRequest.model_validate(request, context=reply_context(self.access.replies_for(asker, self.replies)))
        # A user's rerun is checked against its grants as they are now (in _start).
        return await self._start(req, asker, rerun_of=ask.id, origins=origins)

    async def _put_content(self, ask: JobRerun, put: dict[str, Any]) -> dict[str, Any]:
        """A ``put`` job's content for its rerun: the object the rerun names, else the
        job's own while it exists (the file bucket keeps objects an hour, and ``fleetbus
        put`` deletes its own when the job ends), either holding the job's sha256."""
        name = ask.put_object or put["object"]
        try:
            info = await self.files.info(name)
        except NotFound:
            if ask.put_object:
                raise NotFound(f"no object named {name}: store the content before the rerun") from None
            raise InvalidRequest(
                f"job {ask.id}'s file is gone (an uploaded file is kept an hour at most): put it again, "
                f"or give it again (fleetbus jobs rerun {ask.id} --file PATH)") from None
        try:
            sha256 = base64.urlsafe_b64decode((info.digest or "").removeprefix(OBJ_DIGEST_TYPE)).hex()
        except ValueError:  # no digest, or not one the object store writes
            sha256 = ""
        if sha256 != put["sha256"]:
            raise InvalidRequest(f"object {name} does not hold what job {ask.id} put (its sha256 differs)")
        return {**put, "object": name}

    async def _start(self, req: JobRequest, asker: Asker, rerun_of: str | None = None,
                     origins: dict[str, str] | None = None) -> dict[str, Any]:
        verb = "start" if rerun_of is None else "rerun"
        self.access.check_request(req, asker, verb)
        servers = resolve(req.selection, await self.view.servers())
        # Before a dry run too: the targets it lists would name servers outside the grants.
        routes = self.access.routes(asker, req.op, servers, verb)
        targets = [s.name for s in servers]
        follow = "events" if asker.identity.is_owner else "poll"
        if req.dry_run:
            return {"ok": True, "id": None, "dry_run": True, "targets": targets, "follow": follow}
        requester = asker.requester
        job_id = uuid.uuid4().hex[:16]
        plan = JobPlan(targets, req.plan_options())
        definition = JobDefinition(
            id=job_id, requester=requester, created=utcnow(),
            request=req.kept(), targets=targets,
            max_concurrency=plan.concurrency, max_errors=plan.error_limit, batch=plan.batch_size,
            canary=plan.canary, rerun_of=rerun_of, command_origins=origins or {},
            identity_key=asker.identity.key, identity=asker.identity.record())
        # Kept before the reply: whoever gets the id can `get` the job at once. The run
        # starts meanwhile (its jobs_live write goes out beside this one) and sends no
        # command before this is acknowledged.
        kept = asyncio.ensure_future(self.store.started(definition))
        run = JobRun(self.nc, self.names, self.store,
                     JobSpec(definition=definition, plan=plan, op=req.op, body=req.server_body(),
                             timeout_s=req.timeout_s, deadline_s=req.deadline_s,
                             wait_online_s=req.wait_online_s, grants=routes,
                             on_behalf=self.access.on_behalf(asker.identity)),
                     requester=f"{requester} (job {job_id})", replies=self.requests, leases=self.leases,
                     status=self.registry.status_kv, kept=kept)
        self.running[job_id] = run
        self.metrics.jobs_started.labels(req.op).inc()
        self.metrics.job_targets.observe(len(targets))
        self.metrics.jobs_running.inc()
        run.start().add_done_callback(lambda task: self._ended(run, task))
        await kept
        return {"ok": True, "id": job_id, "targets": targets, "follow": follow,
                "events": self.names.job_events(job_id), "definition": definition.model_dump(mode="json")}

    def _ended(self, run: JobRun, _task: asyncio.Task[None]) -> None:
        self.running.pop(run.id, None)
        self.metrics.jobs_running.dec()
        summary = run.summary
        if summary is None:  # it failed before recording its end; logged by the run
            return
        self.metrics.jobs_finished.labels(run.spec.op, summary.state, summary.stop_reason or "none").inc()
        self.metrics.job_seconds.observe(summary.duration_s)

    async def get_job(self, body: dict[str, Any], requester: str, identity: Identity = OWNER) -> dict[str, Any]:
        asker = Asker(requester, identity)
        job = JobId.model_validate(body).id
        definition = await self._visible(job, asker)
        summary = await self.store.summary(job)
        results = await self.store.results(job)
        counts = summary.counts if summary else await self._live_counts(definition, results)
        return {
            "ok": True, "follow": "events" if asker.identity.is_owner else "poll",
            "job": definition.model_dump(mode="json"),
            "state": summary.state if summary else "running",
            "counts": counts.model_dump(),
            "results": [r.model_dump(mode="json") for r in results],
            "summary": summary.model_dump(mode="json") if summary else None,
        }

    async def _live_counts(self, definition: JobDefinition, results: list[ServerResult] | None = None) -> JobCounts:
        """A running job's counts. This core's own job: its plan's. Another core's: asked
        of that core (a request on the job's ``counts`` event, which only it answers);
        failing that (it is dying, or ended meanwhile), counted from the kept results,
        with the servers ``jobs_live`` lists as maybe running as ``running`` and the
        rest ``pending``."""
        job = definition.id
        run = self.running.get(job)
        if run is not None:
            return run.counts()
        if await self.leases.owner(job) is not None:
            try:
                msg = await self.nc.request(self.names.job_event(job, "counts"), b"", timeout=COUNTS_WAIT_S)
                return JobCounts.model_validate_json(msg.data)
            except (nats.errors.Error, ValidationError):
                pass  # the records say the rest
        if results is None:
            results = await self.store.results(job)
        done = {r.server for r in results}
        running = len(await self.leases.maybe_running(job) - done)
        return count(len(definition.targets), [r.outcome for r in results], running=running,
                     pending=max(0, len(definition.targets) - len(done) - running))

    async def list_jobs(self, body: dict[str, Any], requester: str, identity: Identity = OWNER) -> dict[str, Any]:
        asker = Asker(requester, identity)
        ask = JobList.model_validate(body)
        if ask.before is not None and not identity.is_owner:
            await self._visible(ask.before, asker)  # another user's id is unknown here too

        async def listed(definition: JobDefinition) -> dict[str, Any]:
            summary = await self.store.summary(definition.id)
            counts = summary.counts if summary else await self._live_counts(definition)
            return {
                "id": definition.id, "requester": definition.requester, "identity": definition.identity,
                "created": definition.created.isoformat(), "op": definition.request.get("op"),
                "what": _what(definition.request), "targets": len(definition.targets),
                "state": summary.state if summary else "running",
                "stop_reason": summary.stop_reason if summary else None,
                "counts": counts.model_dump(),
            }

        # Each job's reads at once: one round trip for the page, not one per job, and a
        # dying core's running jobs cost one COUNTS_WAIT_S together, not one each.
        newest = await self._newest(ask.limit, ask.before, asker)
        return {"ok": True, "jobs": list(await asyncio.gather(*(listed(d) for d in newest)))}

    async def _newest(self, limit: int, before: str | None, asker: Asker) -> list[JobDefinition]:
        """The newest ``limit`` jobs ``asker`` may see. A user's are read page after page
        of everyone's until ``limit`` are found or the stream's start is reached: the
        stream is not indexed by starter, so a user with few jobs costs a read of the
        kept jobs (30 days by default)."""
        if asker.identity.is_owner:
            return await self.store.newest(limit, before)
        out: list[JobDefinition] = []
        while len(out) < limit:
            page = await self.store.newest(limit, before)
            out += [d for d in page if self.access.visible(d, asker.identity)]
            if len(page) < limit:
                break
            before = page[-1].id
        return out[:limit]

    async def cancel_job(self, body: dict[str, Any], requester: str, identity: Identity = OWNER) -> dict[str, Any]:
        asker = Asker(requester, identity)
        job = JobId.model_validate(body).id
        run = self.running.get(job)
        if run is None:
            await self._visible(job, asker)  # NotFound for an unknown id, or another user's job
        elif not self.access.visible(run.spec.definition, asker.identity):
            raise NotFound(f"no job with id {job}")
        if run is not None and not run.spec.plan.done:  # done: only recording its end is left
            run.cancel()
            return {"ok": True, "id": job, "cancelled": True, "state": "running"}
        summary = await self.store.summary(job)
        if summary is None and run is None and await self.leases.owner(job) is not None:
            # Another live core runs it.
            await self.nc.publish(self.names.job_event(job, "cancelling"), b"{}")
            return {"ok": True, "id": job, "cancelled": True, "state": "running"}
        return {"ok": True, "id": job, "cancelled": False,
                "state": summary.state if summary else "running"}


def _what(request: dict[str, Any]) -> str:
    """A job's operation in a few words, for lists."""
    command = request.get("exec") or {}
    if command.get("shell") is not None:
        text = str(command["shell"])
    elif command.get("argv"):
        text = " ".join(str(a) for a in command["argv"])
    elif (request.get("put") or request.get("get") or {}).get("path"):
        text = f"{request['op']} {(request.get('put') or request.get('get'))['path']}"
    else:
        text = str(request.get("op"))
    return shorten(text, 80)

