"""Inbound mode: listen for fleetbus, check its proof of the server's key, then serve.

The agent is the TLS server, presenting its own certificate (:mod:`.tlsid`); fleetbus
(the ``agent-inbound`` transport) pins that certificate's fingerprint and connects in.
Before the agent runs anything, the controller must answer the agent's challenge with an
HMAC proof over it, keyed with the server's secret key and bound to the agent's
certificate fingerprint (:func:`fleetbus_base.wire.agent_accept_handshake`), so neither a
stranger nor a man in the middle holding another certificate gets in, and the key itself
never crosses the wire.

Several controllers (several fleetbus workers) may be connected at once; each connection
runs operations independently. Before a controller has proved anything,
:class:`.admission.Gate` decides whether and when it gets a handshake (fair per source
address, capped, one deadline for TLS and proof, within the process's descriptor
budget, whose soft limit is raised to the hard one at start). Wrong proofs are throttled
per source address (:class:`.throttle.AuthThrottle`; see ``PROOF`` for why not for the
key as a whole); a locked-out address is dropped as soon as it connects, and failures
are logged in aggregate. On stop the listener closes, each
connection is told ``goaway``, and the operations in flight are cancelled with their
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from fleetbus_base import wire as protocol
from fleetbus_base.admission import Gate, GateSettings
from fleetbus_base.fdbudget import raise_nofile_limit
from fleetbus_base.heap import trim_heap
from fleetbus_base.throttle import AuthThrottle, FailureLog
from fleetbus_base.wire import AuthError, Connection, HandshakeError, Welcome
from fleetbus_base.wire.connection import AGENT_PINGS_VERSION

from . import DEFAULT_LISTEN_BIND, DEFAULT_LISTEN_PORT, __version__
from .handlers import Handler
from .paths import PathPolicy
from .tlsid import TLSIdentity, load_identity

log = logging.getLogger("fleetbus_agent.listen")

DEFAULT_BIND = DEFAULT_LISTEN_BIND
DEFAULT_PORT = DEFAULT_LISTEN_PORT
STOP_TIMEOUT_S = 5.0
# Wrong proofs are throttled per source address, not for the key from any address: a
# listening agent has one key, so a key-wide lock would let a stranger with 20 guesses
# shut out every controller that has not proved the key since the agent started. An
# HMAC proof of a 256-bit key cannot be guessed online; the Gate bounds what guesses cost.
PROOF = None
# A listening agent expects a few controllers (fleetbus workers), not thousands of
# agents: smaller admission limits than the gateway's.
MAX_HANDSHAKES = 16
MAX_UNAUTHENTICATED = 256
MAX_UNAUTHENTICATED_PER_ADDRESS = 32
PENALISED_PER_ADDRESS = 4
# Every TLS handshake, failed ones too, leaves freed heap between live allocations that
# glibc keeps; after a flood of connections it is given back (malloc_trim) this often.
TRIM_EVERY_S = 10.0


@dataclass
class ListenOptions:
    """What ``fleetbus-agent listen`` was asked to do.

    ``tls_dir`` holds the agent's own certificate (``agent-tls.pem``/``agent-tls.key``),
    made on first start; ``cert_file``/``key_file`` are an operator's instead.
    ``heartbeat_s`` overrides, for this agent's side only, the heartbeat interval the
    controller announces (None: use the controller's).
    """

    key: str
    bind: str = DEFAULT_BIND
    port: int = DEFAULT_PORT
    tls_dir: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    new_cert: bool = False
    allow_paths: List[str] = field(default_factory=list)
    heartbeat_s: Optional[float] = None
    handshake_timeout_s: float = 5.0
    """One deadline for TLS and the proof together, from when a handshake slot is given."""
    max_handshakes: int = MAX_HANDSHAKES
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    max_unauthenticated_per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS
    auth_log_interval_s: float = 60.0

    def admission(self) -> GateSettings:
        """The limits on controllers that have not proved the key yet."""
        return GateSettings(
            max_handshakes=self.max_handshakes, max_unauthenticated=self.max_unauthenticated,
            max_per_source=self.max_unauthenticated_per_address,
            handshake_timeout_s=self.handshake_timeout_s, wait_s=self.handshake_timeout_s,
            silent_s=self.handshake_timeout_s)

    def __repr__(self) -> str:  # the key stays out of any log or traceback
        return (f"ListenOptions(bind={self.bind!r}, port={self.port}, tls_dir={self.tls_dir!r}, "
                f"allow_paths={self.allow_paths!r})")


@dataclass(frozen=True)
class ListenReady:
    """Passed to ``ready`` once the agent listens: the bound address and the fingerprint."""

    host: str
    port: int
    fingerprint: str

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def identity_for(opts: ListenOptions) -> TLSIdentity:
    """Load (or on first start create) the TLS identity ``opts`` describe.

    Raises :class:`.tlsid.TLSIdentityError` with a one-line message.
    """
    return load_identity(opts.key, tls_dir=opts.tls_dir, cert_file=opts.cert_file,
                         key_file=opts.key_file, new_cert=opts.new_cert)


def _remote(peer: Any) -> str:
    """"ip:port" of a peername, for messages."""
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        ip = str(peer[0])
        return f"[{ip}]:{peer[1]}" if ":" in ip else f"{ip}:{peer[1]}"
    return "?"


def _abort(writer: asyncio.StreamWriter) -> None:
    """Abort unless the handshake already closed it (which lets its error frame out)."""
    if not writer.is_closing():
        writer.transport.abort()


def _bind(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket (what asyncio.start_server would bind)."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=512)
    sock.setblocking(False)
    return sock


@dataclass
class _Turn:
    """The proof checks of one address, one at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Listener:
    """The accepting side of inbound mode; :func:`run_listen` drives one."""

    def __init__(self, opts: ListenOptions, identity: TLSIdentity,
                 handler: Optional[Handler] = None,
                 throttle: Optional[AuthThrottle] = None) -> None:
        self.opts = opts
        self.identity = identity
        self.handler = handler or Handler(paths=PathPolicy(opts.allow_paths))
        self.throttle = throttle or AuthThrottle()
        self.failures = FailureLog(log, "controller authentication", "controller authentications",
                                   interval_s=opts.auth_log_interval_s)
        self.gate: Optional[Gate[Tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome, str]]] = None
        self.connections: Set[Connection] = set()
        self._tls: Optional[ssl.SSLContext] = None
        self._tasks: List[asyncio.Future[None]] = []
        self._proof_turns: Dict[str, _Turn] = {}
        self._stopping = False

    async def start(self) -> ListenReady:
        self._tls = self.identity.server_context()
        sock = _bind(self.opts.bind, self.opts.port)
        self.gate = Gate(sock, self.opts.admission(), self._handshake, self._serve, log=log,
                         source_cap=self._source_cap)
        self.gate.start()
        self._tasks = [asyncio.ensure_future(self._flush_failures()),
                       asyncio.ensure_future(self._trim_after_accepts())]
        return ListenReady(host=self.opts.bind, port=int(sock.getsockname()[1]),
                           fingerprint=self.identity.fingerprint)

    async def stop(self) -> None:
        """Stop accepting, tell every controller goaway, cancel what is in flight."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        conns = list(self.connections)
        if conns:
            await asyncio.gather(
                *(c.close("the agent is stopping", goaway=True) for c in conns),
                return_exceptions=True,
            )
        if self.gate is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.gate.aclose(), STOP_TIMEOUT_S)
        self.failures.flush()

    def _source_cap(self, ip: str) -> int:
        if self.throttle.penalised(ip):
            return PENALISED_PER_ADDRESS
        return self.opts.max_unauthenticated_per_address

    async def _flush_failures(self) -> None:
        while True:
            await asyncio.sleep(self.failures.interval_s)
            self.failures.flush()

    async def _trim_after_accepts(self) -> None:
        seen = 0
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            assert self.gate is not None
            if self.gate.accepted != seen:
                seen = self.gate.accepted
                if not trim_heap():
                    return  # not glibc: nothing to do, ever

    async def _handshake(self, sock: socket.socket, ip: str, deadline: float
                         ) -> Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome, str]]:
        """TLS, then the challenge and the controller's proof, by ``deadline``; None if it failed."""
        try:
            remote = _remote(sock.getpeername())
        except OSError:
            remote = ip
        if self._stopping or self.throttle.locked(ip, PROOF):
            if not self._stopping:
                self.failures.note(ip, "locked_out")
            sock.close()  # no handshake, no proof check, no cost
            return None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol_ = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol_, sock, ssl=self._tls,
                ssl_handshake_timeout=max(0.001, deadline - time.monotonic()))
        except (asyncio.TimeoutError, OSError, ssl.SSLError) as exc:
            log.debug("TLS handshake with %s failed: %s", remote, type(exc).__name__)
            sock.close()
            return None
        writer = asyncio.StreamWriter(transport, protocol_, reader, loop)
        # One proof check at a time per address: a failure is known only once the
        # handshake has closed the connection, so checks in parallel would let one
        # address make any number of guesses before its lockout applies.
        turn = self._proof_turns.get(ip)
        if turn is None:
            turn = self._proof_turns[ip] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                return await self._prove(reader, writer, ip, remote, deadline)
        finally:
            turn.users -= 1
            if not turn.users:
                del self._proof_turns[ip]

    async def _prove(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str,
                     remote: str, deadline: float
                     ) -> Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome, str]]:
        """The challenge and the controller's proof, by ``deadline``; None if it failed."""
        if self.throttle.locked(ip, PROOF):  # locked by the check this one waited for
            self.failures.note(ip, "locked_out")
            _abort(writer)
            return None
        try:
            welcome = await protocol.agent_accept_handshake(
                reader, writer, key=self.opts.key,
                certificate_fingerprint=self.identity.fingerprint,
                # The challenge goes to anyone who can connect, before any proof, so it
                # carries no facts about this host; `info` gives them to a proven peer.
                facts={}, agent=f"fleetbus-agent/{__version__}",
                timeout=max(0.001, deadline - time.monotonic()),
            )
        except AuthError:
            self.failures.note(ip, "wrong_proof", self.throttle.failure(ip, PROOF))
            _abort(writer)
            return None
        except HandshakeError as exc:
            log.debug("handshake with %s failed: %s", remote, exc.message)
            _abort(writer)
            return None
        except (OSError, EOFError, asyncio.TimeoutError) as exc:
            log.debug("handshake with %s failed: %s", remote, type(exc).__name__)
            _abort(writer)
            return None
        self.throttle.success(ip, PROOF)
        return reader, writer, welcome, remote

    async def _serve(self, parts: Tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome, str]) -> None:
        reader, writer, welcome, remote = parts
        try:
            await self._run(reader, writer, welcome, remote)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:  # a bug here must cost one connection, not the listener
            log.exception("serving a controller failed")
            writer.transport.abort()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   welcome: Welcome, remote: str) -> None:
        if self.opts.heartbeat_s:
            ours = float(self.opts.heartbeat_s)
            if welcome.version >= AGENT_PINGS_VERSION:
                # From version 3 this side's pings keep the link alive and the controller
                # drops it after 3 of *its* intervals: ours may only be shorter.
                ours = min(ours, welcome.heartbeat_s)
            welcome = dataclasses.replace(welcome, heartbeat_s=ours)
        conn = Connection.from_welcome(reader, writer, welcome, on_open=self.handler)
        self.connections.add(conn)
        try:
            if self._stopping:
                await conn.close("the agent is stopping", goaway=True)
                return
            conn.start()
            log.info("controller connected from %s (as server %s); %d connected",
                     remote, welcome.server, len(self.connections))
            await conn.wait_closed()
        finally:
            self.connections.discard(conn)
        log.info("controller at %s disconnected: %s", remote, conn.close_reason)


async def run_listen(opts: ListenOptions, stop: asyncio.Event,
                     ready: Optional[Callable[[ListenReady], Any]] = None,
                     *, identity: Optional[TLSIdentity] = None,
                     handler: Optional[Handler] = None) -> None:
    """Listen until ``stop`` is set.

    ``identity`` is loaded from ``opts`` when not given (which may run ``openssl`` once,
    on first start). ``ready(ListenReady)`` is called once the socket is bound (with the
    real port when ``opts.port`` is 0). Raises :class:`OSError` when the address cannot
    be bound and :class:`.tlsid.TLSIdentityError` when the identity cannot be loaded.
    """
    raise_nofile_limit()
    if identity is None:
        identity = identity_for(opts)
    listener = Listener(opts, identity, handler=handler)
    info = await listener.start()
    log.info("listening on %s; certificate fingerprint %s (pid %d)",
             info.address, info.fingerprint, os.getpid())
    try:
        if ready is not None:
            ready(info)
        await stop.wait()
    finally:
        await listener.stop()
        log.info("stopped")
