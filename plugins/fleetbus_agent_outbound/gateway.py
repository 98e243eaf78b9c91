"""The ``agent-outbound`` transport: the TLS gateway outbound agents dial into.

When an agent proves a server's key, this process starts serving that server's bus
subjects (``ctx.serve``); when the connection goes, it stops. So NATS routes each
server's commands to whichever gateway holds its agent, and a second gateway process
on the same NATS needs no extra code. A second connection with the same key replaces
the first. The gateway watches the key bucket and drops a connection whose key was
rotated or revoked at once.

Settings (``ctx.settings``): ``listen`` ("HOST:PORT", default "0.0.0.0:7443"),
``advertise`` (the address agents should dial, default this host's name and the port),
``heartbeat_s`` (5), ``handshake_timeout_s`` (5), ``create_cert`` (True: make a CA and
certificate on first start when none exists).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from typing import Any

from fleetbus import __version__
from fleetbus.agentlink import AgentSession
from fleetbus.certs import GatewayFiles, create_gateway_identity, fingerprint_pem, server_context
from fleetbus.errors import AuthFailed, InvalidRequest, ServerOffline
from fleetbus.records import Server, utcnow
from fleetbus.transport import Credential, Session, Transport
from fleetbus_agent.heap import trim_heap
from fleetbus_agent.protocol import (
    AuthError,
    Connection,
    HandshakeError,
    controller_handshake,
    shrink_tls_buffers,
)
from fleetbus_agent.throttle import FailureThrottle
from nats.js.kv import KV_DEL, KV_PURGE

from .links import Link, Links

RECORD_EVERY_S = 20.0
STATUS_EVERY_S = 30.0
# Every TLS handshake, failed ones too, allocates and frees OpenSSL and asyncio state
# between the allocations of connections that stay. After thousands of agents connect
# at once (a gateway restart), glibc held more free heap than live data (hand run with
# 5,000 agents: 349 MiB free of 484 MiB); it never returns freed memory that sits below
# live allocations, malloc_trim does.
TRIM_EVERY_S = 10.0


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidRequest(f"gateway listen address must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class GatewayTransport(Transport):
    name = "agent-outbound"
    version = __version__
    description = "fleetbus agents that dial out to this TLS gateway (behind NAT and firewalls)"
    serves_registered = False

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.links = Links()
        self.throttle = FailureThrottle()
        self.server: asyncio.base_events.Server | None = None
        self.address = ""
        self.fingerprint = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._accepted_since_trim = 0
        settings = ctx.settings
        self.listen = parse_listen(settings.get("listen", "0.0.0.0:7443"))
        self.heartbeat_s = float(settings.get("heartbeat_s", 5.0))
        self.handshake_timeout_s = float(settings.get("handshake_timeout_s", 5.0))
        self.create_cert = bool(settings.get("create_cert", True))
        self.advertise = settings.get("advertise")

    # lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        shrink_tls_buffers()
        services = self.ctx.services
        files = GatewayFiles.of(services.home)
        if not files.exists() and self.create_cert:
            create_gateway_identity(services.home, services.master)
        tls = server_context(files, services.master)
        self.fingerprint = fingerprint_pem(files.cert.read_bytes())
        host, port = self.listen
        try:
            self.server = await asyncio.start_server(self._accept, host, port, ssl=tls,
                                                     ssl_handshake_timeout=self.handshake_timeout_s,
                                                     backlog=1024)
        except OSError as exc:
            raise InvalidRequest(
                f"the gateway cannot listen on {host}:{port}: {exc.strerror} "
                "(pass --gateway-listen to choose another address)") from None
        bound = self.server.sockets[0].getsockname()
        self.address = self.advertise or f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{bound[1]}"
        self.bound_port = bound[1]
        self._tasks = [asyncio.create_task(self._watch_keys()), asyncio.create_task(self._refresh()),
                       asyncio.create_task(self._trim_after_handshakes())]
        self.ctx.logger.info("gateway listening on %s:%s (agents dial %s, pin %s)",
                             host, bound[1], self.address, self.fingerprint)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in [*self._tasks, *self._handshakes]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handshakes, return_exceptions=True)
        for link in list(self.links.by_server.values()):
            await link.conn.close("the gateway is stopping", code="server_offline", goaway=True)
        try:
            await self.ctx.services.gateways.delete(self._record_key())
        except Exception:
            pass

    # connections ------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted_since_trim += 1
        task = asyncio.current_task()
        if task is not None:
            self._handshakes.add(task)
        try:
            await self._serve_connection(reader, writer)
        finally:
            if task is not None:
                self._handshakes.discard(task)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        ip, remote = str(peer[0]), f"{peer[0]}:{peer[1]}"
        if self.throttle.blocked_for(ip) > 0:
            self.ctx.services.metrics.auth_failures.labels(self.name, "locked_out").inc()
            writer.transport.abort()  # locked out: no handshake, no key check, no cost
            return
        matched: dict[str, str] = {}

        async def authenticate(hello: dict[str, Any]) -> str:
            auth = hello.get("auth") if isinstance(hello.get("auth"), dict) else {}
            key = auth.get("key") if auth.get("method") == "key" else None
            if not isinstance(key, str):
                raise AuthError("auth_failed", "this gateway accepts key authentication only")
            try:
                match = await self.ctx.services.agent_keys.verify(key)
            except AuthFailed as exc:
                self._auth_failed(ip, exc.message, "unknown_key")
                raise AuthError("auth_failed", "unknown or revoked key") from None
            server = await self.ctx.lookup_server(match.server)
            if server is None or server.transport != self.name:
                self._auth_failed(ip, "key of a server that is not an agent-outbound server", "wrong_transport")
                raise AuthError("auth_failed", "unknown or revoked key")
            self.throttle.success(ip)
            matched["key_id"] = match.key_id
            return match.server

        try:
            accepted = await controller_handshake(reader, writer, authenticate,
                                                  heartbeat_s=self.heartbeat_s,
                                                  timeout=self.handshake_timeout_s)
        except (TimeoutError, HandshakeError, OSError, ssl.SSLError) as exc:
            self.ctx.logger.debug("handshake from %s failed: %s", remote, getattr(exc, "message", exc))
            return
        conn = Connection.from_accepted(reader, writer, accepted)
        agent = str(accepted.hello.get("agent", "?"))[:100]
        link = Link(server=accepted.server, conn=conn, key_id=matched["key_id"], remote=remote, agent=agent)
        conn.start()
        old = self.links.put(link)
        metrics = self.ctx.services.metrics
        metrics.agent_connects.labels(self.name).inc()
        metrics.agents.set(len(self.links))
        if old is not None:
            self.ctx.logger.warning("agent %s connected again from %s; dropping its older connection from %s",
                                    link.server, remote, old.remote)
            await old.conn.close(f"replaced by a newer connection from {remote}",
                                 code="server_offline", goaway=True)
        server = await self.ctx.lookup_server(link.server)
        if server is None:
            await conn.close("the server was removed", code="auth_failed", goaway=True)
            self.links.remove(link)
            return
        await self.ctx.serve(server)
        await self._status(link, "online")
        self.ctx.logger.info("agent %s connected from %s (%s)", link.server, remote, agent)
        await conn.wait_closed()
        removed = self.links.remove(link)
        metrics.agents.set(len(self.links))
        if removed:
            await self.ctx.unserve(link.server)
            await self._status(link, "offline", detail=conn.close_reason)
        self.ctx.logger.info("agent %s disconnected: %s", link.server, conn.close_reason)

    def _auth_failed(self, ip: str, reason: str, label: str) -> None:
        self.ctx.services.metrics.auth_failures.labels(self.name, label).inc()
        locked = self.throttle.failure(ip)
        self.ctx.logger.warning("agent authentication from %s failed: %s%s", ip, reason,
                                "; locked out for a while" if locked else "")

    async def _status(self, link: Link, state: str, detail: str | None = None) -> None:
        await self.ctx.services.report_status(
            link.server, state, self.version, agent_version=link.agent,
            remote_address=link.remote, detail=detail)

    # keys and records -----------------------------------------------------------------
    async def _watch_keys(self) -> None:
        kv = self.ctx.services.agent_keys.kv
        watcher = await kv.watch("id.*")
        async for entry in watcher:
            if entry is None or entry.operation not in (KV_DEL, KV_PURGE):
                continue
            key_id = entry.key.split(".", 1)[1]
            for link in self.links.with_key(key_id):
                self.ctx.logger.warning("dropping agent %s: its key was rotated or revoked", link.server)
                await link.conn.close("the key was rotated or revoked", code="auth_failed", goaway=True)

    def _record_key(self) -> str:
        return self.ctx.services.worker_id.replace(":", "-")

    async def _refresh(self) -> None:
        last_status = 0.0
        while True:
            record = {"worker": self.ctx.services.worker_id, "address": self.address,
                      "fingerprint": self.fingerprint, "agents": len(self.links),
                      "updated": utcnow().isoformat()}
            try:
                await self.ctx.services.gateways.put(self._record_key(), json.dumps(record).encode())
            except Exception as exc:
                self.ctx.logger.warning("could not publish the gateway record: %s", type(exc).__name__)
            if time.monotonic() - last_status > STATUS_EVERY_S:
                last_status = time.monotonic()
                for link in list(self.links.by_server.values()):
                    await self._status(link, "online")
            await asyncio.sleep(RECORD_EVERY_S)

    async def _trim_after_handshakes(self) -> None:
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            if self._accepted_since_trim:
                self._accepted_since_trim = 0
                # In a thread: on a large heap it takes a few milliseconds the loop need not wait.
                if not await asyncio.to_thread(trim_heap):
                    return  # not glibc: nothing to do, ever

    # sessions ---------------------------------------------------------------------------
    async def open(self, server: Server, credential: Credential | None) -> Session:
        link = self.links.get(server.name)
        if link is None:
            raise ServerOffline(f"{server.name}'s agent is not connected to this gateway")
        return AgentSession(link.conn)
