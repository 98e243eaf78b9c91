"""The audit trail: one JetStream message per command, whoever sent it.

The plugin host writes the record after it has replied, so auditing adds no latency to
the command; it is still a JetStream publish with an acknowledgement, so a record that
cannot be stored is logged as an error rather than lost silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict

from .subjects import Names

log = logging.getLogger("fleetbus.audit")

MAX_SUMMARY_CHARS = 1024
# nats-py allows 4,000 unacknowledged async publishes by default.
STALL_CHECK_FROM = 3000
STALL_LIMIT_S = 5.0


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ts: datetime
    id: str
    server: str
    transport: str
    op: str
    requester: str
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
    are never written to the trail.
    """
    if op == "exec":
        if body.get("shell") is not None:
            text = str(body["shell"])
        else:
            text = json.dumps(body.get("argv"))
    elif op in ("put", "get"):
        text = str(body.get("path"))
    else:
        return None
    return text if len(text) <= MAX_SUMMARY_CHARS else text[: MAX_SUMMARY_CHARS - 3] + "..."


class Auditor:
    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self.js = js
        self.names = names

    async def record(self, rec: AuditRecord, admin: bool = False) -> None:
        # Server names cannot start with "_", so admin records never share a subject with one.
        subject = self.names.audit("_admin", rec.op) if admin else self.names.audit(rec.server, rec.op)
        # Acknowledged asynchronously: commands do not wait for the audit stream, but a
        # record the stream did not take is still logged.
        # nats-py bounds unacknowledged publishes with a semaphore, and a stall limit makes it
        # wrap the acquire in a task. Below the bound the acquire cannot wait, so the limit
        # is only passed when the stream is falling behind.
        stall = None if self.js.publish_async_pending() < STALL_CHECK_FROM else STALL_LIMIT_S
        try:
            ack = await self.js.publish_async(subject, rec.model_dump_json().encode(), wait_stall=stall)
        except Exception as exc:
            log.error("audit record for command %s was not stored: %s", rec.id, type(exc).__name__)
            return
        ack.add_done_callback(lambda fut: self._check(fut, rec.id))

    @staticmethod
    def _check(fut: asyncio.Future[object], command_id: str) -> None:
        if fut.cancelled() or fut.exception() is not None:
            log.error("audit record for command %s was not stored", command_id)
