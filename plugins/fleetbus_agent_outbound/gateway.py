"""The ``agent-outbound`` transport: the TLS gateway outbound agents dial into.

When an agent proves a server's key, this process starts serving that server's bus
subjects (``ctx.serve``); when the connection goes, it stops. So NATS routes each
server's commands to whichever gateway holds its agent, and a second gateway process
on the same NATS needs no extra code. A second connection with the same key replaces
the first. The gateway watches the key bucket and drops a connection whose key was
rotated or revoked at once.

Settings (``ctx.settings``): ``listen`` ("HOST:PORT", default "0.0.0.0:7443"),
``advertise`` (the address agents should dial, default this host's name and the port),
``heartbeat_s`` (5), ``handshake_timeout_s`` (5), ``max_handshakes`` (64: agents in
their TLS and key handshake at once; more wait, accepted), ``create_cert`` (True: make a
CA and certificate on first start when none exists).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
import time
from collections import deque
from typing import Any

from fleetbus import __version__
from fleetbus.agentlink import AgentSession
from fleetbus.certs import GatewayFiles, create_gateway_identity, fingerprint_pem, server_context
from fleetbus.errors import AuthFailed, InvalidRequest, ServerOffline
from fleetbus.records import Server, utcnow
from fleetbus.transport import Credential, Session, Transport
from fleetbus_agent.heap import trim_heap
from fleetbus_agent.protocol import (
    Accepted,
    AuthError,
    Connection,
    HandshakeError,
    controller_handshake,
    shrink_tls_buffers,
)
from fleetbus_agent.throttle import FailureThrottle
from nats.js.kv import KV_DEL, KV_PURGE

from .links import Link, Links

# Connections accepted per wake-up of the listening socket at most (asyncio's own
# server accepts up to its backlog); and how long to stop accepting when the process
# is out of descriptors or memory.
ACCEPT_BATCH = 128
ACCEPT_RETRY_S = 1.0
_ACCEPT_LATER = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

RECORD_EVERY_S = 20.0
# How often each connected agent's status (its last_seen) is written again. It was every
# 30 s for all links at once: with 5,000 agents, 10,000 JetStream requests in a burst
# every 30 s (a status read and write each), about a fifth of an idle gateway's CPU. Now
# each record tick writes the stalest share, so every link is refreshed about this often
# and the writes are spread out. The core's server checks (every 30 s by default) also
# set last_seen.
STATUS_EVERY_S = 300.0
# Every TLS handshake, failed ones too, allocates and frees OpenSSL and asyncio state
# between the allocations of connections that stay. After thousands of agents connect
# at once (a gateway restart), glibc held more free heap than live data (hand run with
# 5,000 agents: 349 MiB free of 484 MiB); it never returns freed memory that sits below
# live allocations, malloc_trim does.
TRIM_EVERY_S = 10.0
# Agents in their handshake (TLS, hello, key check) at once; the rest wait, accepted,
# with no TLS state yet (see Admission). When 5,000 agents dialled at once, every
# handshake ran at the same time, most missed their deadlines and started over (about
# 10,000 failed handshakes, 150 s until all were in).
MAX_HANDSHAKES = 64
_TCP_ESTABLISHED = 1


class Admission:
    """At most ``limit`` handshakes at once; of the connections waiting, the newest goes next.

    Newest first, because an agent gives up on a connect that takes too long (10 s) and
    dials again: under a storm a first-come queue hands every free slot to the
    connection closest to being abandoned, and can end up serving almost only those.
    A connection that waited ``max_wait`` seconds is turned away; its agent retries.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting = 0
        """Connections waiting for a slot right now."""
        self._waiting: deque[asyncio.Future[bool]] = deque()

    async def acquire(self, max_wait: float) -> bool:
        """Take a slot (True) or give up after ``max_wait`` seconds (False)."""
        # A free slot is taken at once, waiters or not: the newest connection goes first
        # anyway, and a slot is only ever free while no live waiter is left.
        if self.active < self.limit:
            self.active += 1
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        # Timed-out waiters are the oldest, at the left end: dropped here, in O(1) each.
        while self._waiting and self._waiting[0].done():
            self._waiting.popleft()
        self._waiting.append(fut)
        self.waiting += 1
        timer = loop.call_later(max_wait, _resolve, fut, False)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise
        finally:
            timer.cancel()
            self.waiting -= 1

    def release(self) -> None:
        """Give the slot to the newest waiting connection, or free it."""
        while self._waiting:
            fut = self._waiting.pop()
            if not fut.done():
                fut.set_result(True)
                return
        self.active -= 1


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _peer_gone(sock: socket.socket) -> bool:
    """True when the peer already closed or reset the TCP connection (Linux; else False)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
    except OSError:
        return False
    return state != _TCP_ESTABLISHED


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


class GatewayTransport(Transport):
    name = "agent-outbound"
    version = __version__
    description = "fleetbus agents that dial out to this TLS gateway (behind NAT and firewalls)"
    serves_registered = False

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.links = Links()
        self.throttle = FailureThrottle()
        self._listener: socket.socket | None = None
        self._accept_paused: asyncio.TimerHandle | None = None
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
        self.max_handshakes = max(1, int(settings.get("max_handshakes", MAX_HANDSHAKES)))
        self.admission = Admission(self.max_handshakes)
        self._tls: ssl.SSLContext | None = None
        self.advertise = settings.get("advertise")

    # lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        shrink_tls_buffers()
        services = self.ctx.services
        files = GatewayFiles.of(services.home)
        if not files.exists() and self.create_cert:
            create_gateway_identity(services.home, services.master)
        self._tls = server_context(files, services.master)
        self.fingerprint = fingerprint_pem(files.cert.read_bytes())
        host, port = self.listen
        try:
            # Accepted by hand and held as plain sockets until a handshake slot is free:
            # no event loop reads a byte (the ClientHello) of a waiting connection, so
            # its TLS handshake finds it in the kernel. An asyncio server would hand
            # each connection to a transport that, on uvloop, starts reading at once.
            self._listener = _listen(host, port)
        except OSError as exc:
            raise InvalidRequest(
                f"the gateway cannot listen on {host}:{port}: {exc.strerror} "
                "(pass --gateway-listen to choose another address)") from None
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)
        self.ctx.services.metrics.handshakes_waiting.set_function(lambda: self.admission.waiting)
        bound = self._listener.getsockname()
        self.address = self.advertise or f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{bound[1]}"
        self.bound_port = bound[1]
        self._tasks = [asyncio.create_task(self._watch_keys()), asyncio.create_task(self._refresh()),
                       asyncio.create_task(self._trim_after_handshakes())]
        self.ctx.logger.info("gateway listening on %s:%s (agents dial %s, pin %s)",
                             host, bound[1], self.address, self.fingerprint)

    async def stop(self) -> None:
        if self._listener is not None:
            self._stop_accepting()
            self._listener.close()
            self._listener = None
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
    def _accept_ready(self) -> None:
        """The listening socket is readable: accept what is queued (as asyncio does)."""
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_LATER:
                    # Out of descriptors or memory: retrying at once would spin.
                    self.ctx.logger.warning("the gateway cannot accept connections for now (%s); "
                                            "trying again in %g s", exc.strerror, ACCEPT_RETRY_S)
                    self._stop_accepting()
                    self._accept_paused = asyncio.get_running_loop().call_later(
                        ACCEPT_RETRY_S, self._resume_accepting)
                    return
                continue  # that one connection failed (ECONNABORTED and the like)
            conn.setblocking(False)
            self._accepted(conn)

    def _stop_accepting(self) -> None:
        assert self._listener is not None
        asyncio.get_running_loop().remove_reader(self._listener.fileno())
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None

    def _resume_accepting(self) -> None:
        self._accept_paused = None
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)

    def _accepted(self, conn: socket.socket) -> None:
        self._accepted_since_trim += 1
        task = asyncio.get_running_loop().create_task(self._accept(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _accept(self, conn: socket.socket) -> None:
        try:
            streams = await self._admit(conn)
        except BaseException:
            conn.close()  # cancelled (the gateway is stopping) or a bug: no half-open peer
            raise
        if streams is not None:
            await self._run_link(*streams)

    async def _admit(self, conn: socket.socket) -> tuple[Any, ...] | None:
        """Wait for a handshake slot, then TLS and hello; the link's parts, or None."""
        try:
            peer = conn.getpeername()
        except OSError:
            peer = ("?", 0)  # already gone: the handshake finds out
        ip, remote = str(peer[0]), f"{peer[0]}:{peer[1]}"
        if self.throttle.blocked_for(ip) > 0:
            self.ctx.services.metrics.auth_failures.labels(self.name, "locked_out").inc()
            conn.close()  # locked out: no handshake, no key check, no cost
            return None
        if not await self.admission.acquire(self.handshake_timeout_s):
            self._dropped("waited")
            conn.close()  # waited too long: its agent is about to give up and retry
            return None
        try:
            return await self._handshake(conn, ip, remote)
        finally:
            self.admission.release()

    async def _handshake(self, conn: socket.socket, ip: str, remote: str) -> tuple[Any, ...] | None:
        """TLS, then hello/welcome with the key check; None when it failed."""
        if _peer_gone(conn):
            # It gave up while waiting for a slot (its connect timeout): a handshake
            # with it would cost the key exchange and fail anyway.
            self._dropped("gone")
            conn.close()
            return None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            tls, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._tls, ssl_handshake_timeout=self.handshake_timeout_s)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._dropped("tls")
            self.ctx.logger.debug("TLS handshake from %s failed: %s", remote, exc)
            conn.close()
            return None
        writer = asyncio.StreamWriter(tls, protocol, reader, loop)
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
            if not isinstance(exc, AuthError):
                self._dropped("hello")
            self.ctx.logger.debug("handshake from %s failed: %s", remote, getattr(exc, "message", exc))
            return None
        return reader, writer, accepted, matched["key_id"], remote

    async def _run_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        accepted: Accepted, key_id: str, remote: str) -> None:
        conn = Connection.from_accepted(reader, writer, accepted)
        agent = str(accepted.hello.get("agent", "?"))[:100]
        link = Link(server=accepted.server, conn=conn, key_id=key_id, remote=remote, agent=agent)
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
        link.status_at = time.monotonic()
        self.ctx.logger.info("agent %s connected from %s (%s)", link.server, remote, agent)
        await conn.wait_closed()
        removed = self.links.remove(link)
        metrics.agents.set(len(self.links))
        if removed:
            await self.ctx.unserve(link.server)
            await self._status(link, "offline", detail=conn.close_reason)
        self.ctx.logger.info("agent %s disconnected: %s", link.server, conn.close_reason)

    def _dropped(self, reason: str) -> None:
        self.ctx.services.metrics.handshakes_dropped.labels(reason).inc()

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
        while True:
            record = {"worker": self.ctx.services.worker_id, "address": self.address,
                      "fingerprint": self.fingerprint, "agents": len(self.links),
                      "updated": utcnow().isoformat()}
            try:
                await self.ctx.services.gateways.put(self._record_key(), json.dumps(record).encode())
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
