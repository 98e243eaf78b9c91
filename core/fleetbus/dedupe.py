"""At-most-once execution for retried commands, shared by every worker through NATS KV.

A request that carries an ``id`` claims the key ``<server>.<op>.<id>`` with a KV
*create*, which only one writer can win: the winner runs the command and stores its
reply; a retry that arrives later (at any worker in the queue group) gets the stored
reply, or waits for the running one to finish. The claim records a fingerprint of the
request body, so an id reused for a different request is refused instead of answered
with another command's reply. Keys expire with the bucket's TTL (one hour).

A command that never reached the server (refused or cancelled while waiting for a slot,
its session never opened) has its claim dropped (:meth:`CommandMemory.forget`) rather
than its reply stored: a retry then runs it, and a retry already waiting on the claim
is told (``dropped``) and claims it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .records import utcnow


@dataclass(frozen=True)
class Claim:
    """``run``: ours to run; ``replay``: done, here is its reply; ``running``: another
    request holds it; ``conflict``: the id was used for another body; ``dropped`` (only
    from :meth:`CommandMemory.wait`): the holder let it go without running; ``timeout``
    (only from :meth:`CommandMemory.wait`): still running when the wait ended."""

    outcome: Literal["run", "replay", "running", "conflict", "dropped", "timeout"]
    reply: dict[str, Any] | None = None


def fingerprint(body: dict[str, Any]) -> str:
    """A stable digest of a request body, ignoring the id and where output goes."""
    core = {k: v for k, v in body.items() if k not in ("id", "output_subject")}
    stream = core.get("stream")
    if isinstance(stream, dict):
        # Each attempt streams from a fresh inbox; it is still the same put.
        core["stream"] = {k: v for k, v in stream.items() if k != "subject"}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


class CommandMemory:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @staticmethod
    def key(server: str, op: str, command_id: str) -> str:
        return f"{server}.{op}.{command_id}"

    async def claim(self, server: str, op: str, command_id: str, body_fp: str) -> Claim:
        key = self.key(server, op, command_id)
        record = {"state": "running", "fp": body_fp, "since": utcnow().isoformat()}
        try:
            await self.kv.create(key, json.dumps(record).encode())
            return Claim("run")
        except KeyWrongLastSequenceError:
            pass
        stored = await self._load(key)
        if stored is not None and stored.get("fp") not in (None, body_fp):
            return Claim("conflict")
        if stored is not None and stored.get("state") == "done":
            return Claim("replay", stored.get("reply"))
        return Claim("running")

    async def finish(self, server: str, op: str, command_id: str, body_fp: str,
                     reply: dict[str, Any]) -> None:
        body = json.dumps({"state": "done", "fp": body_fp, "reply": reply}).encode()
        await self.kv.put(self.key(server, op, command_id), body)

    async def forget(self, server: str, op: str, command_id: str) -> None:
        try:
            await self.kv.delete(self.key(server, op, command_id))
        except KVNotFound:
            pass

    async def wait(self, server: str, op: str, command_id: str, timeout: float) -> Claim:
        """How a command another request holds ended: ``replay`` with its reply once it is
        done, ``dropped`` if its claim went without a reply (claim it again), or
        ``timeout`` after ``timeout`` s."""
        key = self.key(server, op, command_id)
        watcher = await self.kv.watch(key)
        try:
            async with asyncio.timeout(timeout):
                async for entry in watcher:
                    if entry is None:
                        continue  # the end of the current values
                    if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                        return Claim("dropped")
                    body = json.loads(entry.value)
                    if body.get("state") == "done":
                        return Claim("replay", body.get("reply"))
        except TimeoutError:
            return Claim("timeout")
        finally:
            await watcher.stop()
        return Claim("timeout")

    async def _load(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(key)
        except KVNotFound:
            return None
        return json.loads(entry.value) if entry.value else None
