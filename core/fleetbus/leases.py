"""Worker liveness, so that a command claimed by a worker that died is known to be lost.

Each worker process that runs commands keeps one key in the ``<prefix>_workers`` KV
bucket, whose TTL is :data:`WORKER_LEASE_TTL_S`, and renews it every
:data:`WORKER_RENEW_S`. A worker that dies (SIGKILL, a crash, its machine gone) stops
renewing and the key expires by itself on the NATS server's clock, so no two machines'
clocks are compared.

A command's claim in ``fleetbus_commands`` names the key of the worker that holds it
(dedupe.py). One renewal per worker, whatever it runs, is cheaper than renewing every
claim: a worker running 1,000 commands still writes one small message every two
seconds, and a claim is written once. Whoever waits on a claim (a retry, the original
caller) asks whether the holder's key still exists.

A worker stopped with SIGSTOP for longer than the TTL looks dead too: its commands read
``lost`` meanwhile; if it resumes and finishes one, the stored reply replaces that
answer (``lost`` says "unknown", never "did not run").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KeyValue

from .cancelling import cancel_and_wait
from .errors import ServerOffline
from .jsretry import retry_js

log = logging.getLogger("fleetbus.leases")

#: A worker whose key was not renewed for this long is dead to the others. Long enough
#: to outlast a JetStream leader election (renewals fail for 4-9 s then: jsretry.py),
#: short enough that a crashed worker's commands read ``lost`` within seconds.
WORKER_LEASE_TTL_S = 15.0
WORKER_RENEW_S = 2.0
#: Seconds a stopping worker waits to delete its lease key (see WorkerLease.stop).
STOP_DELETE_S = 2.0

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_=-]")


def lease_key(worker_id: str) -> str:
    """The KV key of a worker id (``host:pid:suffix`` holds characters keys may not)."""
    return _KEY_UNSAFE.sub("_", worker_id)[:200]


async def alive(workers: KeyValue, key: str) -> bool:
    """Whether the worker with lease ``key`` renewed it within the TTL.

    A JetStream that does not answer counts as alive: "unknown" must never become
    ``lost`` because of a NATS hiccup rather than a dead worker.
    """
    try:
        entry = await retry_js(lambda: workers.get(key), f"reading the lease of worker {key}")
    except KVNotFound:
        return False
    except ServerOffline:
        return True
    return bool(entry.value)


class WorkerLease:
    """This worker's key, renewed while the process lives."""

    def __init__(self, workers: KeyValue, worker_id: str) -> None:
        self.workers = workers
        self.key = lease_key(worker_id)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Write the key once (so no claim of ours is ever seen without it), then renew."""
        await retry_js(self._renew, "writing this worker's lease")
        self._task = asyncio.create_task(self._keep())

    async def stop(self) -> None:
        """Stop renewing and delete the key. Called after the host stopped: a command it
        was still running then was cancelled mid-way, and reading ``lost`` at once is
        the truth about it."""
        await cancel_and_wait([self._task])
        self._task = None
        # Bounded: with NATS unreachable the key expires by its TTL instead, and a stop
        # must not wait out the KV's own timeout for it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.workers.delete(self.key), STOP_DELETE_S)

    async def _renew(self) -> None:
        await self.workers.put(self.key, b"1")

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(WORKER_RENEW_S)
            try:
                await self._renew()
            except Exception as exc:
                # A node loss: the next renewal, two seconds on, still within the TTL.
                log.warning("could not renew this worker's lease: %s", type(exc).__name__)


#: The checks leader's key in the workers bucket (a worker's key never has a dot).
CHECKS_LEADER_KEY = "leader.checks"
#: A leader that could not renew for this long stops acting before its key can expire
#: (WORKER_LEASE_TTL_S, on the NATS server's clock): no two cores lead at once, unless
#: their clocks' rates differ by more than a third.
LEADER_STEP_DOWN_S = WORKER_LEASE_TTL_S * 2 / 3


class LeaderLease:
    """One leader among several processes for a duty (the core's server checks).

    Whoever creates ``key`` in the workers bucket leads and renews it (an update at the
    revision it wrote, so a leader that lost its key cannot take it back by mistake); the
    others try to create it every :data:`WORKER_RENEW_S` and win once it expired. A
    leader stopping cleanly deletes it, so another takes over within one renewal period.
    ``on_elected``/``on_deposed`` start and stop the duty.
    """

    def __init__(self, workers: KeyValue, key: str, holder: str,
                 on_elected: Callable[[], None], on_deposed: Callable[[], Awaitable[None]]) -> None:
        self.workers = workers
        self.key = key
        self.holder = holder
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.revision: int | None = None  # ours while we lead
        self._renewed = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.revision is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if self.leading:
            await self._depose("this core is stopping")
            with contextlib.suppress(Exception):
                await self.workers.delete(self.key)

    async def _keep(self) -> None:
        while True:
            try:
                await self._round()
            except Exception as exc:
                log.warning("%s: lease upkeep failed: %s", self.key, type(exc).__name__)
            await asyncio.sleep(WORKER_RENEW_S)

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        value = self.holder.encode()
        if self.revision is None:
            try:
                self.revision = await self.workers.create(self.key, value)
            except KeyWrongLastSequenceError:
                return  # another leads
            self._renewed = loop.time()
            log.info("%s: %s leads now", self.key, self.holder)
            self.on_elected()
            return
        try:
            self.revision = await self.workers.update(self.key, value, last=self.revision)
            self._renewed = loop.time()
        except KeyWrongLastSequenceError:
            await self._depose("another took the lease (ours expired)")
        except Exception:
            if loop.time() - self._renewed > LEADER_STEP_DOWN_S:
                await self._depose(f"the lease could not be renewed for {LEADER_STEP_DOWN_S:g} s")
            else:
                raise

    async def _depose(self, why: str) -> None:
        self.revision = None
        log.info("%s: %s stops leading: %s", self.key, self.holder, why)
        await self.on_deposed()
