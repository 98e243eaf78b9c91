"""The core's implementation of :class:`fleetbus.services.Services` (``ctx.services``).

Domain operations over the worker's state: the registry and status bucket
(``registry.py``), agent keys (``keys.py``), what gateways share (``gatewaystate.py``)
and the metrics. The host (host.py) makes one per worker.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InternalError
from .gatewaystate import GatewayState
from .home import Home
from .jsretry import retry_js
from .keys import AgentKeys, KeyMatch
from .metrics import Metrics
from .records import ServerStatus, utcnow
from .registry import Registry
from .services import GatewayIdentity, GatewayRecord, LinkClaim
from .vault import MasterKey

log = logging.getLogger("fleetbus.services")


@dataclass
class CoreServices:
    """The core's :class:`fleetbus.services.Services`, over the worker's state buckets and metrics."""

    home: Home
    registry: Registry
    agent_keys: AgentKeys
    gateway_state: GatewayState
    master: MasterKey | None
    worker_id: str
    metrics: Metrics

    def derive_secret(self, purpose: str) -> bytes:
        if self.master is None:
            raise InternalError("this process holds no master key")
        return hmac.new(self.master.key, f"fleetbus-derive-v1:{purpose}".encode(),
                        hashlib.sha256).digest()

    async def report_status(self, name: str, state: str, transport_version: str | None = None,
                            **fields: Any) -> None:
        """Record what this process sees of ``name`` in the status bucket.

        Never raises: a status is what this process saw, and serving a server must not
        fail because the bucket is electing a leader (each call is retried through one,
        jsretry.py); a status still not written is logged.
        """
        try:
            now = utcnow()
            previous = await retry_js(lambda: self.registry.status(name), f"reading the status of {name}")
            since = previous.since if previous is not None and previous.state == state and previous.since else now
            update = dict(state=state, served_by=self.worker_id, since=since, last_seen=now, **fields)
            if transport_version is not None:
                update["transport_version"] = transport_version
            # Merge, so the checker's and the transports' fields do not erase each other.
            status = ServerStatus.model_validate({**(previous or ServerStatus(name=name)).model_dump(), **update})
            await retry_js(lambda: self.registry.set_status(status), f"recording the status of {name}")
        except Exception as exc:
            log.warning("could not record status of %s: %s", name, type(exc).__name__)

    async def report_lost(self, name: str, served_by: str, detail: str) -> bool:
        """Mark ``name`` offline if ``served_by`` still holds it (its process died unseen).

        Written by a surviving gateway for the agents of one that stopped refreshing its
        record; a status some other process wrote since (the agent came back elsewhere)
        is left alone. Returns whether it wrote.
        """
        try:
            previous = await retry_js(lambda: self.registry.status(name), f"reading the status of {name}")
        except Exception as exc:
            log.warning("could not read status of %s: %s", name, type(exc).__name__)
            return False
        if previous is None or previous.served_by != served_by or previous.state != "online":
            return False
        now = utcnow()
        update = {"state": "offline", "since": now, "detail": detail}
        try:
            await self.registry.set_status(ServerStatus.model_validate({**previous.model_dump(), **update}))
        except Exception as exc:
            log.warning("could not record status of %s: %s", name, type(exc).__name__)
            return False
        return True

    async def server_status(self, name: str) -> ServerStatus | None:
        return await self.registry.status(name)

    async def pin_server_certificate(self, name: str, fingerprint: str) -> None:
        # Read back and rewritten, so an edit made since the transport read the record
        # (another option, a new host) is kept; only the pin is added.
        server = await self.registry.get(name)
        options = dict(server.options, fingerprint=fingerprint)
        await self.registry.add(server.model_copy(update={"options": options}), replace=True)

    def count_auth_failure(self, transport: str, reason: str) -> None:
        self.metrics.auth_failures.labels(transport, reason).inc()

    def count_agent_connect(self, transport: str) -> None:
        self.metrics.agent_connects.labels(transport).inc()

    def set_agents_connected(self, count: int) -> None:
        self.metrics.agents.set(count)

    def count_handshake_dropped(self, reason: str) -> None:
        self.metrics.handshakes_dropped.labels(reason).inc()

    def observe_listener(self, waiting: Callable[[], int], unauthenticated: Callable[[], int]) -> None:
        self.metrics.handshakes_waiting.set_function(waiting)
        self.metrics.unauthenticated.set_function(unauthenticated)

    async def verify_agent_key(self, key: str) -> KeyMatch:
        return await self.agent_keys.verify(key)

    def watch_revoked_keys(self) -> AsyncIterator[str]:
        return self.agent_keys.watch_revoked()

    async def gateway_identity(self, create: bool, hosts: list[str],
                               ca_probe_name: str | None = None) -> GatewayIdentity:
        return await self.gateway_state.identity(create, hosts, ca_probe_name)

    async def publish_gateway_record(self, record: Mapping[str, Any]) -> None:
        await self.gateway_state.publish_record(record)

    async def withdraw_gateway_record(self) -> None:
        await self.gateway_state.withdraw_record()

    async def remove_gateway_record(self, key: str, revision: int) -> bool:
        return await self.gateway_state.remove_record(key, revision)

    def watch_gateway_records(self) -> AsyncIterator[GatewayRecord]:
        return self.gateway_state.watch_records()

    async def claim_link(self, server: str, details: Mapping[str, Any]) -> int:
        return await self.gateway_state.claim_link(server, details)

    async def release_link(self, server: str, revision: int) -> bool:
        return await self.gateway_state.release_link(server, revision)

    def watch_link_claims(self) -> AsyncIterator[LinkClaim]:
        return self.gateway_state.watch_link_claims()
