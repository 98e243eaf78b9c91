"""What the core gives a plugin beyond the Transport interface: ``ctx.services``.

:class:`Services` is the whole of it, a narrow typed interface of domain operations
(report a server's status, count a refused login, verify an agent key, watch revoked
keys, publish a gateway record, claim a server's link, ...). A plugin never sees the NATS
connection, a bucket or the registry: those stay behind these methods, in the core's
implementation (``coreservices.CoreServices``) and the domain modules beside it
(``keys.py``, ``gatewaystate.py``, ``registry.py``). The built-in
agent transports use most of it; third-party transports usually need none, or
``report_status`` and ``count_auth_failure``.

This module imports no NATS client: plugins load it through ``fleetbus.plugin``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .home import Home
from .records import ServerStatus

if TYPE_CHECKING:
    from .keys import KeyMatch


@dataclass(frozen=True)
class GatewayIdentity:
    """A gateway's TLS identity, ready to serve: its context and the pins agents use."""

    tls: ssl.SSLContext
    """The server side's TLS context, with the gateway's certificate loaded."""
    fingerprint: str
    """The gateway certificate's fingerprint ("sha256:<hex>")."""
    ca_fingerprint: str | None
    """The deployment CA's fingerprint, when the certificate came from it."""


@dataclass(frozen=True)
class LinkClaim:
    """One change to a server's link claim: who holds it now (``gateway``, a worker id)
    at ``revision``, or ``gateway`` None when the claim was deleted."""

    server: str
    gateway: str | None
    revision: int


@dataclass(frozen=True)
class GatewayRecord:
    """One change to a gateway's record: ``worker`` at ``revision``, or ``worker`` None
    when it was deleted. ``mine`` says it is this process's own record; ``key`` is what
    :meth:`Services.remove_gateway_record` takes."""

    key: str
    worker: str | None
    revision: int
    mine: bool



class Services(Protocol):
    """The core's services to a transport plugin (``ctx.services``).

    Every method is a domain operation; none exposes NATS. Methods that write shared
    state say what they do when the bus is briefly unavailable.
    """

    #: This worker's home folder (files a transport keeps, such as the gateway's certificate).
    home: Home
    #: This worker's id, unique in the deployment (names what it claims and records).
    worker_id: str

    def derive_secret(self, purpose: str) -> bytes:
        """A 32-byte secret for ``purpose``, derived from the master key (never stored);
        ``InternalError`` when this process holds no master key."""
        ...

    # servers --------------------------------------------------------------------------
    async def report_status(self, name: str, state: str, transport_version: str | None = None,
                            **fields: Any) -> None:
        """Record what this process sees of server ``name``: ``state`` ("online",
        "offline"), and fields such as ``detail``, ``agent_version``, ``remote_address``.
        Never raises (a failed write is logged)."""
        ...

    async def report_lost(self, name: str, served_by: str, detail: str) -> bool:
        """Mark ``name`` offline if worker ``served_by`` (gone) still holds it; whether it wrote."""
        ...

    async def server_status(self, name: str) -> ServerStatus | None:
        """The last recorded status of ``name``, or None."""
        ...

    async def pin_server_certificate(self, name: str, fingerprint: str) -> None:
        """Pin ``fingerprint`` ("sha256:<hex>") as server ``name``'s certificate in its
        registry record (``options.fingerprint``): trust on first use."""
        ...

    # metrics --------------------------------------------------------------------------
    def count_auth_failure(self, transport: str, reason: str) -> None:
        """Count one refused authentication (``fleetbus_auth_failures_total``); ``reason``
        is a short fixed word such as "bad_password" or "unknown_key", never a secret.
        Safe to call from a blocking call's thread (``ctx.run_blocking``)."""
        ...

    def count_agent_connect(self, transport: str) -> None:
        """Count one agent connection established (``fleetbus_agent_connections_total``)."""
        ...

    def set_agents_connected(self, count: int) -> None:
        """How many agents this gateway holds now (``fleetbus_gateway_agents_connected``)."""
        ...

    def count_handshake_dropped(self, reason: str) -> None:
        """Count one connection dropped before it authenticated, by ``reason`` ("tls", "hello", ...)."""
        ...

    def observe_listener(self, waiting: Callable[[], int], unauthenticated: Callable[[], int]) -> None:
        """Report a listener's connections waiting for a handshake slot and its
        unauthenticated ones: each callable is read whenever metrics are scraped."""
        ...

    # agent keys -----------------------------------------------------------------------
    async def verify_agent_key(self, key: str) -> KeyMatch:
        """The server a presented agent key belongs to; ``AuthFailed`` (no detail) otherwise."""
        ...

    def watch_revoked_keys(self) -> AsyncIterator[str]:
        """The id of each agent key as it is rotated or revoked; raises when the watch
        fails (NATS reconnecting)."""
        ...

    # gateways -------------------------------------------------------------------------
    async def gateway_identity(self, create: bool, hosts: list[str],
                               ca_probe_name: str | None = None) -> GatewayIdentity:
        """This gateway's TLS identity: its certificate from the home folder, else (with
        ``create``) a new one for ``hosts`` signed by the deployment's CA, which is loaded
        or, by the first gateway, created (race-safe)."""
        ...

    async def publish_gateway_record(self, record: Mapping[str, Any]) -> None:
        """Write this gateway's record (address, fingerprints, agents) for
        ``fleetbus gateway info`` and for the other gateways to see it alive."""
        ...

    async def withdraw_gateway_record(self) -> None:
        """Delete this gateway's record: it is stopping."""
        ...

    async def remove_gateway_record(self, key: str, revision: int) -> bool:
        """Delete another gateway's record if still at ``revision`` (it died); False when
        it changed since. Other errors raise."""
        ...

    def watch_gateway_records(self) -> AsyncIterator[GatewayRecord]:
        """Every gateway record, then each change; raises when the watch fails."""
        ...

    async def claim_link(self, server: str, details: Mapping[str, Any]) -> int:
        """Record that this worker serves ``server``'s agent from now on; returns the
        claim's revision (the link's epoch: a later claim elsewhere has a larger one)."""
        ...

    async def release_link(self, server: str, revision: int) -> bool:
        """Drop ``server``'s claim only if it is still at ``revision``; whether it was."""
        ...

    def watch_link_claims(self) -> AsyncIterator[LinkClaim]:
        """Every link claim, then each change; raises when the watch fails."""
        ...
