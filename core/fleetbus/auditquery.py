"""Reading the audit trail back: the ``audit.query`` admin endpoint (docs/bus-api.md).

The records are the audit stream's messages (audit.py), one subject per server and
operation (``<p>.v1.audit.<server>.<op>``, admin changes under ``_admin``), so the server
and operation filters become the consumer's subject filter and nats-server does that
narrowing; the user, outcome and time filters are read here, record by record.

Each pass reads a range of the stream with an ephemeral pull consumer (no acks, in
memory, deleted when the pass ends, and by the server after a few idle seconds if this
process dies first). A query holds at most ``limit`` records and reads at most
:data:`SCAN_LIMIT` messages, within :data:`QUERY_TIME_S`; a reply stopped by either
says ``truncated: true`` and where to go on (``next``). Two directions:

- **forward**, with ``after_seq`` or ``since``: the first ``limit`` matches after that
  point, and ``next.after_seq`` to read on;
- **backward** otherwise: the last ``limit`` matches before ``before_seq`` (the stream's
  end by default), read as windows of growing size going back, each read forward (JetStream
  has no reverse consumer), and ``next.before_seq`` for the page before.

Records are returned oldest first, each with its stream sequence ``seq``. They hold no
secret (audit.py keeps only command lines and paths), and nothing is added here.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidRequest, NotFound
from .names import check_server_name
from .records import utcnow
from .subjects import Names
from .users import parse_duration

#: The most records one reply holds.
MAX_LIMIT = 1000
#: The most stream messages one query reads (matching or not): the bound on its work.
SCAN_LIMIT = 10_000
#: The most time one query reads for: under the client's 10 s default wait.
QUERY_TIME_S = 5.0
#: The most record JSON one reply holds: under a shared NATS's default 1 MiB max_payload.
REPLY_BUDGET_BYTES = 768 * 1024
#: Messages asked for at once.
FETCH_BATCH = 256
#: A backward query's first window, in stream sequences (it doubles as it goes back).
FIRST_WINDOW = 512
#: The most windows a backward query reads (the last spans ~2^24 sequences).
MAX_WINDOWS = 16
#: The server drops a consumer this long idle: a dead core's passes do not linger.
CONSUMER_IDLE_S = 10.0
#: The server filter for admin changes (audit.py writes them under this token).
ADMIN_SERVER = "_admin"
_OP_RE = re.compile(r"^[a-z0-9_-]{1,32}(\.[a-z0-9_-]{1,32}){0,3}$")


class AuditQuery(BaseModel):
    """The body of ``audit.query``."""

    model_config = ConfigDict(extra="forbid")

    server: str | None = Field(default=None, description="A server name, _admin or *.")
    op: str | None = Field(default=None, description="exec, put, ...; users.add, ... under _admin.")
    user: str | None = Field(default=None, max_length=128,
                             description="The identity's name or key, or the declared requester.")
    outcome: str | None = Field(default=None, max_length=64, description="ok or an error code.")
    since: str | None = Field(default=None, max_length=64, description="RFC 3339 or a duration: 1h, 2d.")
    until: str | None = Field(default=None, max_length=64, description="RFC 3339 or a duration ago.")
    limit: int = Field(default=100, ge=1, le=MAX_LIMIT)
    after_seq: int | None = Field(default=None, ge=0)
    before_seq: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_direction(self) -> AuditQuery:
        if self.after_seq is not None and self.before_seq is not None:
            raise ValueError("give after_seq or before_seq, not both")
        if self.server not in (None, "*", ADMIN_SERVER):
            check_server_name(self.server)
        if self.op is not None and not _OP_RE.fullmatch(self.op):
            raise ValueError(f"invalid op {self.op[:64]!r}")
        return self


def parse_when(text: str, now: datetime) -> datetime:
    """RFC 3339 (with its offset), or a duration before ``now`` (``1h``, ``2d``)."""
    if text[-1:].isalpha() and text[:1].isdigit() and ":" not in text:
        return now - parse_duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{text[:64]!r} is neither RFC 3339 nor a duration like 1h or 2d") from None
    if when.tzinfo is None:
        raise InvalidRequest(f"{text[:64]!r} has no UTC offset: add Z or +01:00")
    return when


@dataclass
class _Filter:
    """The filters read here (the server and op ones are the subject's)."""

    user: str | None
    outcome: str | None
    since: datetime | None
    until: datetime | None

    def matches(self, record: dict[str, Any], stored: datetime) -> bool:
        if self.since is not None and stored < self.since:
            return False
        if self.until is not None and stored > self.until:
            return False
        if self.outcome is not None and record.get("outcome") != self.outcome:
            return False
        if self.user is not None:
            identity = record.get("identity") or {}
            if self.user not in (identity.get("name"), identity.get("user"), record.get("requester")):
                return False
        return True


@dataclass
class _Scan:
    """One query's budget: messages read and time left."""

    deadline: float
    scanned: int = 0
    stopped: bool = False  # the budget ran out before the query was done

    def left(self) -> int:
        """Messages this query may still read; 0 (and ``stopped``) once time or count is spent."""
        if time.monotonic() >= self.deadline or self.scanned >= SCAN_LIMIT:
            self.stopped = True
            return 0
        return SCAN_LIMIT - self.scanned


@dataclass
class _Found:
    """One message read: its sequence, when the stream stored it, the record (empty
    when unreadable) and what it adds to the reply."""

    seq: int
    stored: datetime
    record: dict[str, Any]
    size: int = 0


class AuditReader:
    """Answers ``audit.query`` from the audit stream."""

    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self.js = js
        self.names = names

    def subject(self, query: AuditQuery) -> str:
        """The consumer's subject filter: nats-server drops other servers and ops."""
        server = query.server or "*"
        # Admin endpoints have a dot in them (users.add): without an op, `>` takes them too.
        return self.names.audit(server, query.op or ">")

    async def query(self, query: AuditQuery) -> dict[str, Any]:
        """The reply of ``audit.query``: ``records`` oldest first, ``next``, ``truncated``."""
        now = utcnow()
        since = parse_when(query.since, now) if query.since else None
        until = parse_when(query.until, now) if query.until else None
        wanted = _Filter(query.user, query.outcome, since, until)
        scan = _Scan(time.monotonic() + QUERY_TIME_S)
        if query.after_seq is not None or (since is not None and query.before_seq is None):
            found, nxt, read_to = await self._forward(query, wanted, since, scan)
        else:
            found, nxt, read_to = await self._backward(query, wanted, scan)
        return {"ok": True, "records": [{"seq": f.seq, **f.record} for f in found], "next": nxt,
                "truncated": scan.stopped, "scanned": scan.scanned, "read_to": read_to}

    async def _last_seq(self) -> tuple[int, int]:
        """The audit stream's first and last sequence now."""
        try:
            info = await self.js.stream_info(self.names.audit_stream)
        except NotFoundError:
            raise NotFound(f"no audit stream {self.names.audit_stream}") from None
        return max(info.state.first_seq, 1), info.state.last_seq

    async def _forward(self, query: AuditQuery, wanted: _Filter, since: datetime | None,
                       scan: _Scan) -> tuple[list[_Found], dict[str, int] | None, int]:
        if query.after_seq is not None:
            start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                   opt_start_seq=query.after_seq + 1)
        else:
            start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        # Taken before the pass, which then reads at least to it: a pass that reaches the
        # end has seen everything up to here (what `read_to` says, for following on).
        _, end = await self._last_seq()
        found: list[_Found] = []
        size = 0
        last = query.after_seq or 0
        more = past_until = False
        async with aclosing(self._read(query, start, None, scan)) as items:
            async for item in items:
                if wanted.until is not None and item.stored > wanted.until:
                    past_until = True
                    break  # the stream is in time order: nothing later can match
                if item.record and wanted.matches(item.record, item.stored):
                    if len(found) == query.limit or size + item.size > REPLY_BUDGET_BYTES:
                        more = True
                        break
                    found.append(item)
                    size += item.size
                last = item.seq
        if past_until:  # nothing more to page to, and read only to here
            return found, None, last
        if more or scan.stopped:
            return found, {"after_seq": last}, last
        return found, None, max(last, end)

    async def _backward(self, query: AuditQuery, wanted: _Filter,
                        scan: _Scan) -> tuple[list[_Found], dict[str, int] | None, int]:
        first, last = await self._last_seq()
        upper = min(query.before_seq or last + 1, last + 1)
        read_to = upper - 1
        found: deque[_Found] = deque()
        window = FIRST_WINDOW
        earlier = False  # a match before the oldest kept was seen
        for _ in range(MAX_WINDOWS):
            if upper <= first or len(found) == query.limit:
                break
            budget = scan.left()
            if budget <= 0:
                break
            # A window no longer than the budget cannot overrun it however many match.
            start = max(first, upper - min(window, budget))
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
            kept: deque[_Found] = deque(maxlen=query.limit - len(found))
            reached_since = False
            async with aclosing(self._read(query, config, upper, scan)) as items:
                async for item in items:
                    if wanted.since is not None and item.stored < wanted.since:
                        reached_since = True
                    if item.record and wanted.matches(item.record, item.stored):
                        earlier = earlier or len(kept) == kept.maxlen
                        kept.append(item)
            if scan.stopped:
                break  # out of time mid-window: only the later windows' records are whole
            found.extendleft(reversed(kept))
            upper = first if reached_since else start  # before since, nothing can match
            window *= 2
        else:
            scan.stopped = upper > first and len(found) < query.limit
        records = list(found)
        size = sum(f.size for f in records)
        while records and size > REPLY_BUDGET_BYTES:  # the newest are kept
            size -= records.pop(0).size
            earlier = True
        if scan.stopped:  # nothing below upper was read whole
            return records, ({"before_seq": upper} if upper > first else None), read_to
        if records and (earlier or upper > first):
            return records, {"before_seq": records[0].seq}, read_to
        return records, None, read_to

    async def _read(self, query: AuditQuery, config: ConsumerConfig, upper: int | None,
                    scan: _Scan) -> AsyncIterator[_Found]:
        """Each message from ``config``'s start up to ``upper`` (excluded) or the
        stream's end, as :class:`_Found` (``record`` empty when unreadable); it stops
        early, with ``scan.stopped`` set, when the query's budget is spent."""
        config.ack_policy = AckPolicy.NONE
        config.filter_subject = self.subject(query)
        config.inactive_threshold = CONSUMER_IDLE_S
        config.mem_storage = True
        config.num_replicas = 1
        stream = self.names.audit_stream
        try:
            info = await self.js.add_consumer(stream, config)
        except NotFoundError:
            raise NotFound(f"no audit stream {stream}") from None
        psub = await self.js.pull_subscribe_bind(consumer=info.name, stream=stream)
        try:
            pending = info.num_pending
            while pending > 0:
                left = scan.left()
                if left <= 0:
                    scan.stopped = True
                    return
                wait = max(0.1, min(2.0, scan.deadline - time.monotonic()))
                try:
                    msgs = await psub.fetch(min(FETCH_BATCH, pending, left), timeout=wait)
                except TimeoutError:
                    continue  # scan.left() ends it once the time is spent
                for msg in msgs:
                    meta = msg.metadata
                    pending = meta.num_pending
                    if upper is not None and meta.sequence.stream >= upper:
                        return
                    scan.scanned += 1
                    yield _decode(msg, meta.sequence.stream, meta.timestamp)
        finally:
            await _quietly((psub.unsubscribe(), self.js.delete_consumer(stream, info.name)))


def _decode(msg: Msg, seq: int, stored: datetime) -> _Found:
    try:
        record = json.loads(msg.data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return _Found(seq, stored, {}, 0)
    return _Found(seq, stored, record, len(msg.data) + 16)


async def _quietly(steps: Iterable[Any]) -> None:
    """Tidying after a pass: the consumer expires by itself if this fails."""
    for step in steps:
        try:
            await step
        except Exception:
            pass
