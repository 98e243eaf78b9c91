"""The audit trail: one JetStream message per command, whoever sent it.

The plugin host writes the record after it has replied, so auditing adds no latency to
the command. Each record is still acknowledged by the stream, and kept until it is: a
record the stream refuses for a moment (503 while a NATS node is lost and the stream
elects a leader) or does not acknowledge within :data:`RESEND_AFTER_S` is sent again,
with backoff, for up to ``ack_timeout_s`` (:data:`ACK_TIMEOUT_S`). Every send of one
record carries the same ``Nats-Msg-Id``, so the stream stores it once even when an
earlier send was stored and only its acknowledgement was lost. A record still not stored
after that is logged as an error with its command id rather than lost silently.

With a spool (auditspool.py; the plugin host has one), a record is also written to the
worker's disk before the reply (:meth:`Auditor.stage`) and leaves it when stored, so a
worker killed before the stream acknowledged its records does not lose them: the next
worker on the same home sends them (:meth:`Auditor.recover`).

The acknowledgements come back on one wildcard inbox read straight from nats-py's read
loop (:class:`~fleetbus.dispatch.ReplyInbox`, as the client's replies do). nats-py's ``publish_async`` would
cost, per record, a random token (a ``getrandom`` call), a future with two callbacks,
a semaphore and a parsed ``PubAck``, and deliver the acknowledgement through a
subscription task: about a tenth of what the worker spends on a ``ping`` through an
agent (bench ping-rate row; docs/performance.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetbus_base.text import shorten
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header
from pydantic import BaseModel, ConfigDict

from .auditspool import AuditSpool, Kept
from .dispatch import ReplyInbox
from .subjects import Names

log = logging.getLogger("fleetbus.audit")

MAX_SUMMARY_CHARS = 1024
# Records sent and not yet acknowledged. Past this the stream is not keeping up: a new
# record waits up to STALL_LIMIT_S for room, then is dropped and logged (nats-py's own
# bound for async publishes is 4,000).
MAX_PENDING = 4000
STALL_LIMIT_S = 5.0
# A record the stream has not stored by then (a lost connection, a stalled stream, a
# leader election that did not end) is logged as not confirmed: the bound on retrying.
ACK_TIMEOUT_S = 30.0
# A send not acknowledged within this is sent again (same Nats-Msg-Id).
RESEND_AFTER_S = 2.0
# The pause before sending again a record the stream refused with a 5xx, doubled each time.
RESEND_FIRST_PAUSE_S = 0.1
RESEND_MAX_PAUSE_S = 1.0
# Skippable records (malformed requests, which never reached a server) are skipped
# while this share of MAX_PENDING is outstanding: the rest is kept for real commands.
SKIP_FROM_SHARE = 0.5
SKIP_REPORT_EVERY_S = 10.0


class AuditIdentity(BaseModel):
    """Who NATS authenticated for a request (subjects.Identity): ``account`` None is the
    owner (fleetbus's own account), else the user's account, ``user`` (a name, or an
    nkey or JWT public key), a JWT user's ``name_tag`` and the user record's ``name``."""

    model_config = ConfigDict(extra="forbid")

    account: str | None = None
    user: str
    name_tag: str | None = None
    #: The user record holding that key (the users bucket), where the worker knew it.
    name: str | None = None
    #: A command fleetbus sent for this user (``jobs``): the user is who asked, not who sent it.
    via: str | None = None


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ts: datetime
    id: str
    server: str
    transport: str
    op: str
    #: As the request declared it (``Fleetbus-Requester``): grants nothing.
    requester: str
    #: As NATS authenticated it; absent only in records written before it existed.
    identity: AuditIdentity | None = None
    outcome: str
    exit_code: int | None = None
    duration_s: float
    worker: str
    summary: str | None = None
    bytes: int | None = None
    replayed: bool = False


def summarize(op: str, body: dict[str, Any]) -> str | None:
    """A short description of what was asked, for humans reading the trail.

    Only the command line or path is kept: stdin, file contents and environment values
    are never written to the trail. Its cost does not grow with the request: a 1 MB
    ``argv`` of refused request is read only as far as the summary goes.
    """
    if op == "exec":
        text = _bounded(body["shell"]) if body.get("shell") is not None else _bounded(body.get("argv"))
    elif op in ("put", "get"):
        text = _bounded(body.get("path"), as_json=False)
    else:
        return None
    return shorten(text, MAX_SUMMARY_CHARS)


def _bounded(value: Any, as_json: bool = True) -> str:
    """``str(value)`` for a string, else its JSON (``str`` if not ``as_json``), cut a
    little past :data:`MAX_SUMMARY_CHARS` without building the rest."""
    if isinstance(value, str):
        return value[: MAX_SUMMARY_CHARS + 1]
    if not as_json and not isinstance(value, list | dict):
        return str(value)[: MAX_SUMMARY_CHARS + 1]
    if type(value) is list and _short_strings(value):
        return _SUMMARY_JSON.encode(value)  # the C encoder: the same text, in one call
    out: list[str] = []
    size = 0
    # The pure-Python iterencode yields piece by piece, so this stops early.
    for piece in _SUMMARY_JSON.iterencode(value):
        out.append(piece)
        size += len(piece)
        if size > MAX_SUMMARY_CHARS:
            break
    return "".join(out)[: MAX_SUMMARY_CHARS + 1]


_SUMMARY_JSON = json.JSONEncoder(default=str)
# The most ASCII JSON one character can become: a non-BMP one is two \uXXXX escapes.
_JSON_CHAR_MAX = 12


def _short_strings(value: list[Any]) -> bool:
    """Whether ``value`` (an argv) is strings whose JSON surely fits in the summary, so
    encoding it whole costs no more than the summary's bound."""
    if len(value) > MAX_SUMMARY_CHARS // 4:
        return False
    size = 0
    for item in value:
        if type(item) is not str:
            return False
        size += len(item) * _JSON_CHAR_MAX + 4  # quotes and ", "
    return size <= MAX_SUMMARY_CHARS


@dataclass(eq=False)
class StagedRecord:
    """One record until the stream stored it: what to send again, and since when."""

    command_id: str
    subject: str
    data: bytes
    msg_id: str
    first: float  # loop time of the first send
    sent: float = 0.0  # loop time of the latest send
    pause: float = RESEND_FIRST_PAUSE_S
    kept: Kept | None = None  # where the spool keeps it until stored


# Built once: json.dumps with any option builds a new encoder per call.
_RECORD_JSON = json.JSONEncoder(separators=(",", ":"))


def encode_record(fields: Mapping[str, Any]) -> bytes:
    """The JSON of an audit record given as the fields of :class:`AuditRecord`.

    What ``AuditRecord(**fields).model_dump_json()`` writes, without building a model
    on every command: the worker fills the fields from its own values.
    """
    out = dict(fields)
    ts = out["ts"]
    if isinstance(ts, datetime):
        out["ts"] = _iso(ts)
    return _RECORD_JSON.encode(out).encode()


def _iso(ts: datetime) -> str:
    # pydantic writes UTC as "Z"; readers get the same text either way.
    return ts.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A command's audit record with the fields known before it ran already encoded.

    The worker prepares it while the command's process runs (it waits for the child
    anyway), so that between the exit and the reply only the outcome's fields are
    encoded (:meth:`Auditor.stage_prepared`). The pieces are the record's own JSON, cut
    where the outcome's fields go, so the joined text is byte for byte what
    :func:`encode_record` writes for the same fields.
    """

    command_id: str
    subject: str
    #: ``"id":…,"server":…,"transport":…,"op":…,"requester":…,"identity":…``
    head: str
    #: ``"worker":…,"summary":…``
    tail: str


# What the encoder writes for a string (ensure_ascii), without a whole encode() per field.
_json_str = json.encoder.encode_basestring_ascii


def _scalar(value: Any) -> str:
    """One field's JSON, as :data:`_RECORD_JSON` writes it, the common types directly."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    kind = type(value)
    if kind is str:
        return _json_str(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)  # what the encoder writes for an int and a finite float
    return _RECORD_JSON.encode(value)


class Auditor:
    """Publishes audit records and checks that the audit stream stored each one."""

    def __init__(self, nc: NATS, names: Names, *, max_pending: int = MAX_PENDING,
                 ack_timeout_s: float = ACK_TIMEOUT_S, stall_limit_s: float = STALL_LIMIT_S,
                 spool: AuditSpool | None = None) -> None:
        self.nc = nc
        self.spool = spool
        self.names = names
        self.max_pending = max_pending
        self.ack_timeout_s = ack_timeout_s
        self.resend_after_s = min(RESEND_AFTER_S, ack_timeout_s)
        self.stall_limit_s = stall_limit_s
        # token -> record; insertion order is sending order.
        self._pending: dict[str, StagedRecord] = {}
        # Refused for a moment, to be sent again after a pause (and still pending).
        self._resending: set[StagedRecord] = set()
        self._resend_tasks: set[asyncio.Task[None]] = set()
        self._msg_ids = (f"{os.urandom(6).hex()}-{n}" for n in itertools.count())
        self._inbox = ReplyInbox(nc, self._on_ack)
        self._room = asyncio.Event()  # set while fewer than max_pending are outstanding
        self._room.set()
        self._drained = asyncio.Event()  # set while none are
        self._drained.set()
        self._expiry: asyncio.TimerHandle | None = None
        self.skipped = 0  # skippable records not sent, since start
        self._skip_reported = (0, -SKIP_REPORT_EVERY_S)  # (skipped, when) at the last log line

    @property
    def pending(self) -> int:
        """Records sent that the stream has not acknowledged yet."""
        return len(self._pending) + len(self._resending)

    async def record(self, rec: AuditRecord | Mapping[str, Any], admin: bool = False,
                     skippable: bool = False) -> None:
        """Publish one record (an :class:`AuditRecord`, or its fields as a mapping).

        Returns once the record is handed to the connection; the stream's answer is
        checked as it arrives. Never raises: a record that cannot be sent or stored is
        logged with its command id. A ``skippable`` record (a malformed request) is not
        sent while the stream lags (half of ``max_pending`` outstanding), and counted
        in :attr:`skipped` and in one log line per interval instead.
        """
        await self.send(self.stage(rec, admin, skippable))

    def stage(self, rec: AuditRecord | Mapping[str, Any], admin: bool = False,
              skippable: bool = False) -> StagedRecord | None:
        """Encode one record and keep it in the spool, before the command's reply; then
        :meth:`send` it. None when it is skipped (see :meth:`record`)."""
        fields = rec.model_dump() if isinstance(rec, AuditRecord) else rec
        if skippable and len(self._pending) >= self.max_pending * SKIP_FROM_SHARE:
            self._skip()
            return None
        # Server names cannot start with "_", so admin records never share a subject with one.
        server = "_admin" if admin else str(fields["server"])
        return self._keep(str(fields["id"]), self.names.audit(server, str(fields["op"])),
                          encode_record(fields))

    def prepare(self, command_id: str, server: str, transport: str, op: str, requester: str,
                identity: Mapping[str, Any], worker: str, summary: str | None) -> PreparedRecord:
        """Encode the fields of a command's record known before it runs (a server
        command's record, never an admin one)."""
        head = (f'"id":{_scalar(command_id)},"server":{_scalar(server)},"transport":{_scalar(transport)},'
                f'"op":{_scalar(op)},"requester":{_scalar(requester)},"identity":{_RECORD_JSON.encode(identity)}')
        tail = f'"worker":{_scalar(worker)},"summary":{_scalar(summary)}'
        return PreparedRecord(command_id, self.names.audit(server, op), head, tail)

    def stage_prepared(self, prepared: PreparedRecord, ts: datetime, outcome: str, exit_code: int | None,
                       duration_s: float, nbytes: int | None, replayed: bool) -> StagedRecord:
        """:meth:`stage` for a record from :meth:`prepare`, given the fields its run decided."""
        data = (f'{{"ts":"{_iso(ts)}",{prepared.head},"outcome":{_scalar(outcome)},'
                f'"exit_code":{_scalar(exit_code)},"duration_s":{_scalar(duration_s)},{prepared.tail},'
                f'"bytes":{_scalar(nbytes)},"replayed":{_scalar(replayed)}}}')
        return self._keep(prepared.command_id, prepared.subject, data.encode())

    def _keep(self, command_id: str, subject: str, data: bytes) -> StagedRecord:
        record = StagedRecord(command_id, subject, data, next(self._msg_ids), asyncio.get_running_loop().time())
        if self.spool is not None:
            record.kept = self.spool.append(record.msg_id, record.subject, record.data)
        return record

    async def send(self, record: StagedRecord | None) -> None:
        """Publish a record from :meth:`stage`. Never raises (see :meth:`record`)."""
        if record is None:
            return
        token = ""
        try:
            if len(self._pending) >= self.max_pending and not await self._wait_for_room():
                log.error("audit record for command %s was not stored: the audit stream is not "
                          "keeping up (%d records unacknowledged)", record.command_id, len(self._pending))
                self._done(record)
                return
            token = await self._send(record)
        except Exception as exc:
            self._settled(token)
            self._done(record)
            log.error("audit record for command %s was not stored: %s", record.command_id, type(exc).__name__)

    async def recover(self) -> int:
        """Send the records a dead process left in the spool's folder; how many."""
        if self.spool is None:
            return 0
        loop = asyncio.get_running_loop()
        found = self.spool.adopt()
        for spooled in found:
            await self.send(StagedRecord(spooled.command_id, spooled.subject, spooled.data, spooled.msg_id,
                                    loop.time(), kept=spooled.kept))
        return len(found)

    def _done(self, record: StagedRecord) -> None:
        """``record`` leaves the spool: stored, refused for good, or its window spent."""
        if self.spool is not None and record.kept is not None:
            self.spool.settle(record.kept)
            record.kept = None

    async def _send(self, record: StagedRecord) -> str:
        token, reply = await self._inbox.reply_to()
        record.sent = asyncio.get_running_loop().time()
        self._pending[token] = record
        self._drained.clear()
        self._arm_expiry()
        await self.nc.publish(record.subject, record.data, reply=reply,
                              headers={"Nats-Msg-Id": record.msg_id})
        return token

    def _again(self, record: StagedRecord, pause: float) -> bool:
        """Send ``record`` again after ``pause`` s if that is within its window; False
        when the window is spent (the caller reports it)."""
        loop = asyncio.get_running_loop()
        if loop.time() + pause - record.first >= self.ack_timeout_s:
            return False
        self._resending.add(record)
        self._drained.clear()

        def resend() -> None:
            task = asyncio.create_task(self._resend(record))
            self._resend_tasks.add(task)
            task.add_done_callback(self._resend_tasks.discard)

        loop.call_later(pause, resend)
        return True

    async def _resend(self, record: StagedRecord) -> None:
        token = ""
        try:
            token = await self._send(record)
        except Exception as exc:
            self._settled(token)
            self._done(record)
            log.error("audit record for command %s was not stored: %s", record.command_id,
                      type(exc).__name__)
        finally:
            self._resending.discard(record)
            self._check_drained()

    def _skip(self) -> None:
        self.skipped += 1
        last, when = self._skip_reported
        now = time.monotonic()
        if now - when >= SKIP_REPORT_EVERY_S:
            log.warning("the audit stream is lagging (%d records unacknowledged): %d records of "
                        "malformed requests were not written (%d since start)",
                        len(self._pending), self.skipped - last, self.skipped)
            self._skip_reported = (self.skipped, now)

    async def close(self, wait_s: float = 1.0) -> None:
        """Give outstanding acknowledgements up to ``wait_s``, then stop listening.

        Records still unacknowledged are logged as not confirmed (not as lost: the
        stream may have stored them)."""
        if self._pending and self.nc.is_connected:
            try:
                async with asyncio.timeout(wait_s):
                    await self._drained.wait()
            except TimeoutError:
                pass
        unconfirmed = self.pending
        if unconfirmed:
            log.warning("%d audit records were sent but not confirmed by the audit stream "
                        "before shutdown%s", unconfirmed,
                        "; they stay in the spool for the next start" if self.spool else "")
            self._pending.clear()
            self._resending.clear()
        if self.spool is not None:
            self.spool.close(keep=unconfirmed > 0)
        for task in self._resend_tasks:
            task.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        await self._inbox.close()

    async def _wait_for_room(self) -> bool:
        try:
            async with asyncio.timeout(self.stall_limit_s):
                while len(self._pending) >= self.max_pending:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            return False
        return True

    def _settled(self, token: str) -> StagedRecord | None:
        entry = self._pending.pop(token, None)
        if len(self._pending) < self.max_pending:
            self._room.set()
        self._check_drained()
        return entry

    def _check_drained(self) -> None:
        if not self._pending and not self._resending:
            self._drained.set()

    def _on_ack(self, token: str, msg: Msg) -> None:
        record = self._pending.get(token)
        if record is None:
            return  # already reported as not confirmed, or sent again
        problem, transient = _refusal(msg)
        if problem is not None and transient:
            # Kept pending while it waits: close() and the bound on pending count it.
            self._resending.add(record)
            self._settled(token)
            self._resending.discard(record)
            if self._again(record, record.pause):
                record.pause = min(record.pause * 2, RESEND_MAX_PAUSE_S)
                return
            self._check_drained()
        else:
            self._settled(token)
        self._done(record)
        if problem is not None:
            log.error("audit record for command %s was not stored: %s", record.command_id, problem)

    def _arm_expiry(self) -> None:
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self.resend_after_s, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = asyncio.get_running_loop().time()
        late = 0
        while self._pending:
            token, record = next(iter(self._pending.items()))
            wait = record.sent + self.resend_after_s - now
            if wait > 0:
                self._expiry = asyncio.get_running_loop().call_later(wait, self._expire)
                break
            # Unanswered: sent again at once while its window lasts (the same message id,
            # so a send that was stored and only lost its answer is not stored twice).
            self._resending.add(record)
            self._settled(token)
            self._resending.discard(record)
            if self._again(record, 0.0):
                continue
            self._check_drained()
            self._done(record)
            late += 1
            if late <= 10:  # a stall makes thousands; the first ones and a count say enough
                log.error("audit record for command %s was not confirmed by the audit stream "
                          "within %g s", record.command_id, self.ack_timeout_s)
        if late > 10:
            log.error("%d more audit records were not confirmed within %g s", late - 10, self.ack_timeout_s)


def _refusal(msg: Msg) -> tuple[str | None, bool]:
    """Why the stream did not store a record, from its answer (None when it did), and
    whether that may pass (a 5xx: no stream leader for now, JetStream unavailable)."""
    status = msg.headers.get(Header.STATUS) if msg.headers else None
    if status:
        # 503: no stream holds the subject now (a leader election, or JetStream down).
        assert msg.headers is not None
        return f"status {status} {msg.headers.get(Header.DESCRIPTION, '')}".strip(), status.startswith("5")
    if b'"error"' not in msg.data:  # a stored record's answer is {"stream":..,"seq":..}
        return None, False
    try:
        error = json.loads(msg.data).get("error")
    except (ValueError, AttributeError):
        return "unreadable answer from the audit stream", False
    if not error:
        return None, False
    code = error.get("code", "?")
    transient = isinstance(code, int) and code >= 500
    return f"stream error {code}: {str(error.get('description', ''))[:200]}", transient
