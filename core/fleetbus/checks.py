"""Server checks: the core pings every registered server through its own transport.

Each round pings every server over the bus (so the check covers NATS, the worker or
gateway, and the server itself), records state, last check and latency in the status
bucket, publishes ``<prefix>.v1.events.servers.<name>.online|offline`` when the state
changes, and sets the ``fleetbus_server_up`` and check-latency gauges. Checks run with
bounded concurrency so a large fleet does not flood the workers.

With several cores, one runs the checks: the leader of the ``leader.checks`` lease
(:class:`fleetbus.leases.LeaderLease`, wired in stack.py); the others take over within
the lease's TTL when it dies. Each check ping says which core sent it
(``Fleetbus-Checker``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

import nats.errors
from nats.aio.client import Client as NATS

from .cancelling import cancel_and_wait
from .host import CHECKER_REQUESTER
from .metrics import Metrics
from .records import Server, ServerStatus, utcnow
from .registry import Registry
from .subjects import HDR_CHECKER, Names, request_headers

log = logging.getLogger("fleetbus.checks")



class ServerChecker:
    def __init__(self, nc: NATS, names: Names, registry: Registry, metrics: Metrics,
                 interval_s: float = 30.0, timeout_s: float = 10.0, concurrency: int = 64,
                 checker_id: str | None = None) -> None:
        self.nc = nc
        #: Which core this is, in the checks' ``Fleetbus-Checker`` header and the leader lease.
        self.checker_id = checker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.names = names
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.slots = asyncio.Semaphore(concurrency)
        self.known: dict[str, str] = {}  # server -> transport, to drop gauges of removed servers
        # Our own last verdict per server: the status bucket is also written by gateways
        # and workers, so it cannot tell us whether the state changed since our last check.
        self.last_state: dict[str, str] = {}
        self.running: dict[str, asyncio.Task[bool]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start checking (again, after :meth:`stop`: a core elected once more)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_and_wait([self._task, *self.running.values()])
        self._task = None

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.check_all()
            except Exception as exc:  # a failed round must not end the checker
                log.warning("server check round failed: %s", type(exc).__name__)
            self.metrics.check_run_seconds.observe(time.monotonic() - started)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def check_all(self) -> None:
        """Start a check of every server not being checked already; do not wait for them.

        A server that never answers holds only its own check for the timeout, never the
        others' (each round starts what is due and returns).
        """
        servers = await self.registry.list()
        for name in set(self.known) - {s.name for s in servers}:
            self.metrics.forget_server(name, self.known.pop(name))
            self.last_state.pop(name, None)
        for server in servers:
            if server.name in self.running:
                continue
            task = asyncio.create_task(self._check_bounded(server))
            self.running[server.name] = task
            task.add_done_callback(lambda _t, n=server.name: self.running.pop(n, None))

    async def _check_bounded(self, server: Server) -> bool:
        async with self.slots:
            return await self.check(server)

    async def check(self, server: Server) -> bool:
        self.known[server.name] = server.transport
        started = time.monotonic()
        detail = None
        try:
            msg = await self.nc.request(self.names.server(server.name, "ping"), b"{}",
                                        timeout=self.timeout_s,
                                        headers={**request_headers(CHECKER_REQUESTER),
                                                 HDR_CHECKER: self.checker_id})
            reply = json.loads(msg.data)
            ok = bool(reply.get("ok"))
            if not ok:
                detail = str((reply.get("error") or {}).get("message", "check failed"))[:300]
        except nats.errors.NoRespondersError:
            ok, detail = False, f"nobody serves it (no worker or agent for {server.transport})"
        except nats.errors.TimeoutError:
            ok, detail = False, f"no answer within {self.timeout_s:g} s"
        except Exception as exc:
            ok, detail = False, f"check failed: {type(exc).__name__}"
        latency = time.monotonic() - started
        self.metrics.server_up.labels(server.name, server.transport).set(1 if ok else 0)
        self.metrics.check_seconds.labels(server.name, server.transport).set(latency)
        self.metrics.checks.labels(server.transport, "ok" if ok else "failed").inc()
        await self._record(server, ok, latency, detail)
        return ok

    async def _record(self, server: Server, ok: bool, latency: float, detail: str | None) -> None:
        previous = await self.registry.status(server.name)
        state = "online" if ok else "offline"
        now = utcnow()
        base = previous.model_dump() if previous else {"name": server.name}
        changed = self.last_state.get(server.name) != state
        self.last_state[server.name] = state
        update = {"state": state, "last_check": now, "check_latency_s": round(latency, 6),
                  "detail": detail}
        if ok:
            update["last_seen"] = now
        if previous is None or previous.state != state:
            update["since"] = now
        await self.registry.set_status(ServerStatus.model_validate({**base, **update}))
        if changed:
            event = {"server": server.name, "state": state, "detail": detail, "ts": now.isoformat()}
            await self.nc.publish(self.names.event("servers", server.name, state), json.dumps(event).encode())
            log.info("%s is %s%s", server.name, state, f": {detail}" if detail else "")
