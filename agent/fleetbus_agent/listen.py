"""Inbound mode: listen for fleetbus, check its proof of the server's key, then serve.

The agent is the TLS server, presenting its own certificate (:mod:`.tlsid`); fleetbus
(the ``agent-inbound`` transport) pins that certificate's fingerprint and connects in.
Before the agent runs anything, the controller must answer the agent's challenge with an
HMAC proof over it, keyed with the server's secret key and bound to the agent's
certificate fingerprint (:func:`.protocol.agent_accept_handshake`), so neither a
stranger nor a man in the middle holding another certificate gets in, and the key itself
never crosses the wire.

Several controllers (several fleetbus workers) may be connected at once; each connection
runs operations independently. Wrong proofs are throttled per source address
(:class:`.throttle.FailureThrottle`): a locked-out address is dropped as soon as it
connects. On stop the listener closes, each connection is told ``goaway``, and the
operations in flight are cancelled with their connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Set, Tuple

from . import DEFAULT_LISTEN_BIND, DEFAULT_LISTEN_PORT, __version__, protocol
from .handlers import Handler
from .paths import PathPolicy
from .protocol import AuthError, Connection, HandshakeError, shrink_tls_buffers
from .throttle import FailureThrottle
from .tlsid import TLSIdentity, load_identity

log = logging.getLogger("fleetbus_agent.listen")

DEFAULT_BIND = DEFAULT_LISTEN_BIND
DEFAULT_PORT = DEFAULT_LISTEN_PORT
STOP_TIMEOUT_S = 5.0


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
    tls_handshake_timeout_s: float = 5.0

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


def _address(peer: Any) -> Tuple[str, str]:
    """(ip, "ip:port") of a peername, for throttling and for messages."""
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        ip = str(peer[0])
        return ip, (f"[{ip}]:{peer[1]}" if ":" in ip else f"{ip}:{peer[1]}")
    return "?", "?"


def _abort(writer: asyncio.StreamWriter) -> None:
    """Abort unless the handshake already closed it (which lets its error frame out)."""
    if not writer.is_closing():
        writer.transport.abort()


class Listener:
    """The accepting side of inbound mode; :func:`run_listen` drives one."""

    def __init__(self, opts: ListenOptions, identity: TLSIdentity,
                 handler: Optional[Handler] = None,
                 throttle: Optional[FailureThrottle] = None) -> None:
        self.opts = opts
        self.identity = identity
        self.handler = handler or Handler(paths=PathPolicy(opts.allow_paths))
        self.throttle = throttle or FailureThrottle()
        self.server: Optional[asyncio.AbstractServer] = None
        self.connections: Set[Connection] = set()
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def start(self) -> ListenReady:
        ctx = self.identity.server_context()
        self.server = await asyncio.start_server(
            self._accept, self.opts.bind, self.opts.port, ssl=ctx,
            ssl_handshake_timeout=self.opts.tls_handshake_timeout_s,
        )
        sockname = self.server.sockets[0].getsockname()
        return ListenReady(host=self.opts.bind, port=int(sockname[1]),
                           fingerprint=self.identity.fingerprint)

    async def stop(self) -> None:
        """Stop accepting, tell every controller goaway, cancel what is in flight."""
        self._stopping = True
        if self.server is not None:
            self.server.close()
        conns = list(self.connections)
        if conns:
            await asyncio.gather(
                *(c.close("the agent is stopping", goaway=True) for c in conns),
                return_exceptions=True,
            )
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        if self.server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), STOP_TIMEOUT_S)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:  # a bug here must cost one connection, not the listener
            log.exception("serving a controller failed")
            writer.transport.abort()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip, remote = _address(writer.get_extra_info("peername"))
        if self._stopping:
            writer.transport.abort()
            return
        blocked = self.throttle.blocked_for(ip)
        if blocked > 0:
            log.debug("dropping %s: locked out for %.0f s more", remote, blocked)
            writer.transport.abort()  # no handshake, no proof check, no cost
            return
        try:
            welcome = await protocol.agent_accept_handshake(
                reader, writer, key=self.opts.key,
                certificate_fingerprint=self.identity.fingerprint,
                # The challenge goes to anyone who can connect, before any proof, so it
                # carries no facts about this host; `info` gives them to a proven peer.
                facts={}, agent=f"fleetbus-agent/{__version__}",
                timeout=self.opts.handshake_timeout_s,
            )
        except AuthError:
            locked = self.throttle.failure(ip)
            log.warning("controller at %s failed to prove the server key%s", remote,
                        "; locked out for a while" if locked else "")
            _abort(writer)
            return
        except HandshakeError as exc:
            log.info("handshake with %s failed: %s", remote, exc.message)
            _abort(writer)
            return
        except (OSError, EOFError) as exc:
            log.info("handshake with %s failed: %s", remote, type(exc).__name__)
            _abort(writer)
            return
        self.throttle.success(ip)
        if self.opts.heartbeat_s:
            welcome = dataclasses.replace(welcome, heartbeat_s=float(self.opts.heartbeat_s))
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
    shrink_tls_buffers()
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
