"""Core facilities a transport may use beyond the Transport interface.

The built-in agent transports need the agent-key store, the gateway registry, the home
folder and secrets derived from the master key; third-party transports usually need
none of this. Reached as ``ctx.services``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from .errors import InternalError
from .home import Home
from .jsretry import retry_js
from .keys import AgentKeys
from .metrics import Metrics
from .records import ServerStatus, utcnow
from .registry import Registry
from .subjects import Names
from .vault import MasterKey

log = logging.getLogger("fleetbus.services")


@dataclass
class CoreServices:
    nc: NATS
    names: Names
    home: Home
    registry: Registry
    agent_keys: AgentKeys
    gateways: KeyValue
    master: MasterKey | None
    worker_id: str
    metrics: Metrics
    gateway_state_kv: KeyValue

    async def gateway_state(self) -> KeyValue:
        """The bucket gateways share: the deployment CA (key ``ca``) and, per server,
        which gateway holds its agent (``link.<server>``). Made with the rest of the
        state (jetstream.open_state), so the deployment's replicas reach it too."""
        return self.gateway_state_kv

    def derive_secret(self, purpose: str) -> bytes:
        """A 32-byte secret for ``purpose``, derived from the master key (never stored)."""
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
