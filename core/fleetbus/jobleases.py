"""Which core runs which job, so that a job whose core died is found and marked ``abandoned``.

Two key-value buckets (:func:`fleetbus.jetstream.open_state`):

- ``<b>_job_cores``, with a TTL of :data:`CORE_LEASE_TTL_S`: one key per running core,
  renewed every :data:`CORE_RENEW_S`. A core that dies stops renewing it, and the key
  expires by itself.
- ``<b>_jobs_live``, no TTL: one key per running job: the core running it and the
  servers whose commands may have been sent and have no result yet. It is written
  *before* those commands are sent and deleted once the job's end is recorded, so it
  never lists less than what may be running.

Every core sweeps ``<b>_jobs_live`` at start and every :data:`SWEEP_S`: a job whose core
has no lease is abandoned. The sweeper first claims the key (an update at the revision
it read, so of two cores only one wins; the key then names it in ``abandoned_by``), then
has the job's end recorded (servers listed: ``unknown``, never re-run automatically;
the rest without a result: ``skipped``), then deletes the key. A claim whose marking
failed is tried again on the next pass, by the claimer or, if it died too, by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable

from nats.js.errors import KeyWrongLastSequenceError, NoKeysError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KeyValue

log = logging.getLogger("fleetbus.jobs")

CORE_LEASE_TTL_S = 15.0
CORE_RENEW_S = 5.0
SWEEP_S = 10.0

Abandon = Callable[[str, list[str]], Awaitable[None]]


class JobLeases:
    """This core's lease, its running jobs' keys, and the sweep for abandoned jobs."""

    def __init__(self, cores: KeyValue, live: KeyValue, on_abandoned: Abandon) -> None:
        self.cores = cores
        self.live = live
        self.on_abandoned = on_abandoned
        self.core_id = uuid.uuid4().hex[:16]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._renew()  # before sweeping: never find ourselves dead
        self._tasks = [asyncio.create_task(self._every(CORE_RENEW_S, self._renew)),
                       asyncio.create_task(self._every(SWEEP_S, self.sweep, first=True))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.cores.delete(self.core_id)  # stopped, not dead: nothing of ours is left running

    async def running(self, job: str, servers: set[str]) -> None:
        """Record, before sending them, which of ``job``'s commands may be running."""
        value = {"core": self.core_id, "running": sorted(servers)}
        await self.live.put(job, json.dumps(value).encode())

    async def ended(self, job: str) -> None:
        with contextlib.suppress(KVNotFound):
            await self.live.delete(job)

    async def owner(self, job: str) -> str | None:
        """The id of the live core running ``job``, or None (none, or its core died)."""
        try:
            entry = await self.live.get(job)
            core = str(json.loads(entry.value or b"{}")["core"])
        except (KVNotFound, ValueError, KeyError, TypeError):
            return None
        return core if core == self.core_id or await self._alive(core) else None

    async def maybe_running(self, job: str) -> set[str]:
        """The servers of ``job`` whose commands may be running (sent, no result stored)."""
        try:
            entry = await self.live.get(job)
            return {str(s) for s in json.loads(entry.value or b"{}").get("running", [])}
        except (KVNotFound, ValueError, AttributeError, TypeError):
            return set()

    async def sweep(self) -> None:
        """Mark every job whose core has no lease abandoned.

        A job is claimed before it is marked: its key keeps the dead ``core`` and gains
        ``abandoned_by`` (the claimer). If marking fails midway (the stream refused a
        record), the key stays claimed and the next pass tries again: this core's own
        claims, and those of a claimer that died too. Marking is idempotent (what is
        already recorded is not recorded twice), so trying again is safe."""
        try:
            jobs = await self.live.keys()
        except NoKeysError:
            return
        for job in jobs:
            try:
                entry = await self.live.get(job)
            except KVNotFound:
                continue
            if entry.value is None:
                continue
            try:
                record = json.loads(entry.value)
                owner = str(record["core"])
                servers = [str(s) for s in record.get("running", [])]
                claimer = record.get("abandoned_by")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if claimer is None and (owner == self.core_id or await self._alive(owner)):
                continue  # running
            if claimer is not None and claimer != self.core_id and await self._alive(str(claimer)):
                continue  # another live core is marking it
            if claimer != self.core_id:
                claimed = {"core": owner, "running": servers, "abandoned_by": self.core_id}
                try:
                    await self.live.update(job, json.dumps(claimed).encode(), last=entry.revision)
                except KeyWrongLastSequenceError:
                    continue  # another core claimed it, or its core wrote again: not dead after all
            log.warning("job %s was abandoned by core %s; marking it", job, owner)
            try:
                await self.on_abandoned(job, servers)
                await self.ended(job)
            except Exception:
                # Still claimed by this core: the next pass tries again; other jobs go on.
                log.exception("job %s: could not mark it abandoned yet", job)

    async def _alive(self, core: str) -> bool:
        try:
            entry = await self.cores.get(core)
        except KVNotFound:
            return False
        return entry.value is not None

    async def _renew(self) -> None:
        await self.cores.put(self.core_id, b"{}")

    @staticmethod
    async def _every(seconds: float, action: Callable[[], Awaitable[None]], first: bool = False) -> None:
        if not first:
            await asyncio.sleep(seconds)
        while True:
            try:
                await action()
            except Exception:
                # A JetStream hiccup must not end the lease or the sweep for good.
                log.exception("job lease upkeep failed")
            await asyncio.sleep(seconds)
