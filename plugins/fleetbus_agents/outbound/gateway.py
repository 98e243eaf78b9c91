"""The ``agent-outbound`` transport: the TLS gateway outbound agents dial into.

When an agent proves a server's key, this process starts serving that server's bus
subjects (``ctx.serve``); when the connection goes, it stops. So NATS routes each
server's commands to whichever gateway holds its agent. The gateway watches the key
bucket and drops a connection whose key was rotated or revoked at once.

Several gateways on one NATS (:mod:`.cluster`): they share the deployment's CA (kept in
JetStream, created once), so an agent that trusts it accepts any of them; each claims a
server when its agent connects (a ``link.<server>`` record whose revision is the link's
epoch), and the one holding an older claim closes its connection, so exactly one
gateway serves a server (a second connection with the same key, here or at another
gateway, replaces the first). Each refreshes its record in the gateways bucket every
``RECORD_EVERY_S``; the survivors remove a gateway that stopped and mark its agents
offline unless they came back through another.

Before an agent has proved anything, :class:`fleetbus_base.admission.Gate` decides
whether and when it gets a handshake (fair per source address, capped, within the
process's descriptor budget), and :class:`fleetbus_base.throttle.AuthThrottle` throttles
failed keys by address and key id; failures are logged in aggregate.

Settings (``ctx.settings``): ``listen`` ("HOST:PORT", default "0.0.0.0:7443"),
``advertise`` (the address agents should dial, default this host's name and the port),
``heartbeat_s`` (10: with protocol-3 agents a dead agent is noticed within 30 s, a hung
gateway by its agents within 60 s; see docs/agent-protocol.md), ``handshake_timeout_s`` (5: TLS and hello together),
``max_handshakes`` (512: agents in their TLS and key handshake at once; more wait,
accepted), ``handshake_wait_s`` (as handshake_timeout_s: longest wait for a slot),
``max_unauthenticated`` (8192), ``max_unauthenticated_per_address`` (8192: a fleet
behind one NAT address reconnects at once too; fairness to other addresses comes from
eviction and round-robin),
``penalised_per_address`` (4: the cap for an address that keeps failing),
``silent_s`` (as handshake_timeout_s), ``fd_reserve`` (256: descriptors the listener
never takes; at least 10 % of the limit), ``auth_log_interval_s`` (60), ``create_cert``
(True: make a certificate signed by the deployment's CA on first start when none
exists), ``hosts`` (comma-separated names and addresses for that certificate, beside
this host's names and the advertised host).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Any

from fleetbus import __version__
from fleetbus.certs import default_hosts
from fleetbus.errors import AuthFailed, InvalidRequest, ServerOffline
from fleetbus.keys import parse_key
from fleetbus.records import Server, utcnow
from fleetbus.transport import Capabilities, Credential, Session, Transport, TransportSettings
from fleetbus_agent.connect import CA_PROBE_NAME
from fleetbus_base.admission import Gate, GateSettings
from fleetbus_base.fdbudget import raise_nofile_limit
from fleetbus_base.heap import trim_heap
from fleetbus_base.throttle import AuthThrottle, FailureLog
from fleetbus_base.wire import (
    Accepted,
    AuthError,
    Connection,
    HandshakeError,
    controller_handshake,
)
from pydantic import Field, field_validator

from ..link import AgentSession
from .cluster import RECORD_EVERY_S, Cluster
from .links import Link, Links

# How often each connected agent's status (its last_seen) is written again. Each record
# tick writes the stalest share of the links, so every link is refreshed about this often
# and the writes (a status read and write per agent) are spread out instead of arriving
# in one burst per interval, which a gateway with thousands of agents pays for in CPU
# (docs/performance.md, "History of measured changes"). The core's server checks (every
# 30 s by default) also set last_seen.
STATUS_EVERY_S = 300.0
# Every TLS handshake, failed ones too, allocates and frees OpenSSL and asyncio state
# between the allocations of connections that stay. After thousands of agents connect
# at once (a gateway restart), glibc held more free heap than live data (hand run with
# 5,000 agents: 349 MiB free of 484 MiB); it never returns freed memory that sits below
# live allocations, malloc_trim does.
TRIM_EVERY_S = 10.0
# Agents in their handshake (TLS, hello, key check) at once; the rest wait, accepted,
# with no TLS state yet (fleetbus_base.admission). When 5,000 agents dialled at once,
# every handshake ran at the same time, most missed their deadlines and started over.
# A slot is held across the agent's round trips and the key check's, not only the
# gateway's CPU: with 64, a 15,000-agent reconnect storm left the gateway under 40% of
# a core while connections waited for a slot (125.6 s until all were back); with 512,
# 102.4 s and half as many turned away (docs/performance.md). 512 handshakes of ~3 ms
# of CPU each still end within their 5 s deadline.
MAX_HANDSHAKES = 512
# An address that keeps failing to authenticate may hold this many unauthenticated
# connections at once instead of max_unauthenticated_per_address: penalised, not
# banned, so a correct agent behind the same NAT address still gets a handshake.
PENALISED_PER_ADDRESS = 4


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket (what asyncio's create_server would bind)."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidRequest(f"gateway listen address must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class GatewaySettings(TransportSettings):
    """The gateway's settings (see the module docstring for each)."""

    listen: str = "0.0.0.0:7443"
    advertise: str | None = None
    # 10 s: 15,000 idle protocol-3 agents cost ~9-10% of a core (bench/idlebench.py; 15 s
    # saved little at that size), and a dead agent is noticed within 30 s, a hung gateway
    # within 60 s.
    heartbeat_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    handshake_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    max_handshakes: int = Field(default=MAX_HANDSHAKES, ge=1)
    handshake_wait_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_unauthenticated: int = Field(default=8192, ge=1)
    max_unauthenticated_per_address: int = Field(default=8192, ge=1)
    penalised_per_address: int = Field(default=PENALISED_PER_ADDRESS, ge=1)
    silent_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    fd_reserve: int = Field(default=256, ge=0)
    auth_log_interval_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    create_cert: bool = True
    hosts: str | list[str] | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        try:
            parse_listen(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return value


class GatewayTransport(Transport):
    name = "agent-outbound"
    version = __version__
    description = "fleetbus agents that dial out to this TLS gateway (behind NAT and firewalls)"
    serves_registered = False
    Settings = GatewaySettings
    capabilities = Capabilities(issues_agent_key=True)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.links = Links()
        self.throttle = AuthThrottle()
        self.address = ""
        self.fingerprint = ""
        self.ca_fingerprint: str | None = None
        self.cluster: Cluster | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._gate: Gate[tuple[Any, ...]] | None = None
        self._accepted_at_trim = 0
        settings: GatewaySettings = self.settings
        self.listen = parse_listen(settings.listen)
        self.heartbeat_s = settings.heartbeat_s
        self.create_cert = settings.create_cert
        timeout = settings.handshake_timeout_s
        try:
            self.admission_settings = GateSettings(
                max_handshakes=settings.max_handshakes,
                max_unauthenticated=settings.max_unauthenticated,
                max_per_source=settings.max_unauthenticated_per_address,
                handshake_timeout_s=timeout,
                wait_s=settings.handshake_wait_s if settings.handshake_wait_s is not None else timeout,
                silent_s=settings.silent_s if settings.silent_s is not None else timeout,
                fd_reserve_min=settings.fd_reserve)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"agent-outbound settings: {exc}") from None
        self.penalised_per_address = settings.penalised_per_address
        log_interval_s = settings.auth_log_interval_s
        # The transport's own logger (ctx.logger), named here so settings can be checked
        # before the host hands over a context with one.
        self.failure_log = FailureLog(logging.getLogger(f"fleetbus.transport.{self.name}"),
                                      "agent authentication", "agent authentications",
                                      interval_s=log_interval_s)
        self._tls: ssl.SSLContext | None = None
        self.advertise = settings.advertise
        extra = settings.hosts or []
        self.extra_hosts = [h.strip() for h in (extra.split(",") if isinstance(extra, str) else extra)
                            if str(h).strip()]

    def describe(self) -> list[tuple[str, str]]:
        return [("gateway", f"{self.address}  pin {self.fingerprint}")]

    # lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        soft, _hard = raise_nofile_limit()
        self.cluster = Cluster(self.ctx, self.links)
        identity = await self.ctx.services.gateway_identity(self.create_cert, self._cert_hosts(),
                                                             ca_probe_name=CA_PROBE_NAME)
        self._tls = identity.tls
        self.fingerprint = identity.fingerprint
        self.ca_fingerprint = identity.ca_fingerprint
        host, port = self.listen
        try:
            # Accepted by hand and held as plain sockets until a handshake slot is free:
            # no event loop reads a byte (the ClientHello) of a waiting connection, so
            # its TLS handshake finds it in the kernel. An asyncio server would hand
            # each connection to a transport that, on uvloop, starts reading at once.
            listener = _listen(host, port)
        except OSError as exc:
            raise InvalidRequest(
                f"the gateway cannot listen on {host}:{port}: {exc.strerror} "
                "(pass --gateway-listen to choose another address)") from None
        self._gate = Gate(listener, self.admission_settings, self._handshake, self._serve_link,
                          log=self.ctx.logger, dropped=self._dropped, source_cap=self._source_cap)
        self._gate.start()
        gate = self._gate
        self.ctx.services.observe_listener(lambda: gate.waiting, lambda: gate.unauthenticated)
        bound = listener.getsockname()
        self.address = self.advertise or f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{bound[1]}"
        self.bound_port = bound[1]
        self._tasks = [asyncio.create_task(self._watch_keys()), asyncio.create_task(self._refresh()),
                       asyncio.create_task(self._trim_after_handshakes()),
                       asyncio.create_task(self._flush_failure_log()),
                       *self.cluster.start(self._record)]
        self.ctx.logger.info("gateway listening on %s:%s (agents dial %s, pin the CA %s or this gateway %s; "
                             "descriptor limit %s, %s kept in reserve)", host, bound[1], self.address,
                             self.ca_fingerprint, self.fingerprint, soft, gate.budget.reserve)

    async def stop(self) -> None:
        if self._gate is not None:
            await self._gate.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.aclose()
        self.failure_log.flush()
        for link in list(self.links.by_server.values()):
            await link.conn.close("the gateway is stopping", code="server_offline", goaway=True)
        try:
            # Bounded: with NATS unreachable the record expires by itself, and the
            # worker's stop must not wait out the KV's timeout for it.
            await asyncio.wait_for(self.ctx.services.withdraw_gateway_record(), 2.0)
        except Exception:
            pass

    # connections ------------------------------------------------------------------------
    def _source_cap(self, ip: str) -> int:
        if self.throttle.penalised(ip):
            return self.penalised_per_address
        return self.admission_settings.max_per_source

    async def _serve_link(self, parts: tuple[Any, ...]) -> None:
        await self._run_link(*parts)

    async def _handshake(self, conn: socket.socket, ip: str, deadline: float) -> tuple[Any, ...] | None:
        """TLS, then hello/welcome with the key check, by ``deadline``; None when it failed."""
        try:
            peer = conn.getpeername()
            remote = f"{peer[0]}:{peer[1]}"
        except OSError:
            remote = f"{ip}:?"
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            tls, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._tls,
                ssl_handshake_timeout=max(0.001, deadline - time.monotonic()))
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._dropped("tls")
            self.ctx.logger.debug("TLS handshake from %s failed: %s", remote, exc)
            conn.close()
            return None
        ssl_object = tls.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.context is not self._tls:
            # The CA probe (docs/agent-protocol.md): the agent came for the CA certificate
            # it just saw and sends nothing; not a failed handshake.
            tls.close()
            return None
        writer = asyncio.StreamWriter(tls, protocol, reader, loop)
        matched: dict[str, Any] = {}

        async def authenticate(hello: dict[str, Any]) -> str:
            auth = hello.get("auth") if isinstance(hello.get("auth"), dict) else {}
            if auth.get("method") != "key":
                self._auth_failed(ip, None, "bad_method")
                raise AuthError("auth_failed", "this gateway accepts key authentication only")
            key = auth.get("key")
            parsed = parse_key(key) if isinstance(key, str) else None
            key_id = parsed[0] if parsed else None
            if self.throttle.locked(ip, key_id):
                # Checked no further: the answer is the same as for a wrong key.
                self._auth_failed(ip, key_id, "locked_out", count=False)
                raise AuthError("auth_failed", "unknown or revoked key")
            if parsed is None:  # not a fleetbus key at all: as unknown as any
                self._auth_failed(ip, None, "unknown_key")
                raise AuthError("auth_failed", "unknown or revoked key")
            try:
                match = await self.ctx.services.verify_agent_key(key)
            except AuthFailed:
                self._auth_failed(ip, key_id, "unknown_key")
                raise AuthError("auth_failed", "unknown or revoked key") from None
            server = await self.ctx.lookup_server(match.server)
            if server is None or server.transport != self.name:
                self._auth_failed(ip, key_id, "wrong_transport")
                raise AuthError("auth_failed", "unknown or revoked key")
            self.throttle.success(ip, match.key_id)
            matched.update(key_id=match.key_id, server=server)
            return match.server

        try:
            accepted = await controller_handshake(reader, writer, authenticate,
                                                  heartbeat_s=self.heartbeat_s,
                                                  timeout=max(0.001, deadline - time.monotonic()))
        except (TimeoutError, HandshakeError, OSError, ssl.SSLError) as exc:
            if not isinstance(exc, AuthError):
                self._dropped("hello")
            self.ctx.logger.debug("handshake from %s failed: %s", remote, getattr(exc, "message", exc))
            return None
        return reader, writer, accepted, matched["key_id"], remote, matched["server"]

    async def _run_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        accepted: Accepted, key_id: str, remote: str, server: Server) -> None:
        conn = Connection.from_accepted(reader, writer, accepted)
        agent = str(accepted.hello.get("agent", "?"))[:100]
        link = Link(server=accepted.server, conn=conn, key_id=key_id, remote=remote, agent=agent)
        conn.start()
        old = self.links.put(link)
        services = self.ctx.services
        services.count_agent_connect(self.name)
        services.set_agents_connected(len(self.links))
        if old is not None:
            self.ctx.logger.warning("agent %s connected again from %s; dropping its older connection from %s",
                                    link.server, remote, old.remote)
            await old.conn.close(f"replaced by a newer connection from {remote}",
                                 code="server_offline", goaway=True)
        assert self.cluster is not None
        # Claimed before serving: a gateway holding an older claim closes its link and
        # stops serving, and the host's queue group sends each request to one of us in
        # the moment both subscriptions exist, so no command is delivered twice.
        moved = await self.cluster.claim(link)
        if not conn.closed:
            await self.ctx.serve(server, status=self._status_fields(link))
            link.status_at = time.monotonic()
            if moved:
                self.cluster.confirm_status(link, lambda link: self._status(link, "online"))
            self.ctx.logger.info("agent %s connected from %s (%s, link epoch %s)", link.server, remote,
                                 agent, link.epoch)
        await conn.wait_closed()
        removed = self.links.remove(link)
        services.set_agents_connected(len(self.links))
        if removed:
            await self.ctx.unserve(link.server)
            if not link.taken_over:
                await self._status(link, "offline", detail=conn.close_reason)
                await self.cluster.release(link)
        self.ctx.logger.info("agent %s disconnected: %s", link.server, conn.close_reason)

    def _dropped(self, reason: str) -> None:
        self.ctx.services.count_handshake_dropped(reason)

    def _auth_failed(self, ip: str, key_id: str | None, reason: str, count: bool = True) -> None:
        """Count a failed authentication (``count``: towards the lockouts too) and log it in aggregate."""
        self.ctx.services.count_auth_failure(self.name, reason)
        locked = self.throttle.failure(ip, key_id) if count else False
        self.failure_log.note(ip, reason, locked)

    async def _flush_failure_log(self) -> None:
        while True:
            await asyncio.sleep(self.failure_log.interval_s)
            self.failure_log.flush()

    async def _status(self, link: Link, state: str, detail: str | None = None) -> None:
        await self.ctx.services.report_status(link.server, state, self.version,
                                              **self._status_fields(link, detail))

    @staticmethod
    def _status_fields(link: Link, detail: str | None = None) -> dict[str, Any]:
        """What the gateway knows of an agent's link, for its status record."""
        return {"agent_version": link.agent, "remote_address": link.remote, "detail": detail}

    # keys and records -----------------------------------------------------------------
    async def _watch_keys(self) -> None:
        async for key_id in self.ctx.services.watch_revoked_keys():
            for link in self.links.with_key(key_id):
                self.ctx.logger.warning("dropping agent %s: its key was rotated or revoked", link.server)
                await link.conn.close("the key was rotated or revoked", code="auth_failed", goaway=True)

    def _record(self) -> dict[str, Any]:
        """This gateway's record, as `fleetbus gateway info` shows it."""
        return {"address": self.address, "fingerprint": self.fingerprint,
                "ca_fingerprint": self.ca_fingerprint, "agents": len(self.links),
                "refresh_s": RECORD_EVERY_S, "updated": utcnow().isoformat()}

    def _cert_hosts(self) -> list[str]:
        """The names a certificate made for this gateway carries."""
        hosts = set(default_hosts()) | set(self.extra_hosts)
        if self.listen[0] not in ("0.0.0.0", "::", ""):
            hosts.add(self.listen[0])
        if self.advertise:
            hosts.add(str(self.advertise).rpartition(":")[0].strip("[]") or str(self.advertise))
        return sorted(h for h in hosts if h)

    async def _refresh(self) -> None:
        while True:
            try:
                await self.ctx.services.publish_gateway_record(self._record())
            except Exception as exc:
                self.ctx.logger.warning("could not publish the gateway record: %s", type(exc).__name__)
            for link in self._stale_links(time.monotonic()):
                if not link.conn.closed:
                    await self._status(link, "online")
                    link.status_at = time.monotonic()
            await asyncio.sleep(RECORD_EVERY_S)

    def _stale_links(self, now: float) -> list[Link]:
        """The links whose status is due, stalest first, at most this tick's share."""
        links = list(self.links.by_server.values())
        share = -(-len(links) * RECORD_EVERY_S // STATUS_EVERY_S)  # ceil
        due = [link for link in links if now - link.status_at >= STATUS_EVERY_S]
        due.sort(key=lambda link: link.status_at)
        return due[:int(share)]

    async def _trim_after_handshakes(self) -> None:
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            # Every connection accepted counts, shed ones too: a flood leaves freed heap.
            if self._gate is not None and self._gate.accepted != self._accepted_at_trim:
                self._accepted_at_trim = self._gate.accepted
                # In a thread: on a large heap it takes a few milliseconds the loop need not wait.
                if not await asyncio.to_thread(trim_heap):
                    return  # not glibc: nothing to do, ever

    # sessions ---------------------------------------------------------------------------
    async def open(self, server: Server, credential: Credential | None) -> Session:
        link = self.links.get(server.name)
        if link is None:
            raise ServerOffline(f"{server.name}'s agent is not connected to this gateway")
        return AgentSession(link.conn)
