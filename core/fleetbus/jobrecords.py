"""A job's records: its definition, one result per server, its summary; and their stream.

The records *are* the job's events: ``started``, ``result`` and ``finished`` are
published on ``<prefix>.v1.events.jobs.<id>.<kind>`` and the jobs stream
(``FLEETBUS_JOBS``, :func:`fleetbus.jetstream.open_state`) keeps those subjects. So a
follower that reads the stream from its start (the CLI does) misses nothing however
late it subscribes, and ``jobs.get``/``jobs.list`` answer from the same messages after
the fact. ``progress`` events are not kept: they only repeat the results' counts.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, PubAck
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import NotFound
from .records import utcnow
from .subjects import Names

#: Output kept per server and stream in a job's records (the command's reply carries
#: up to 64 KiB; a job of thousands of servers kept 30 days must stay small).
JOB_TAIL_BYTES = 4096
READ_TIMEOUT_S = 5.0
#: How long a record sent with :meth:`JobStore.send` may wait for the stream's
#: acknowledgement (nats-py's ack futures have no timeout of their own).
ACK_TIMEOUT_S = 10.0

ServerOutcome = Literal["ok", "failed", "timeout", "offline", "error", "cancelled", "skipped", "unknown"]
JobState = Literal["running", "succeeded", "failed", "stopped", "cancelled", "abandoned"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobDefinition(_Record):
    """What was asked: kept in the ``started`` record."""

    id: str
    requester: str
    created: datetime
    request: dict[str, Any]
    targets: list[str]
    max_concurrency: int
    max_errors: int | None
    batch: int | None
    canary: int
    rerun_of: str | None = None
    identity_key: str | None = Field(
        default=None, description="Who started it, as NATS authenticated it (subjects.Identity.key): "
                                  "a user sees only its own jobs. None: kept before identities were (the owner).")
    identity: dict[str, Any] | None = Field(default=None, description="Its Identity.record().")
    command_origins: dict[str, str] = Field(
        default_factory=dict,
        description="Servers whose command keeps the id (and FLEETBUS_JOB) of an earlier job: "
                    "a rerun's servers that were unknown in an abandoned job, so none runs twice.")


class ServerResult(_Record):
    """One target's outcome: kept in a ``result`` record."""

    job: str
    server: str
    outcome: ServerOutcome
    command_id: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float | None = None
    error: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""
    data: dict[str, Any] | None = Field(default=None, description="ping/info: the reply's facts")


class JobCounts(_Record):
    total: int
    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0
    unknown: int = 0
    running: int = 0
    waiting: int = Field(default=0, description="offline servers waiting to come online (wait_online_s)")
    pending: int = 0


class JobSummary(_Record):
    """How it ended: kept in the ``finished`` record."""

    job: str
    state: JobState
    stop_reason: Literal["budget", "canary", "cancelled", "deadline"] | None = None
    counts: JobCounts
    finished: datetime = Field(default_factory=utcnow)
    duration_s: float


def count(total: int, outcomes: Iterable[str], running: int = 0, waiting: int = 0, pending: int = 0) -> JobCounts:
    """A job's counts from its servers' outcomes so far (every outcome but ``ok``,
    ``cancelled``, ``skipped`` and ``unknown`` is ``failed``) and what has none yet:
    the one way counts are made, for a running job (:meth:`JobRun.counts`) and an
    ended or abandoned one (from its results)."""
    seen = Counter(outcomes)
    named = ("ok", "cancelled", "skipped", "unknown")
    return JobCounts(total=total, ok=seen["ok"], cancelled=seen["cancelled"], skipped=seen["skipped"],
                     unknown=seen["unknown"], failed=sum(n for o, n in seen.items() if o not in named),
                     running=running, waiting=waiting, pending=pending)


async def acked(ack: asyncio.Future[PubAck]) -> PubAck:
    """The stream's acknowledgement of a record sent with :meth:`JobStore.send`."""
    try:
        return await asyncio.wait_for(ack, ACK_TIMEOUT_S)
    except TimeoutError:
        raise TimeoutError("the jobs stream did not acknowledge a record in time") from None


def tail(text: str | None) -> str:
    """The last :data:`JOB_TAIL_BYTES` of ``text`` (by characters, cut at a character)."""
    text = text or ""
    return text[-JOB_TAIL_BYTES:]


class JobStore:
    """Writes a job's records to the jobs stream and reads them back."""

    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self.js = js
        self.names = names

    async def _put(self, job: str, kind: str, record: _Record) -> None:
        # Acknowledged by the stream before the job goes on: a record that cannot be
        # kept fails loudly rather than leaving `jobs get` with a hole.
        await self.js.publish(self.names.job_event(job, kind), record.model_dump_json().encode(),
                              stream=self.names.jobs_stream)

    async def send(self, job: str, kind: str, record: _Record) -> asyncio.Future[PubAck]:
        """Publish a record without waiting for the stream: the returned future is its
        acknowledgement (await it with :func:`acked`). Records sent one after another
        on this connection are stored in that order, so a ``finished`` sent after its
        ``result`` records is stored after them."""
        return await self.js.publish_async(self.names.job_event(job, kind), record.model_dump_json().encode(),
                                           stream=self.names.jobs_stream)

    async def started(self, definition: JobDefinition) -> None:
        await self._put(definition.id, "started", definition)

    async def result(self, result: ServerResult) -> None:
        await self._put(result.job, "result", result)

    async def finished(self, summary: JobSummary) -> None:
        await self._put(summary.job, "finished", summary)

    # reading ------------------------------------------------------------------------------
    async def _last(self, job: str, kind: str) -> bytes | None:
        try:
            msg = await self.js.get_last_msg(self.names.jobs_stream, self.names.job_event(job, kind))
        except NotFoundError:
            return None
        return msg.data

    async def definition(self, job: str) -> JobDefinition:
        raw = await self._last(job, "started")
        if raw is None:
            raise NotFound(f"no job with id {job}")
        return JobDefinition.model_validate_json(raw)

    async def summary(self, job: str) -> JobSummary | None:
        raw = await self._last(job, "finished")
        return None if raw is None else JobSummary.model_validate_json(raw)

    async def results(self, job: str) -> list[ServerResult]:
        out = []
        for raw in await self._read_all(self.names.job_event(job, "result")):
            try:
                out.append(ServerResult.model_validate_json(raw))
            except ValidationError:
                continue
        return out

    async def newest(self, limit: int, before: str | None = None) -> list[JobDefinition]:
        """Up to ``limit`` kept jobs' definitions, newest first; ``before``: only jobs
        started before that one (the next page). NotFound for an unknown ``before``.

        Read backwards from the stream's end, in windows of sequence numbers that double
        each time; in each window the stream finds the ``started`` records by subject
        (direct gets of the next one), so the cost follows ``limit`` (the last window is
        as large as all before it, so about twice as many records are read at most),
        not the number of jobs kept."""
        stream = self.names.jobs_stream
        subject = self.names.job_event("*", "started")
        state = (await self.js.stream_info(stream)).state
        first, end = state.first_seq, state.last_seq
        if before is not None:
            try:
                end = (await self.js.get_last_msg(stream, self.names.job_event(before, "started"))).seq - 1
            except NotFoundError:
                raise NotFound(f"no job with id {before}") from None
        out: list[JobDefinition] = []
        window = 2 * limit  # a job is at least two records: started and finished
        while end >= first and len(out) < limit:
            start = max(first, end - window + 1)
            found: list[bytes] = []
            seq = start
            while seq <= end:
                try:
                    msg = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
                except NotFoundError:
                    break
                if msg.seq is None or msg.seq > end:
                    break
                found.append(msg.data or b"")
                seq = msg.seq + 1
            for raw in reversed(found):
                try:
                    out.append(JobDefinition.model_validate_json(raw))
                except ValidationError:
                    continue
            end = start - 1
            window *= 2
        return out[:limit]

    async def _read_all(self, subject: str) -> list[bytes]:
        """Every kept message on ``subject`` (wildcards allowed), in stream order."""
        info = await self.js.stream_info(self.names.jobs_stream, subjects_filter=subject)
        expected = sum((info.state.subjects or {}).values())
        if expected == 0:
            return []
        sub = await self.js.subscribe(subject, stream=self.names.jobs_stream, ordered_consumer=True,
                                      deliver_policy=DeliverPolicy.ALL, inactive_threshold=5.0)
        out: list[bytes] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
                except TimeoutError:
                    break
                out.append(msg.data)
                if msg.metadata.num_pending == 0:  # the end, as of this message
                    break
        finally:
            await sub.unsubscribe()
        return out
