"""Outbound mode: dial a gateway, prove the server's key, serve until told to stop.

The agent verifies the gateway first (a CA file, a pinned certificate fingerprint, or
both) and only then sends its key, inside TLS. A pinned fingerprint may be the gateway
certificate's or its CA's: for the CA's, the agent asks the gateway for the CA first
(TLS with the server name ``CA_PROBE_NAME``: the gateway presents the CA certificate,
proving it holds the CA key), checks the pin against it, and from then on verifies
every gateway's certificate against that CA, so any gateway of the deployment is
accepted.

Several gateways (each ``--gateway``, and every address a name resolves to) are tried
in order; after a connection drops or an attempt fails the agent moves to the next
one a moment later, and backs off (jittered, exponential, reset after a connection that
stayed up) only after every gateway failed in turn. Operations in flight when a
connection drops are cancelled here (their results could not be delivered), and the
gateway fails them with ``server_offline``, so none runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from fleetbus_base.digests import compare_digest, sha256_hex
from fleetbus_base.ops.facts import server_facts
from fleetbus_base.wire import AuthError, Connection, HandshakeError, agent_handshake

from . import __version__
from .handlers import Handler

log = logging.getLogger("fleetbus_agent.connect")

CONNECT_TIMEOUT_S = 10.0
# With more than one gateway to try, a gateway whose host does not answer at all (down,
# packets dropped) is given up on sooner: the TCP connect alone gets this long, so its
# agents reach another within seconds. TLS and the hello still get CONNECT_TIMEOUT_S,
# since a busy gateway (thousands of agents reconnecting) makes new ones wait for a
# handshake slot and giving up there only sends them round again.
TCP_CONNECT_TIMEOUT_MANY_S = 3.0
STABLE_AFTER_S = 30.0
CA_PROBE_NAME = "ca.fleetbus.invalid"
"""The TLS server name under which a gateway presents its CA certificate instead of its own."""


@dataclass
class ConnectOptions:
    host: str
    port: int
    key: str
    ca_file: Optional[str] = None
    fingerprint: Optional[str] = None  # "sha256:<hex>"
    server_hostname: Optional[str] = None
    backoff_min_s: float = 0.5
    # 15 s, not 30: after a gateway restart the last agents back were the ones asleep in
    # a 30 s backoff (15,000 agents: all back 69.6 s after the kill against 89.5 s).
    backoff_max_s: float = 15.0
    more_gateways: List[Tuple[str, int]] = field(default_factory=list)
    """Gateways after ``host``:``port``, in the order they are tried."""
    more_fingerprints: List[str] = field(default_factory=list)
    """Further accepted pins (a CA's and an old gateway certificate's, while moving)."""
    source_address: Optional[str] = None
    """The local address to dial from (a host with several), else the kernel's choice."""

    def __repr__(self) -> str:  # the key stays out of any log or traceback
        return f"ConnectOptions(host={self.host!r}, port={self.port})"

    @property
    def gateways(self) -> List[Tuple[str, int]]:
        return [(self.host, self.port), *self.more_gateways]

    def pins(self) -> List[str]:
        return [normalize_fingerprint(p) for p in (self.fingerprint, *self.more_fingerprints) if p]


@dataclass
class Target:
    """One address to dial: ``host`` as given (for TLS), ``address`` as resolved."""

    host: str
    port: int
    address: str


class Trust:
    """What the agent learnt while running: the pinned CA, once a gateway showed it, and
    the TLS contexts for the pinned paths, made once instead of per attempt (making one
    and loading the CA into it was a fifth of an agent's CPU in a reconnect storm)."""

    def __init__(self) -> None:
        self.ca_der: Optional[bytes] = None
        self._pinned_ctx: Optional[ssl.SSLContext] = None
        self._ca_ctx: Optional[ssl.SSLContext] = None

    def pinned_context(self, opts: ConnectOptions) -> ssl.SSLContext:
        """The context for a pinned gateway (checked after the handshake); a ``--ca``
        file is read again each attempt, so a renewed one is picked up."""
        if opts.ca_file:
            return client_context(opts)
        if self._pinned_ctx is None:
            self._pinned_ctx = client_context(opts)
        return self._pinned_ctx

    def ca_context(self, server_hostname: Optional[str]) -> ssl.SSLContext:
        """The context that verifies gateways against the learnt CA."""
        if self._ca_ctx is None:
            self._ca_ctx = _ca_context(self.ca_der or b"", server_hostname)
        return self._ca_ctx


def normalize_fingerprint(value: str) -> str:
    text = value.strip().lower()
    text = text.removeprefix("sha256:")
    text = text.replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("a fingerprint is sha256: followed by 64 hex digits")
    return text


def client_context(opts: ConnectOptions) -> ssl.SSLContext:
    if opts.ca_file:
        ctx = ssl.create_default_context(cafile=opts.ca_file)
        ctx.check_hostname = True
    elif opts.fingerprint:
        # The pin is checked right after the TLS handshake, before anything is sent.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        raise ValueError("give --ca or --fingerprint: the agent never talks to an unverified gateway")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def peer_fingerprint(writer: asyncio.StreamWriter) -> str:
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return sha256_hex(der or b"")


def _sni_name(host: str) -> Union[str, bytes]:
    """The name for TLS (SNI and, with --ca, the certificate check).

    ``ssl`` encodes a str name with the ``idna`` codec, whose import pulls in
    ``unicodedata`` and ``stringprep`` (about 0.4 MiB an idle agent keeps for good); an
    ASCII name given as bytes is used as it is, and that is what IDNA would produce.
    """
    return host.encode("ascii") if host.isascii() else host


def _jitter() -> float:
    """A factor in [0.5, 1.0): ``random`` costs an idle agent 0.2 MiB for one number
    per reconnect, and the jitter needs no more than two random bytes."""
    return 0.5 + int.from_bytes(os.urandom(2), "big") / 131072


def backoff_delay(opts: ConnectOptions, attempt: int) -> float:
    """Seconds to wait after ``attempt`` failed rounds (0 first): anywhere between half
    the minimum and a ceiling that doubles from ``backoff_min_s`` to ``backoff_max_s``.

    Drawn over the whole range ("full jitter"), not its upper half: after a gateway
    restart thousands of agents back off together, and while the gateway works through
    them each one turned away is a connection and a TLS hello spent on both sides. Spread
    wide, they arrive at an even pace and the last come back sooner (15,000 agents of
    the bench's reconnect storm: docs/performance.md).
    """
    ceiling = min(opts.backoff_max_s, opts.backoff_min_s * (2 ** attempt))
    floor = opts.backoff_min_s / 2
    return floor + max(0.0, ceiling - floor) * (int.from_bytes(os.urandom(2), "big") / 65536)


class GatewayRejected(Exception):
    """The gateway is not who it should be (pin mismatch)."""


def _pinned(fingerprint: str, pins: List[str]) -> bool:
    found = False
    for pin in pins:  # every pin compared, in constant time each
        found = compare_digest(fingerprint, pin) or found
    return found


def _ca_context(ca_der: bytes, server_hostname: Optional[str]) -> ssl.SSLContext:
    """Verify the gateway against the pinned CA; its names only when ``--server-name`` asks,
    since any certificate that CA signed is a gateway of the deployment."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = bool(server_hostname)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_der)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _open(target: Target, ctx: ssl.SSLContext, name: str, tcp_timeout: float,
                source: Optional[str] = None) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS to ``target``: the TCP connect within ``tcp_timeout``, all of it within CONNECT_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        infos = socket.getaddrinfo(target.address, target.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = []  # a name that did not resolve before: asyncio resolves and reports it
    if not infos:
        return await asyncio.wait_for(
            asyncio.open_connection(target.address, target.port, ssl=ctx, server_hostname=_sni_name(name),
                                    local_addr=(source, 0) if source else None),
            CONNECT_TIMEOUT_S)
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if source:
            sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, address), tcp_timeout)
    except BaseException:
        sock.close()
        raise
    # From here the socket belongs to the transport asyncio makes of it, which closes it
    # on failure. Closing it here as well was a bug: a wait_for timing out in the loop
    # turn between the transport's creation and its connection_made left that transport
    # registered on the descriptor, and the next socket given the same number failed
    # with "File descriptor N is used by transport" (seen in a 15,000-agent reconnect
    # storm). asyncio's own handshake timeout aborts the transport properly.
    left = max(0.1, CONNECT_TIMEOUT_S - (loop.time() - started))
    return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=_sni_name(name),
                                         ssl_handshake_timeout=left)


async def _probe_ca(target: Target, tcp_timeout: float, source: Optional[str] = None) -> bytes:
    """The CA certificate (DER) the gateway at ``target`` presents for ``CA_PROBE_NAME``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _reader, writer = await _open(target, ctx, CA_PROBE_NAME, tcp_timeout, source)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return (ssl_object.getpeercert(binary_form=True) if ssl_object else None) or b""
    finally:
        writer.close()


async def _verified(opts: ConnectOptions, target: Target, trust: Trust,
                    tcp_timeout: float) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to ``target`` whose certificate passed the agent's checks.

    A pinned gateway certificate costs one handshake. A pinned CA costs three the first
    time (the gateway's own certificate, not pinned; the probe; the connection verified
    against the CA) and one from then on, to any gateway, while the agent runs.
    """
    name = opts.server_hostname or target.host
    pins = opts.pins()
    source = opts.source_address
    if opts.ca_file:
        reader, writer = await _open(target, client_context(opts), name, tcp_timeout, source)
        if pins and not _pinned(peer_fingerprint(writer), pins):  # both given: both must hold
            writer.close()
            raise GatewayRejected("the gateway's certificate does not match the pinned fingerprint")
        return reader, writer
    if trust.ca_der is not None:
        try:
            return await _open(target, trust.ca_context(opts.server_hostname), name, tcp_timeout, source)
        except ssl.SSLCertVerificationError:
            pass  # not signed by that CA; the certificate itself may still be pinned
    reader, writer = await _open(target, trust.pinned_context(opts), name, tcp_timeout, source)
    if _pinned(peer_fingerprint(writer), pins):
        return reader, writer
    writer.close()
    if trust.ca_der is None and await _learn_ca(target, pins, trust, tcp_timeout, source):
        return await _open(target, trust.ca_context(opts.server_hostname), name, tcp_timeout, source)
    raise GatewayRejected("the gateway's certificate does not match the pinned fingerprint")


async def _learn_ca(target: Target, pins: List[str], trust: Trust, tcp_timeout: float,
                    source: Optional[str] = None) -> bool:
    """Whether the CA the gateway at ``target`` presents is pinned (then ``trust`` keeps it)."""
    try:
        ca_der = await _probe_ca(target, tcp_timeout, source)
    except ssl.SSLError:
        return False
    if ca_der and _pinned(sha256_hex(ca_der), pins):
        trust.ca_der = ca_der
        log.info("the gateway's CA matches the pinned fingerprint; trusting every gateway it signed")
        return True
    return False


async def connect_once(opts: ConnectOptions, handler: Handler, stop: asyncio.Event,
                       target: Optional[Target] = None, trust: Optional[Trust] = None) -> str:
    """One connection, until it closes or ``stop`` is set; returns why it ended."""
    target = target or Target(opts.host, opts.port, opts.host)
    tcp_timeout = CONNECT_TIMEOUT_S if len(opts.gateways) == 1 else TCP_CONNECT_TIMEOUT_MANY_S
    reader, writer = await _verified(opts, target, trust or Trust(), tcp_timeout)
    facts = server_facts().to_dict()
    welcome = await agent_handshake(reader, writer, {"method": "key", "key": opts.key}, facts,
                                    agent=f"fleetbus-agent/{__version__}")
    conn = Connection.from_welcome(reader, writer, welcome, on_open=handler)
    conn.start()
    log.info("connected to %s:%s (%s) as %s", target.host, target.port, target.address, welcome.server)
    stopper = asyncio.ensure_future(stop.wait())
    closed = asyncio.ensure_future(conn.wait_closed())
    try:
        await asyncio.wait({stopper, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        closed.cancel()
    if stop.is_set():
        await conn.close("the agent is stopping", goaway=True)
        return "stopped"
    return conn.close_reason or "connection closed"


async def resolve(gateways: List[Tuple[str, int]]) -> List[Target]:
    """Every address of every gateway, in order; a name that does not resolve now is
    kept as it is (its attempt fails and says why)."""
    loop = asyncio.get_running_loop()
    targets: List[Target] = []
    for host, port in gateways:
        try:
            # An address needs no lookup: resolved here, not in the loop's thread pool,
            # whose hand-off cost a busy agent (a reconnect storm) 7% of its CPU.
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except (OSError, UnicodeError):
            infos = []
        try:
            infos = infos or await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        addresses: List[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in addresses:
                addresses.append(address)
        targets.extend(Target(host, port, a) for a in addresses or [host])
    return targets


async def run_connect(opts: ConnectOptions, stop: asyncio.Event,
                      handler: Optional[Handler] = None) -> None:
    """Stay connected to one of the gateways until ``stop`` is set."""
    handler = handler or Handler()
    trust = Trust()
    attempt = 0
    targets: List[Target] = []
    index = 0
    while not stop.is_set():
        if index == 0 or not targets:
            targets = await resolve(opts.gateways)  # again every round: DNS may change
        target = targets[index % len(targets)]
        started = time.monotonic()
        try:
            reason = await connect_once(opts, handler, stop, target, trust)
            if stop.is_set():
                return
            log.warning("connection to the gateway at %s:%s ended: %s", target.host, target.port, reason)
        except AuthError as exc:
            log.error("the gateway refused this agent: %s", exc.message)
        except GatewayRejected as exc:
            log.error("%s; not sending the key", exc)
        except HandshakeError as exc:
            log.warning("handshake with the gateway failed: %s", exc.message)
        except ssl.SSLError as exc:
            log.error("TLS with the gateway failed: %s", exc.reason or exc)
        except (OSError, asyncio.TimeoutError, socket.gaierror) as exc:
            log.warning("cannot reach the gateway at %s:%s (%s): %s", target.host, target.port, target.address,
                        exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__)
        except Exception as exc:
            # An agent never gives up on its gateway: anything unforeseen is logged and
            # retried with the same backoff, instead of ending the process's only loop.
            log.error("connecting to the gateway at %s:%s failed unexpectedly: %s: %s",
                      target.host, target.port, type(exc).__name__, exc)
        if time.monotonic() - started > STABLE_AFTER_S:
            attempt = 0
        # The next gateway, whatever happened: the one that just failed or dropped us is
        # the least likely to answer now.
        index = (index + 1) % len(targets)
        if index == 0 and (len(targets) == 1 or time.monotonic() - started <= STABLE_AFTER_S):
            # A full round failed: back off before the next.
            delay = backoff_delay(opts, attempt)
            attempt = min(attempt + 1, 30)
        else:
            delay = opts.backoff_min_s * _jitter()  # a gateway restart must not bring a thundering herd
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
