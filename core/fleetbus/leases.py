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

from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KeyValue

from .errors import ServerOffline
from .jsretry import retry_js

log = logging.getLogger("fleetbus.leases")

#: A worker whose key was not renewed for this long is dead to the others. Long enough
#: to outlast a JetStream leader election (renewals fail for 4-9 s then: jsretry.py),
#: short enough that a crashed worker's commands read ``lost`` within seconds.
WORKER_LEASE_TTL_S = 15.0
WORKER_RENEW_S = 2.0

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.workers.delete(self.key)

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
