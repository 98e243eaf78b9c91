"""The handshake: one negotiation of versions, limits and heartbeat, in four variants.

Outbound (the agent dials and sends its key): :func:`agent_handshake` and
:func:`controller_handshake` exchange ``hello`` / ``welcome``. The roles ("agent",
"controller") are independent of which side is the TLS client.

Inbound (fleetbus dials a listening agent and proves it knows the key without sending
it): :func:`agent_accept_handshake` and :func:`controller_connect_handshake` exchange
``challenge`` / ``hello`` / ``welcome``; the proof (:func:`inbound_proof`) is bound to
the agent's certificate (:func:`certificate_fingerprint`,
:func:`peer_certificate_fingerprint`).

Every variant produces a :class:`Welcome` (agent side) or :class:`Accepted`
(controller side) for :class:`~fleetbus_base.wire.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from dataclasses import dataclass, field
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
)

from ..digests import compare_digest
from .frames import (
    DEFAULT_MAX_BODY,
    DEFAULT_WINDOW,
    SUPPORTED_VERSIONS,
    ProtocolError,
    encode_frame,
    read_frame,
)
from .negotiation import Negotiation, check_heartbeat
from .peer import MAX_PEER_TEXT, drop, encodable, is_int, peer_text, send_error
from .proof import (
    NONCE_BYTES,
    certificate_fingerprint,
    decode_nonce,
    inbound_proof,
    key_bytes,
    normalise_fingerprint,
    proof_matches,
)

log = logging.getLogger(__name__)


DEFAULT_HEARTBEAT_S = 5.0
"""Default interval between pings; the controller announces the real one in welcome."""


DEFAULT_HANDSHAKE_TIMEOUT = 5.0
"""Default deadline for the whole handshake, on the side waiting for its peer."""


class HandshakeError(ProtocolError):
    """The handshake failed; the connection has already been closed.

    ``code`` is one of ``auth_failed``, ``invalid_request``, ``unsupported_version``
    (sent by either side in an ``error`` frame), ``timeout`` (the peer did not answer
    within the deadline), ``transport_error`` (the connection broke) or ``internal``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code)


class AuthError(HandshakeError):
    """Authentication was refused.

    The controller's ``authenticate`` callback raises it to reject a ``hello``;
    ``code`` and ``message`` go to the agent verbatim in the ``error`` frame, so the
    message must never contain the key. :func:`agent_handshake` raises it when the
    controller answers ``auth_failed``. Inbound, :func:`agent_accept_handshake` raises
    it for a wrong proof and :func:`controller_connect_handshake` when the agent
    refused the proof.
    """

    def __init__(self, code: str = "auth_failed", message: str = "authentication failed") -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class Welcome:
    """What :func:`agent_handshake` (or, inbound, :func:`agent_accept_handshake`) learned;
    feed it to :meth:`Connection.from_welcome`."""

    version: int
    """Negotiated protocol version."""
    server: str
    """The server name the controller knows this agent as."""
    heartbeat_s: float
    """Heartbeat interval the controller chose; both sides use it."""
    peer_max_body: int
    """Largest body the controller accepts: our frames never exceed it."""
    peer_window: int
    """Per-stream credit the controller grants us for ``out``/``data`` bytes."""
    max_body: int
    """Largest body we announced (our read limit)."""
    window: int
    """Per-stream window we announced (what the controller may have in flight to us)."""
    header: Dict[str, Any] = field(repr=False)
    """The raw welcome header, for fields a later minor revision may add (inbound: the
    controller's hello header without its ``proof``)."""


@dataclass(frozen=True)
class Accepted:
    """What :func:`controller_handshake` (or, inbound, :func:`controller_connect_handshake`)
    accepted; feed it to :meth:`Connection.from_accepted`.

    Unpacks as ``(server, hello)`` for callers that only want those two.
    """

    server: str
    """The server name ``authenticate`` returned (sent to the agent in welcome); inbound,
    the ``server`` given to :func:`controller_connect_handshake`."""
    hello: Dict[str, Any] = field(repr=False)
    """The hello header with ``auth`` reduced to ``{"method": ...}``: safe to log.
    Inbound: the agent's challenge header without its ``nonce`` (``agent``, ``facts``)."""
    version: int
    heartbeat_s: float
    peer_max_body: int
    peer_window: int
    max_body: int
    window: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.server, self.hello))


Authenticate = Callable[[Dict[str, Any]], Awaitable[str]]
"""``async authenticate(hello_header) -> server_name``; raises :class:`AuthError` to refuse."""


def _default_agent_name() -> str:
    from .. import __version__

    return f"fleetbus-agent/{__version__}"


async def agent_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    auth: Dict[str, Any],
    facts: Optional[Dict[str, Any]] = None,
    *,
    agent: Optional[str] = None,
    versions: Sequence[int] = SUPPORTED_VERSIONS,
    max_body: int = DEFAULT_MAX_BODY,
    window: int = DEFAULT_WINDOW,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Welcome:
    """Run the agent's half of the handshake: send ``hello``, wait for ``welcome``.

    ``auth`` goes in the hello as given (outbound: ``{"method": "key", "key": ...}``);
    call this only after the TLS peer was verified, since it carries the secret.
    ``facts`` describes this server (hostname, OS, ...). ``max_body`` and ``window``
    are our receive limits, announced to the controller.

    Returns a :class:`Welcome`. On failure the connection is closed and
    :class:`AuthError` (controller answered ``auth_failed``) or
    :class:`HandshakeError` is raised; ``timeout`` bounds the whole exchange.
    """
    ours = Negotiation("agent", versions, max_body, window)
    hello = {
        "t": "hello",
        **ours.offer(),
        "agent": agent or _default_agent_name(),
        "auth": auth,
        "facts": facts or {},
    }
    return await _handshake(
        _agent_exchange(reader, writer, hello, ours), writer, timeout, "controller", "welcome"
    )


async def _agent_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hello: Dict[str, Any],
    ours: Negotiation,
) -> Welcome:
    writer.write(encode_frame(hello))
    await writer.drain()
    frame = await read_frame(reader, ours.max_body)
    header = frame.header
    if frame.type == "error":
        raise _peer_refusal(header, "controller")
    if frame.type != "welcome":
        raise ProtocolError(f"expected welcome, got {frame.type[:40]!r}")
    version = ours.chosen_version(header, "welcome")
    server = header.get("server")
    if not isinstance(server, str) or not server:
        raise ProtocolError('welcome lacks a "server" name')
    terms = ours.terms(version, Negotiation.heartbeat(header, "welcome"), Negotiation.peer_limits(header))
    return Welcome(server=server, header=header, **terms.fields())


async def controller_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    authenticate: Authenticate,
    *,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    versions: Sequence[int] = SUPPORTED_VERSIONS,
    max_body: int = DEFAULT_MAX_BODY,
    window: int = DEFAULT_WINDOW,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Accepted:
    """Run the controller's half of the handshake: wait for ``hello``, answer ``welcome``.

    The hello is validated (shape, limits), the highest common version is chosen, then
    ``await authenticate(hello_header)`` decides: it returns the server name or raises
    :class:`AuthError` (sent to the agent as an ``error`` frame). It sees the full
    header including ``auth``; nothing else does.

    ``timeout`` bounds everything (reading the hello, ``authenticate``, writing the
    welcome), so a peer that connects and stalls is dropped at the deadline.

    Returns an :class:`Accepted` (unpacks as ``(server, hello)``). On failure the
    peer gets an ``error`` frame when one applies, the connection is closed, and
    :class:`HandshakeError` (or the callback's :class:`AuthError`) is raised.
    """
    ours = Negotiation("controller", versions, max_body, window)
    check_heartbeat(heartbeat_s)
    # Refusals raised here (authenticate, versions) are ours: the agent is told.
    return await _handshake(
        _controller_exchange(reader, writer, authenticate, heartbeat_s, ours),
        writer, timeout, "agent", "hello", refuse_own=True,
    )


async def _controller_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    authenticate: Authenticate,
    heartbeat_s: float,
    ours: Negotiation,
) -> Accepted:
    frame = await read_frame(reader, ours.max_body)
    hello = frame.header
    if frame.type != "hello":
        raise ProtocolError(f"expected hello, got {frame.type[:40]!r}")
    if not isinstance(hello.get("auth"), dict):
        raise ProtocolError('hello needs an "auth" object')
    ours.check_description(hello, "hello")
    peer_limits = Negotiation.peer_limits(hello)
    version = ours.choose_version(hello, "hello")
    try:
        server = await authenticate(hello)
    except HandshakeError:
        raise
    except Exception as exc:
        # Only the type: the exception's text or traceback may quote the hello's key.
        log.error("authenticate callback failed with %s", type(exc).__name__)
        raise HandshakeError("internal", "internal error while authenticating") from None
    if not isinstance(server, str) or not server:
        log.error("authenticate callback returned %r instead of a server name", type(server))
        raise HandshakeError("internal", "internal error while authenticating")
    welcome = {"t": "welcome", "version": version, "server": server, "heartbeat_s": heartbeat_s, **ours.limits()}
    writer.write(encode_frame(welcome))
    await writer.drain()
    safe = dict(hello)
    method = hello["auth"].get("method")
    safe["auth"] = {"method": method} if isinstance(method, str) else {}
    return Accepted(server=server, hello=safe, **ours.terms(version, heartbeat_s, peer_limits).fields())


def peer_certificate_fingerprint(writer: asyncio.StreamWriter) -> str:
    """``"sha256:<hex>"`` of the certificate the TLS peer of ``writer`` presented.

    Works whether or not the certificate was verified (pinning contexts use
    ``CERT_NONE``). Raises :class:`HandshakeError` (``transport_error``) when the
    connection is not TLS or the peer presented no certificate.
    """
    ssl_object = writer.get_extra_info("ssl_object")
    der = None
    if ssl_object is not None:
        try:
            der = ssl_object.getpeercert(binary_form=True)
        except (ValueError, OSError):  # the TLS handshake has not completed
            der = None
    if not der:
        raise HandshakeError("transport_error", "the connection has no TLS peer certificate")
    return certificate_fingerprint(der)


def _peer_refusal(header: Dict[str, Any], peer: str) -> HandshakeError:
    """The exception for an ``error`` frame the peer sent during the handshake."""
    code = peer_text(header.get("code"), "invalid_request")
    message = peer_text(header.get("message"), f"refused by the {peer}")
    if code == "auth_failed":
        return AuthError(code, message)
    return HandshakeError(code, message)


def _own_refusal(exc: ProtocolError, peer: str) -> HandshakeError:
    """The exception for a refusal we sent the peer (``exc.code`` / ``exc.message``)."""
    if exc.code == "auth_failed":
        return AuthError(exc.code, exc.message)
    if exc.code == "invalid_request":
        return HandshakeError(exc.code, f"bad handshake from the {peer}: {exc.message}")
    return HandshakeError(exc.code, exc.message)


async def _handshake(
    exchange: Awaitable[Any], writer: asyncio.StreamWriter, timeout: float, peer: str,
    waiting: str, refuse_own: bool = False,
) -> Any:
    """Run one side's exchange under the handshake deadline; on failure close and raise."""
    try:
        return await asyncio.wait_for(exchange, timeout)
    except asyncio.CancelledError:
        writer.transport.abort()  # half a handshake is no use to anyone
        raise
    except Exception as exc:
        raise await _fail_handshake(writer, exc, peer, waiting, timeout, refuse_own) from None


async def _fail_handshake(
    writer: asyncio.StreamWriter, exc: BaseException, peer: str, waiting: str, timeout: float,
    refuse_own: bool = False,
) -> HandshakeError:
    """Close after a failed handshake (either mode); return the exception to raise.

    Timeouts just close. A :class:`HandshakeError` is the peer's refusal and just
    closes, unless ``refuse_own`` says this side raises its own (the outbound
    controller's authenticate): then it is sent to the peer first. Our refusals as a
    :class:`ProtocolError` (which includes the peer's malformed frames) are always sent.
    No message here quotes a header value.
    """
    if isinstance(exc, asyncio.TimeoutError):
        await drop(writer)
        return HandshakeError("timeout", f"no {waiting} from the {peer} within {timeout:g} s")
    if isinstance(exc, HandshakeError):
        if refuse_own and exc.code not in ("timeout", "transport_error"):
            await send_error(writer, exc.code, exc.message)
        await drop(writer)
        return exc
    if isinstance(exc, ProtocolError):
        await send_error(writer, exc.code, exc.message)
        await drop(writer)
        return _own_refusal(exc, peer)
    if isinstance(exc, (EOFError, OSError)):
        await drop(writer)
        return HandshakeError("transport_error", f"connection lost during handshake: {exc}")
    # A bug. Only the type is logged: the exception's text might quote a header value.
    log.error("handshake failed with %s", type(exc).__name__)
    await drop(writer)
    return HandshakeError("internal", "internal error during the handshake")


async def agent_accept_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    key: str,
    certificate_fingerprint: str,
    facts: Optional[Dict[str, Any]] = None,
    agent: Optional[str] = None,
    versions: Sequence[int] = SUPPORTED_VERSIONS,
    max_body: int = DEFAULT_MAX_BODY,
    window: int = DEFAULT_WINDOW,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Welcome:
    """Run the listening agent's half of the inbound handshake (the agent is the TLS server).

    Sends ``challenge`` (a fresh 32-byte nonce, our versions, ``facts``, limits), waits
    for the controller's ``hello``, checks its ``proof`` against
    :func:`inbound_proof` (``key``, the nonce, ``certificate_fingerprint`` = our own
    certificate's, ``"sha256:<hex>"`` or bare hex) in constant time, then answers
    ``welcome``. ``timeout`` bounds the whole exchange: a controller that stalls is
    dropped at the deadline.

    Returns a :class:`Welcome` (``header`` is the hello without its proof) for
    :meth:`Connection.from_welcome`. On failure the controller gets an ``error`` frame
    where one applies, the connection is closed, and :class:`AuthError` (wrong proof,
    or the controller answered ``auth_failed``) or :class:`HandshakeError` is raised.
    Bad arguments raise ValueError before anything is sent. Nothing logged or raised
    here contains the key, the nonce or the proof.
    """
    ours = Negotiation("agent", versions, max_body, window)
    key_bytes(key)
    own_fingerprint = normalise_fingerprint(certificate_fingerprint)
    nonce = os.urandom(NONCE_BYTES)  # what secrets.token_bytes is; secrets would import hashlib
    # Encoded before any I/O: facts too large or not JSON are the caller's ValueError/TypeError.
    challenge = encode_frame(
        {
            "t": "challenge",
            **ours.offer(),
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "agent": agent or _default_agent_name(),
            "facts": facts or {},
        }
    )
    expected = inbound_proof(key, nonce, own_fingerprint)
    return await _handshake(
        _agent_accept_exchange(reader, writer, challenge, expected, ours),
        writer, timeout, "controller", "hello",
    )


async def _agent_accept_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    challenge: bytes,
    expected: str,
    ours: Negotiation,
) -> Welcome:
    writer.write(challenge)
    await writer.drain()
    frame = await read_frame(reader, ours.max_body)
    header = frame.header
    if frame.type == "error":
        raise _peer_refusal(header, "controller")
    if frame.type != "hello":
        raise ProtocolError(f"expected hello, got {frame.type[:40]!r}")
    proof = header.get("proof")
    if not isinstance(proof, str):
        raise ProtocolError('hello needs a "proof" string')
    # Checked before anything else, so a peer without the key learns nothing more.
    if not proof_matches(expected, proof):
        raise ProtocolError("proof of the server key failed", "auth_failed")
    version = ours.chosen_version(header, "hello")
    server = header.get("server")
    if not isinstance(server, str) or not 0 < len(server) <= MAX_PEER_TEXT or not encodable(server):
        raise ProtocolError(f'hello needs a "server" name of 1 to {MAX_PEER_TEXT} characters')
    terms = ours.terms(version, Negotiation.heartbeat(header, "hello"), Negotiation.peer_limits(header))
    # The welcome echoes the hello's heartbeat as sent, so the controller can compare it.
    welcome = {"t": "welcome", "version": version, "server": server,
               "heartbeat_s": header.get("heartbeat_s"), **ours.limits()}
    writer.write(encode_frame(welcome))
    await writer.drain()
    return Welcome(server=server, header={k: v for k, v in header.items() if k != "proof"}, **terms.fields())


async def controller_connect_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    key: str,
    agent_fingerprint: str,
    server: str,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    versions: Sequence[int] = SUPPORTED_VERSIONS,
    max_body: int = DEFAULT_MAX_BODY,
    window: int = DEFAULT_WINDOW,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Accepted:
    """Run the dialling controller's half of the inbound handshake (fleetbus is the TLS client).

    Call it once the TLS handshake is done and the agent's certificate matched its
    pin. ``agent_fingerprint`` (``"sha256:<hex>"`` or bare hex) must name the
    certificate the TLS peer actually presented, which is checked here first: on a
    mismatch (or no TLS at all) nothing is sent and :class:`HandshakeError`
    (``transport_error``) is raised. Then it waits for ``challenge``, answers ``hello``
    with the highest common version and the :func:`inbound_proof` of ``key`` for the
    challenge's nonce and the certificate seen, and waits for ``welcome``. ``server``
    is the name fleetbus knows the agent as; ``heartbeat_s`` the interval both sides
    will use. ``timeout`` bounds the whole exchange.

    Returns an :class:`Accepted` (``hello`` is the agent's challenge without its
    nonce: ``agent`` and ``facts`` are there) for :meth:`Connection.from_accepted`. On
    failure the connection is closed and :class:`AuthError` (the agent refused the
    proof: ``auth_failed``) or :class:`HandshakeError` is raised. Bad arguments raise
    ValueError before anything is read or sent.
    """
    ours = Negotiation("controller", versions, max_body, window)
    check_heartbeat(heartbeat_s)
    key_bytes(key)
    if not isinstance(server, str) or not 0 < len(server) <= MAX_PEER_TEXT:
        raise ValueError(f"server must be a name of 1 to {MAX_PEER_TEXT} characters")
    pinned = normalise_fingerprint(agent_fingerprint)
    waiting = ["challenge"]
    try:
        seen = normalise_fingerprint(peer_certificate_fingerprint(writer))
        if not compare_digest(seen, pinned):
            raise HandshakeError(
                "transport_error",
                "the agent's TLS certificate is not the one agent_fingerprint names",
            )
        return await asyncio.wait_for(
            _controller_connect_exchange(reader, writer, key, seen, server, heartbeat_s, ours, waiting),
            timeout,
        )
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception as exc:
        raise await _fail_handshake(writer, exc, "agent", waiting[0], timeout) from None


async def _controller_connect_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: str,
    seen: str,
    server: str,
    heartbeat_s: float,
    ours: Negotiation,
    waiting: List[str],
) -> Accepted:
    frame = await read_frame(reader, ours.max_body)
    challenge = frame.header
    if frame.type == "error":
        raise _peer_refusal(challenge, "agent")
    if frame.type != "challenge":
        raise ProtocolError(f"expected challenge, got {frame.type[:40]!r}")
    version = ours.choose_version(challenge, "challenge")
    nonce = decode_nonce(challenge.get("nonce"))
    ours.check_description(challenge, "challenge")
    peer_limits = Negotiation.peer_limits(challenge)
    hello = {"t": "hello", "version": version, "proof": inbound_proof(key, nonce, seen), "server": server,
             "heartbeat_s": heartbeat_s, **ours.limits()}
    writer.write(encode_frame(hello))
    await writer.drain()
    waiting[0] = "welcome"
    frame = await read_frame(reader, ours.max_body)
    welcome = frame.header
    if frame.type == "error":
        raise _peer_refusal(welcome, "agent")
    if frame.type != "welcome":
        raise ProtocolError(f"expected welcome, got {frame.type[:40]!r}")
    if welcome.get("version") != version or not is_int(welcome.get("version")):
        raise ProtocolError("welcome names a version other than the one chosen")
    if welcome.get("server") != server:
        raise ProtocolError('welcome does not echo the hello\'s "server"')
    if Negotiation.heartbeat(welcome, "welcome") != float(heartbeat_s):
        raise ProtocolError('welcome does not echo the hello\'s "heartbeat_s"')
    # The welcome repeats the challenge's limits; the smaller is safe either way.
    repeated = Negotiation.peer_limits(welcome, *peer_limits)
    peer_limits = (min(peer_limits[0], repeated[0]), min(peer_limits[1], repeated[1]))
    described = {k: v for k, v in challenge.items() if k != "nonce"}
    described.setdefault("agent", "")
    described.setdefault("facts", {})
    return Accepted(server=server, hello=described, **ours.terms(version, heartbeat_s, peer_limits).fields())


