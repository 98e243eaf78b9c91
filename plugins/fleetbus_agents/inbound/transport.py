"""The ``agent-inbound`` transport: fleetbus connects to an agent listening on the server.

Per server: one multiplexed TLS connection, opened on first use, kept alive by the
protocol's heartbeats, closed when idle and re-opened after a failure (the host's
session pool does the keeping; this module opens and closes). Before any command, the
agent's certificate must match the pinned fingerprint, and fleetbus proves it knows the
server's key with a challenge-response bound to that certificate; the key never
crosses the wire. With ``trust_on_first_use`` and no pin yet, the certificate seen first
is pinned in the registry.

Server fields: ``host``, ``port`` (default 7444), ``credential`` (holds the server's key),
``options.fingerprint`` ("sha256:<hex>"), ``options.trust_on_first_use``.
Settings: ``connect_timeout_s`` (5), ``heartbeat_s`` (5), ``idle_timeout_s`` (300):
:class:`InboundSettings`; options: :class:`InboundOptions`.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
from typing import Any

from fleetbus import __version__
from fleetbus.errors import AuthFailed, InvalidRequest, ServerOffline
from fleetbus.records import Server
from fleetbus.transport import Capabilities, Credential, ServerOptions, Session, Transport, TransportSettings
from fleetbus_base.wire import (
    AuthError,
    Connection,
    HandshakeError,
    controller_connect_handshake,
    peer_certificate_fingerprint,
)
from pydantic import Field, field_validator

from ..link import AgentSession

DEFAULT_PORT = 7444


def normalize(fingerprint: str) -> str:
    text = str(fingerprint).strip().lower().removeprefix("sha256:").replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidRequest(f"{fingerprint!r} is not a fingerprint: use sha256: and 64 hex digits")
    return text


class InboundOptions(ServerOptions):
    """Per-server options: the agent certificate's pinned ``fingerprint``
    ("sha256:<hex>") and ``trust_on_first_use`` (pin the certificate seen first)."""

    fingerprint: str | None = None
    trust_on_first_use: bool = False

    @field_validator("fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value:
            try:
                normalize(value)
            except InvalidRequest as exc:
                raise ValueError(exc.message) from None
        return value


class InboundSettings(TransportSettings):
    """Settings, in seconds: ``connect_timeout_s`` (TCP, TLS and the key proof),
    ``heartbeat_s``, ``idle_timeout_s`` (how long an unused connection stays open)."""

    connect_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    heartbeat_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    idle_timeout_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)


class InboundSession(AgentSession):
    """The session owns its connection: closing the session (idle) closes the link."""

    async def close(self) -> None:
        await self.conn.close("idle", goaway=True)


class InboundTransport(Transport):
    name = "agent-inbound"
    version = __version__
    description = "fleetbus agents listening on their servers; fleetbus connects in"
    serves_registered = True
    Settings = InboundSettings
    Options = InboundOptions
    capabilities = Capabilities(needs_host=True, default_port=DEFAULT_PORT)
    settings: InboundSettings

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.connect_timeout_s = self.settings.connect_timeout_s
        self.heartbeat_s = self.settings.heartbeat_s
        self.idle_timeout_s = self.settings.idle_timeout_s

    async def open(self, server: Server, credential: Credential | None) -> Session:
        if not server.host:
            raise InvalidRequest(f"{server.name} has no host: register it with --host")
        if credential is None:
            raise AuthFailed(f"{server.name} has no credential holding its agent key")
        pin = server.options.get("fingerprint")
        tofu = bool(server.options.get("trust_on_first_use"))
        if not pin and not tofu:
            raise AuthFailed(f"{server.name} has no pinned fingerprint; register it with --fingerprint "
                             "(or --trust-on-first-use)")
        port = server.port or DEFAULT_PORT
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        # Identity is the pinned fingerprint, checked below, not a CA chain.
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(server.host, port, ssl=tls, server_hostname=server.host),
                self.connect_timeout_s)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ServerOffline(f"cannot reach {server.name}'s agent at {server.host}:{port}: {detail}") from None
        try:
            seen = peer_certificate_fingerprint(writer)
            if pin and not hmac.compare_digest(normalize(seen), normalize(pin)):
                self.ctx.services.count_auth_failure(self.name, "bad_pin")
                raise AuthFailed(
                    f"{server.name}'s agent presented certificate {seen}, not the pinned "
                    f"sha256:{normalize(pin)}; refusing to talk to it")
            accepted = await controller_connect_handshake(
                reader, writer, key=credential.secret.decode(), agent_fingerprint=seen,
                server=server.name, heartbeat_s=self.heartbeat_s, timeout=self.connect_timeout_s)
        except AuthError:
            writer.close()
            self.ctx.services.count_auth_failure(self.name, "bad_proof")
            raise AuthFailed(f"{server.name}'s agent refused fleetbus's proof of the key "
                             "(the key registered in fleetbus differs from the agent's)") from None
        except HandshakeError as exc:
            writer.close()
            raise ServerOffline(f"handshake with {server.name}'s agent failed: {exc.message}") from None
        except BaseException:
            writer.close()
            raise
        if not pin:
            await self._pin(server, seen)
        conn = Connection.from_accepted(reader, writer, accepted)
        conn.start()
        self.ctx.services.count_agent_connect(self.name)
        agent = str(accepted.hello.get("agent", "?"))[:100]
        await self.ctx.services.report_status(server.name, "online", self.version, agent_version=agent,
                                              remote_address=f"{server.host}:{port}")
        return InboundSession(conn)

    async def _pin(self, server: Server, seen: str) -> None:
        await self.ctx.services.pin_server_certificate(server.name, seen)
        self.ctx.logger.warning("trust on first use: pinned %s for %s", seen, server.name)
