"""Reading the audit stream back in tests, by sequence.

An ordered push consumer made while a cluster is still settling after a node loss was
seen to stall past a minute under load (it only notices a gap at its next idle
heartbeat), so the tests read the stream's messages one by one with direct gets: slower
per message, but nothing depends on a consumer surviving the cluster's churn.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError


async def audit_records(nc: NATS, stream: str, subjects: str, wanted: set[str],
                        timeout: float = 60) -> dict[str, list[dict[str, Any]]]:
    """Every record on ``subjects`` (a NATS subject pattern) in ``stream``, by command id;
    read until each ``wanted`` id has one (or ``timeout``), then to the stream's end."""
    js = nc.jetstream(timeout=10)
    found: dict[str, list[dict[str, Any]]] = {}
    seq = 1
    deadline = time.monotonic() + timeout
    while True:
        last = (await js.stream_info(stream)).state.last_seq
        while seq <= last:
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:  # a gap: nothing was stored under that number
                seq += 1
                continue
            seq += 1
            if msg.subject and _matches(subjects, msg.subject) and msg.data:
                record = json.loads(msg.data)
                found.setdefault(record["id"], []).append(record)
        if wanted <= set(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    if want[-1] == ">":
        return len(got) >= len(want) and all(w in ("*", g) for w, g in zip(want[:-1], got))
    return len(got) == len(want) and all(w in ("*", g) for w, g in zip(want, got))
