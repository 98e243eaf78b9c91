"""One authenticated SSH connection to a server, possibly through jump hosts.

Blocking code: everything here runs in the host's thread pool (``ctx.run_blocking``).

We drive :class:`paramiko.Transport` directly rather than ``SSHClient``: that gives us
control of window and packet sizes, lets a hop run over a ``direct-tcpip`` channel of
the previous hop, and means nothing is read from ``~/.ssh``, no agent is asked and no
agent forwarding is requested. The host key is checked against the pin (see
:mod:`.hostkeys`) after key exchange and *before* any credential is sent.

A :class:`SshConnection` is shared by every command on its server (each uses its own
channels, like OpenSSH's ControlMaster). It reports itself dead as soon as the
transport (or a jump host's) is no longer active, and the host then opens a new one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import paramiko
from fleetbus.errors import AuthFailed, FleetbusError, ServerOffline, TransportError
from fleetbus.records import Server
from fleetbus.transport import Credential
from fleetbus_base.text import shorten
from paramiko.common import MSG_CHANNEL_REQUEST

from .auth import LoginRefused, authenticate, login_user
from .fastpath import BatchPacketizer
from .hostkeys import HostKeyPin, allowed_algorithms, check_host_key, parse_pins
from .settings import SshSettings

DEFAULT_PORT = 22
# How long a refused session channel is retried (see SshConnection.open_session).
_OPEN_RETRY_S = 3.0

# AES-GCM (an AEAD: no separate MAC pass) measured ~20% faster than paramiko's default
# first choice, aes128-ctr + hmac-sha2-256; the rest keep paramiko's order.
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

EXIT_SIGNAL_ATTR = "_fleetbus_exit_signal"
"""Where :func:`_channel_request` stores the signal name of an ``exit-signal``."""


def short(exc: BaseException) -> str:
    """A one-line description of ``exc`` for an error message (never multi-line)."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return shorten(exc.strerror, 200)
    return shorten((str(exc).splitlines() or [""])[0].strip(), 200) or type(exc).__name__


def _channel_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
    """paramiko's channel request handler, plus ``exit-signal``.

    paramiko ignores ``exit-signal`` (RFC 4254 6.10), so a command killed by a signal
    would look like one that reported no status at all. We record the signal name on
    the channel and wake whoever waits for the exit status; every other request goes
    to paramiko unchanged, read from the same position.
    """
    start = m.packet.tell()
    kind = m.get_text()
    if kind == "exit-signal":
        m.get_boolean()  # want_reply: always false for exit-signal
        setattr(chan, EXIT_SIGNAL_ATTR, m.get_text())
        chan.status_event.set()
        return
    m.packet.seek(start)
    paramiko.Channel._handle_request(chan, m)


class _Transport(paramiko.Transport):
    """A paramiko Transport that also understands ``exit-signal``.

    The dispatch table is paramiko-internal (unchanged from 1.x to 5.x); should it ever
    disappear, we keep paramiko's own behaviour and signals show as a missing status.
    """

    _channel_handler_table: ClassVar[dict[int, Any]] = {
        **getattr(paramiko.Transport, "_channel_handler_table", {}),
        MSG_CHANNEL_REQUEST: _channel_request,
    }


@dataclass(frozen=True)
class Hop:
    """One server on the way: the target itself, or a jump host in front of it."""

    server: Server
    credential: Credential | None
    jump_for: str | None = None  # the target's name when this hop is a jump host

    @property
    def port(self) -> int:
        return self.server.port or DEFAULT_PORT

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.port}"

    @property
    def context(self) -> str:
        return f" (jump host for {self.jump_for})" if self.jump_for else ""


class SshConnection:
    """An authenticated transport to the target, and the jump host transports under it."""

    def __init__(self, name: str, transport: paramiko.Transport, under: list[paramiko.Transport],
                 settings: SshSettings) -> None:
        self.name = name
        self.transport = transport
        self.under = under
        self.settings = settings
        self._closed = False
        # paramiko keeps one completion event for all global requests, so they must not
        # overlap.
        self._global_lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return (not self._closed and self.transport.is_active()
                and all(t.is_active() for t in self.under))

    @property
    def server_version(self) -> str | None:
        return getattr(self.transport, "remote_version", None)

    def open_session(self, window_size: int) -> paramiko.Channel:
        """A new session channel. Blocking; raises fleetbus errors.

        sshd frees a session only some time after both sides closed its channel (at the
        end of its event loop pass, after reaping the process), so an open that follows
        a close at once can be refused ("no more sessions") although we stay within
        MaxSessions. Refusals are therefore retried for a short while.
        """
        deadline = time.monotonic() + _OPEN_RETRY_S
        pause = 0.01
        while True:
            try:
                return self.transport.open_session(window_size=window_size,
                                                   max_packet_size=self.settings.max_packet_size,
                                                   timeout=self.settings.connect_timeout_s)
            except paramiko.ChannelException as exc:
                if time.monotonic() + pause > deadline or not self.alive:
                    raise TransportError(
                        f"{self.name} refused a new ssh channel: {exc.text or exc.code} (is its "
                        "sshd MaxSessions lower than the server's options.max_sessions?)"
                    ) from None
                time.sleep(pause)  # a worker thread: the event loop is not blocked
                pause = min(pause * 2, 0.25)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self.lost(exc) from None

    def lost(self, exc: BaseException | None = None) -> FleetbusError:
        """The error for an operation that failed because the connection broke."""
        if not self.alive:
            why = f": {short(exc)}" if exc is not None else ""
            return ServerOffline(f"lost the ssh connection to {self.name}{why}")
        return TransportError(f"ssh error on {self.name}: {short(exc) if exc else 'unknown'}")

    def ping(self, timeout_s: float) -> None:
        """One round trip to the server's sshd. Blocking.

        A global request with want-reply: the server must answer (OpenSSH answers an
        unknown request with REQUEST_FAILURE), which proves its sshd still processes our
        connection. paramiko waits for the answer without a time limit, so a watchdog
        closes the connection if none comes within ``timeout_s``: a connection that does
        not answer is dead for every other command too, and the host reopens it.
        """
        if not self.alive:
            raise ServerOffline(f"the ssh connection to {self.name} is closed")
        if not self._global_lock.acquire(timeout=timeout_s):
            raise TransportError(f"another ping to {self.name} is still waiting for its answer")
        expired = threading.Event()

        def give_up() -> None:
            expired.set()
            self.close()

        watchdog = threading.Timer(timeout_s, give_up)
        watchdog.daemon = True
        try:
            watchdog.start()
            self.transport.global_request("keepalive@openssh.com", wait=True)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self.lost(exc) from None
        finally:
            watchdog.cancel()
            self._global_lock.release()
        if expired.is_set():
            raise ServerOffline(f"{self.name} did not answer a ping within {timeout_s:g} s; "
                                "closed the connection")
        if not self.alive:
            raise ServerOffline(f"lost the ssh connection to {self.name}")

    def close(self) -> None:
        """Close the target transport, then the jump hosts under it. Blocking, idempotent."""
        self._closed = True
        for transport in [self.transport, *reversed(self.under)]:
            # Closing a broken transport may raise; it is closed anyway.
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                transport.close()


def _tune_socket(sock: socket.socket, settings: SshSettings) -> None:
    """Interactive latency and dead-peer detection on the TCP socket itself.

    paramiko's keepalive only *sends*; if the peer vanished without a reset, TCP would
    retransmit for ~15 minutes before the transport notices. TCP_USER_TIMEOUT bounds
    that, so ``alive`` turns False and the host reconnects within about a minute.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(settings.keepalive_s))
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle), ("TCP_KEEPCNT", 4),
                          ("TCP_USER_TIMEOUT", max(60, 4 * idle) * 1000)):
        if hasattr(socket, option):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            except OSError:
                pass


def _dial(hop: Hop, settings: SshSettings) -> socket.socket:
    if not hop.server.host:
        raise ServerOffline(f"{hop.server.name} has no host to connect to{hop.context}: "
                            "register it with --host")
    try:
        sock = socket.create_connection((hop.server.host, hop.port),
                                        timeout=settings.connect_timeout_s)
    except OSError as exc:
        raise ServerOffline(
            f"cannot reach {hop.server.name} at {hop.address}{hop.context}: {short(exc)}"
        ) from None
    _tune_socket(sock, settings)
    return sock


def _forward(through: paramiko.Transport, bastion: Hop, hop: Hop, settings: SshSettings) -> paramiko.Channel:
    """A ``direct-tcpip`` channel from the jump host ``bastion`` to ``hop``'s sshd."""
    if not hop.server.host:
        raise ServerOffline(f"{hop.server.name} has no host to connect to: register it with --host")
    try:
        return through.open_channel("direct-tcpip", (hop.server.host, hop.port), ("127.0.0.1", 0),
                                    window_size=settings.window_size,
                                    max_packet_size=settings.max_packet_size,
                                    timeout=settings.connect_timeout_s)
    except paramiko.ChannelException as exc:
        if exc.code == 1:  # administratively prohibited
            raise TransportError(
                f"jump host {bastion.server.name} refuses to forward to {hop.server.name} "
                f"at {hop.address} (AllowTcpForwarding?): {exc.text}"
            ) from None
        raise ServerOffline(
            f"cannot reach {hop.server.name} at {hop.address} through jump host "
            f"{bastion.server.name}: {exc.text or 'connect failed'}"
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise ServerOffline(
            f"jump host {bastion.server.name} failed while connecting to {hop.server.name}: "
            f"{short(exc)}"
        ) from None


def _handshake(hop: Hop, sock: Any, settings: SshSettings, logger: logging.Logger,
               refused: LoginRefused) -> paramiko.Transport:
    """Key exchange, host key check, authentication over ``sock``. Blocking."""
    name = hop.server.name
    pins: list[HostKeyPin] = parse_pins(hop.server.options.get("host_key"), name)
    transport = _Transport(sock, default_window_size=settings.window_size,
                           default_max_packet_size=settings.max_packet_size,
                           packetizer_class=BatchPacketizer)
    # paramiko logs (at ERROR, with tracebacks) what we also raise as a clear fleetbus
    # error; under our logger's name operators can tune or silence it with the rest.
    transport.set_log_channel(f"{logger.name}.paramiko")
    try:
        options = transport.get_security_options()
        algorithms = allowed_algorithms(pins, tuple(options.key_types))
        if algorithms:
            options.key_types = algorithms
        preferred = tuple(c for c in _FAST_CIPHERS if c in options.ciphers)
        options.ciphers = preferred + tuple(c for c in options.ciphers if c not in preferred)
        transport.banner_timeout = settings.connect_timeout_s
        transport.handshake_timeout = settings.connect_timeout_s
        transport.auth_timeout = settings.connect_timeout_s
        try:
            transport.start_client(timeout=settings.connect_timeout_s)
        except paramiko.IncompatiblePeer as exc:
            raise TransportError(f"cannot agree on ssh algorithms with {name}{hop.context}: {short(exc)}"
                                 + (" (it may not have the pinned host key type)" if algorithms else "")
                                 ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ServerOffline(
                f"cannot reach {name} at {hop.address}{hop.context}: ssh handshake failed: {short(exc)}"
            ) from None
        if not (transport.is_active() and transport.initial_kex_done):
            # start_client returns quietly when its timeout passes mid-handshake.
            raise ServerOffline(
                f"cannot reach {name} at {hop.address}{hop.context}: ssh handshake failed: "
                f"no answer within {settings.connect_timeout_s:g} s"
            )
        key = transport.get_remote_server_key()
        check_host_key(name, pins, key.get_name(), key.asbytes(), hop.jump_for)
        # Only now the credential: the host key is checked (and reported for pinning)
        # even for a server whose credential is not set up yet.
        user = login_user(name, hop.credential, hop.server.options.get("user"))
        assert hop.credential is not None  # login_user refuses None
        try:
            authenticate(transport, name, user, hop.credential, refused)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if isinstance(exc, paramiko.AuthenticationException):
                refused("bad_credentials")
                raise AuthFailed(f"ssh authentication failed for {user}@{name}{hop.context}") from None
            raise ServerOffline(
                f"lost the connection to {name}{hop.context} while authenticating: {short(exc)}"
            ) from None
        transport.set_keepalive(max(1, int(settings.keepalive_s)))
        logger.debug("ssh connected to %s as %s (%s)", name, user, transport.remote_version)
        return transport
    except BaseException:
        transport.close()
        raise


def connect(hops: list[Hop], settings: SshSettings, logger: logging.Logger,
            refused: LoginRefused) -> SshConnection:
    """Connect through ``hops`` (jump hosts first, the target last). Blocking.

    ``refused`` hears of every login a hop refuses (for the auth-failure metric).

    Errors name the hop that failed: a jump host's unreachable address, unknown host key
    or refused credential is reported as that jump host's.
    """
    transports: list[paramiko.Transport] = []
    sock: Any = None
    try:
        for index, hop in enumerate(hops):
            if index == 0:
                sock = _dial(hop, settings)
            else:
                sock = _forward(transports[-1], hops[index - 1], hop, settings)
            transports.append(_handshake(hop, sock, settings, logger, refused))
            sock = None  # owned by its transport now
        return SshConnection(hops[-1].server.name, transports[-1], transports[:-1], settings)
    except BaseException:
        if sock is not None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                sock.close()
        for transport in reversed(transports):
            transport.close()
        raise
