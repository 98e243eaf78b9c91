"""At-most-once execution for retried commands, shared by every worker through NATS KV.

A request that carries an ``id`` claims the key ``<server>.<op>.<id>`` with a KV
*create*, which only one writer can win: the winner runs the command and stores its
reply; a retry that arrives later (at any worker in the queue group) gets the stored
reply, or waits for the running one to finish. The claim records a fingerprint of the
request (its validated, canonical form: ``10`` and ``10.0``, key order and omitted
defaults do not make another command), so an id reused for a different request is
refused instead of answered with another command's reply. Keys expire with the bucket's
TTL (one hour).

The claim is a lease: it names the worker holding it (its key in the workers bucket,
leases.py), and that key lives only while the worker renews it. A claim still
``running`` whose worker's key has expired is ``lost``: the worker died while running
it, and whether the process ran is unknown. Retries get the ``lost`` error (never a
second run); the stored reply replaces that answer if the worker was only paused and
comes back to finish.

A command that never reached the server (refused or cancelled while waiting for a slot,
its session never opened) has its claim dropped (:meth:`CommandMemory.forget`) rather
than its reply stored: a retry then runs it, and a retry already waiting on the claim
is told (``dropped``) and claims it again.

Every call retries transient JetStream errors (jsretry.py). A create whose first
attempt was stored but whose answer was lost is recognized by the claim's token on the
next attempt, so it is still ours to run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import nats.errors
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel

from .jsretry import retry_js
from .leases import alive
from .records import utcnow

#: How often a request waiting on another's claim looks at the claim and its holder's
#: lease besides watching the key (a watch can miss updates across a NATS node loss).
CHECK_EVERY_S = 1.0
#: How long a stored reply's write is retried after the reply was sent: the requester
#: is not waiting for it, and until it is stored a retry waits on the claim.
FINISH_WINDOW_S = 30.0


@dataclass(frozen=True)
class Claim:
    """``run``: ours to run; ``replay``: done, here is its reply; ``running``: another
    request holds it; ``lost``: the worker holding it died before storing a reply;
    ``conflict``: the id was used for another body; ``dropped``: there is no claim
    (its holder let it go without running, or none was made yet: claim it); ``timeout``
    (only from :meth:`CommandMemory.wait`): still running when the wait ended."""

    outcome: Literal["run", "replay", "running", "lost", "conflict", "dropped", "timeout"]
    reply: dict[str, Any] | None = None


def fingerprint(req: BaseModel) -> str:
    """A stable digest of a validated request, ignoring the id and where output goes.

    Taken from the model, not the JSON a requester wrote: every field with its parsed
    value (``timeout_s`` 10 and 10.0 are one float, a mode "0644" and 420 one integer,
    an omitted default is the default), keys sorted.
    """
    core = req.model_dump(mode="json", exclude={"id", "output_subject"})
    stream = core.get("stream")
    if isinstance(stream, dict):
        # Each attempt streams from a fresh inbox; it is still the same put.
        core["stream"] = {k: v for k, v in stream.items() if k != "subject"}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CommandMemory:
    """Claims, stored replies and waits on the commands KV bucket.

    ``workers`` is the workers bucket (leases.py) and ``lease`` this process's key in it;
    a process that only reads claims (the client) passes neither."""

    def __init__(self, kv: KeyValue, workers: KeyValue | None = None, lease: str = "") -> None:
        self.kv = kv
        self.workers = workers
        self.lease = lease

    @staticmethod
    def key(server: str, op: str, command_id: str) -> str:
        return f"{server}.{op}.{command_id}"

    async def claim(self, server: str, op: str, command_id: str, body_fp: str) -> Claim:
        key = self.key(server, op, command_id)
        token = os.urandom(8).hex()
        record = json.dumps({"state": "running", "fp": body_fp, "since": utcnow().isoformat(),
                             "worker": self.lease, "token": token}).encode()

        async def create() -> bool:
            try:
                await self.kv.create(key, record)
            except KeyWrongLastSequenceError:
                return False
            return True

        what = f"claiming command {command_id}"
        if await retry_js(create, what):
            return Claim("run")
        stored = await retry_js(lambda: self._load(key), what)
        if stored is not None and stored.get("token") == token:
            return Claim("run")  # our first attempt was stored; its answer was lost
        return await self.settle(stored, body_fp)

    async def settle(self, stored: dict[str, Any] | None, body_fp: str | None) -> Claim:
        """What a claim record read from the bucket means to a request with ``body_fp``
        (None: any body): ``conflict``, ``replay``, ``lost``, ``running`` or, for no
        record, ``dropped``."""
        if stored is None:
            return Claim("dropped")
        if body_fp is not None and stored.get("fp") not in (None, body_fp):
            return Claim("conflict")
        if stored.get("state") == "done":
            return Claim("replay", stored.get("reply"))
        holder = stored.get("worker")
        if holder and self.workers is not None and not await alive(self.workers, holder):
            return Claim("lost")
        return Claim("running")

    async def finish(self, server: str, op: str, command_id: str, body_fp: str,
                     reply: dict[str, Any]) -> None:
        body = json.dumps({"state": "done", "fp": body_fp, "reply": reply}).encode()
        key = self.key(server, op, command_id)
        await retry_js(lambda: self.kv.put(key, body), f"storing the reply of command {command_id}",
                       window_s=FINISH_WINDOW_S)

    async def forget(self, server: str, op: str, command_id: str) -> None:
        key = self.key(server, op, command_id)

        async def delete() -> None:
            try:
                await self.kv.delete(key)
            except KVNotFound:
                pass

        await retry_js(delete, f"dropping the claim of command {command_id}", window_s=FINISH_WINDOW_S)

    async def load(self, server: str, op: str, command_id: str) -> dict[str, Any] | None:
        """The claim record of a command, None when there is none."""
        key = self.key(server, op, command_id)
        return await retry_js(lambda: self._load(key), f"reading command {command_id}")

    async def wait(self, server: str, op: str, command_id: str, timeout: float) -> Claim:
        """How a command another request holds ended: ``replay`` with its reply once it is
        done, ``lost`` once its worker's lease expired, ``dropped`` if its claim went
        without a reply (claim it again), or ``timeout`` after ``timeout`` s."""
        key = self.key(server, op, command_id)
        watcher = await retry_js(lambda: self.kv.watch(key), f"watching command {command_id}")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        entry = await watcher.updates(timeout=CHECK_EVERY_S)
                    except nats.errors.TimeoutError:
                        # Quiet for a while: read the claim and its holder's lease.
                        claim = await self.settle(await self.load(server, op, command_id), None)
                        if claim.outcome != "running":
                            return claim
                        continue
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
            try:
                await watcher.stop()
            except Exception:
                pass  # a watch on a dead node: nothing left to stop

    async def _load(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(key)
        except KVNotFound:
            return None
        return json.loads(entry.value) if entry.value else None
