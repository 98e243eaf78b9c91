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
import binascii
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

from ..digests import compare_digest, hmac_sha256_hex, sha256_hex
from .frames import (
    DEFAULT_MAX_BODY,
    DEFAULT_WINDOW,
    MAX_ANNOUNCED_BODY,
    MAX_ANNOUNCED_WINDOW,
    MIN_LIMIT,
    SUPPORTED_VERSIONS,
    ProtocolError,
    encode_frame,
    read_frame,
)
from .peer import MAX_PEER_TEXT, drop, encodable, is_int, peer_text, send_error

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


def _check_limits(max_body: int, window: int) -> None:
    if not MIN_LIMIT <= max_body <= MAX_ANNOUNCED_BODY:
        raise ValueError(f"max_body must be between {MIN_LIMIT} and {MAX_ANNOUNCED_BODY}")
    if not MIN_LIMIT <= window <= MAX_ANNOUNCED_WINDOW:
        raise ValueError(f"window must be between {MIN_LIMIT} and {MAX_ANNOUNCED_WINDOW}")


def _peer_limit(header: Dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = header.get(name, default)
    if not is_int(value) or not low <= value <= high:
        raise ProtocolError(f'"{name}" must be an integer between {low} and {high}')
    return int(value)


def _offered_versions(header: Dict[str, Any], what: str) -> List[int]:
    offered = header.get("versions")
    if (
        not isinstance(offered, list)
        or not offered
        or len(offered) > 64
        or not all(is_int(v) for v in offered)
    ):
        raise ProtocolError(f'{what} needs "versions", a non-empty list of integers')
    return offered


def _peer_heartbeat(header: Dict[str, Any], what: str) -> float:
    heartbeat_s = header.get("heartbeat_s")
    if (
        not isinstance(heartbeat_s, (int, float))
        or isinstance(heartbeat_s, bool)
        or not 0 < heartbeat_s <= 3600
    ):
        raise ProtocolError(f'{what} has no valid "heartbeat_s"')
    return float(heartbeat_s)


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
    _check_limits(max_body, window)
    hello = {
        "t": "hello",
        "versions": list(versions),
        "agent": agent or _default_agent_name(),
        "auth": auth,
        "facts": facts or {},
        "max_body": max_body,
        "window": window,
    }
    return await _handshake(
        _agent_exchange(reader, writer, hello, versions, max_body, window),
        writer, timeout, "controller", "welcome",
    )


async def _agent_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hello: Dict[str, Any],
    versions: Sequence[int],
    max_body: int,
    window: int,
) -> Welcome:
    writer.write(encode_frame(hello))
    await writer.drain()
    frame = await read_frame(reader, max_body)
    header = frame.header
    if frame.type == "error":
        code = peer_text(header.get("code"), "invalid_request")
        message = peer_text(header.get("message"), "refused by the controller")
        if code == "auth_failed":
            raise AuthError(code, message)
        raise HandshakeError(code, message)
    if frame.type != "welcome":
        raise ProtocolError(f"expected welcome, got {frame.type[:40]!r}")
    version = header.get("version")
    if not is_int(version) or version not in versions:
        raise ProtocolError("welcome names a version we did not offer")
    server = header.get("server")
    if not isinstance(server, str) or not server:
        raise ProtocolError('welcome lacks a "server" name')
    heartbeat_s = _peer_heartbeat(header, "welcome")
    peer_max_body = _peer_limit(header, "max_body", DEFAULT_MAX_BODY, MIN_LIMIT, MAX_ANNOUNCED_BODY)
    peer_window = _peer_limit(header, "window", DEFAULT_WINDOW, MIN_LIMIT, MAX_ANNOUNCED_WINDOW)
    return Welcome(
        version=int(version),
        server=server,
        heartbeat_s=float(heartbeat_s),
        peer_max_body=peer_max_body,
        peer_window=peer_window,
        max_body=max_body,
        window=window,
        header=header,
    )


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
    _check_limits(max_body, window)
    if not 0 < heartbeat_s <= 3600:
        raise ValueError("heartbeat_s must be in (0, 3600]")
    # Refusals raised here (authenticate, versions) are ours: the agent is told.
    return await _handshake(
        _controller_exchange(reader, writer, authenticate, heartbeat_s, versions, max_body, window),
        writer, timeout, "agent", "hello", refuse_own=True,
    )


async def _controller_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    authenticate: Authenticate,
    heartbeat_s: float,
    versions: Sequence[int],
    max_body: int,
    window: int,
) -> Accepted:
    frame = await read_frame(reader, max_body)
    hello = frame.header
    if frame.type != "hello":
        raise ProtocolError(f"expected hello, got {frame.type[:40]!r}")
    offered = _offered_versions(hello, "hello")
    if not isinstance(hello.get("auth"), dict):
        raise ProtocolError('hello needs an "auth" object')
    if not isinstance(hello.get("facts", {}), dict):
        raise ProtocolError('hello "facts" must be an object')
    if not isinstance(hello.get("agent", ""), str):
        raise ProtocolError('hello "agent" must be a string')
    peer_max_body = _peer_limit(hello, "max_body", DEFAULT_MAX_BODY, MIN_LIMIT, MAX_ANNOUNCED_BODY)
    peer_window = _peer_limit(hello, "window", DEFAULT_WINDOW, MIN_LIMIT, MAX_ANNOUNCED_WINDOW)
    common = set(offered) & set(versions)
    if not common:
        raise HandshakeError(
            "unsupported_version",
            f"no common protocol version: the controller speaks {sorted(set(versions))}",
        )
    version = max(common)
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
    welcome = {
        "t": "welcome",
        "version": version,
        "server": server,
        "heartbeat_s": heartbeat_s,
        "max_body": max_body,
        "window": window,
    }
    writer.write(encode_frame(welcome))
    await writer.drain()
    safe = dict(hello)
    method = hello["auth"].get("method")
    safe["auth"] = {"method": method} if isinstance(method, str) else {}
    return Accepted(
        server=server,
        hello=safe,
        version=version,
        heartbeat_s=float(heartbeat_s),
        peer_max_body=peer_max_body,
        peer_window=peer_window,
        max_body=max_body,
        window=window,
    )


INBOUND_PROOF_LABEL = b"fleetbus-inbound-v1"
"""Domain separation for the inbound proof: no other HMAC made with the key matches it."""


NONCE_BYTES = 32
"""Size of the agent's challenge nonce."""


_HEX_DIGITS = frozenset("0123456789abcdef")


def _normalise_fingerprint(fingerprint: Any) -> str:
    """``"sha256:<hex>"`` or bare hex, any case, to 64 lowercase hex digits."""
    if not isinstance(fingerprint, str):
        raise ValueError("a certificate fingerprint must be a string")  # noqa: TRY004 - callers catch ValueError
    text = fingerprint.lower().removeprefix("sha256:")
    if len(text) != 64 or not _HEX_DIGITS.issuperset(text):
        # The value is not quoted: a caller mixing up arguments may have passed the key.
        raise ValueError(
            'a certificate fingerprint must be "sha256:" and 64 hex digits, or the 64 digits alone'
        )
    return text


def _key_bytes(key: Any) -> bytes:
    if not isinstance(key, str) or not key:
        raise ValueError("the server key must be a non-empty string")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the server key is not encodable as UTF-8") from None


def inbound_proof(key: str, nonce: bytes, agent_fingerprint: str) -> str:
    """The controller's proof that it knows ``key``, for one challenge, bound to one certificate.

    ``hex(HMAC-SHA256(key=UTF-8 key, msg=b"fleetbus-inbound-v1" \\0 nonce \\0 fingerprint))``
    where ``fingerprint`` is the agent certificate's SHA-256 as 64 lowercase hex digits
    (ASCII). ``agent_fingerprint`` may be ``"sha256:<hex>"`` or bare hex, in any case;
    anything else raises ValueError, as does an empty key.
    """
    secret = _key_bytes(key)
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise TypeError("nonce must be bytes")
    fingerprint = _normalise_fingerprint(agent_fingerprint)
    message = b"".join(
        (INBOUND_PROOF_LABEL, b"\0", bytes(nonce), b"\0", fingerprint.encode("ascii"))
    )
    return hmac_sha256_hex(secret, message)


def certificate_fingerprint(der: bytes) -> str:
    """``"sha256:<hex>"`` of a DER-encoded certificate (what fleetbus pins)."""
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise TypeError("certificate_fingerprint needs the DER certificate as bytes")
    data = bytes(der)
    if not data:
        raise ValueError("the certificate is empty")
    if data.lstrip().startswith(b"-----BEGIN"):
        raise ValueError("that is a PEM certificate: pass its DER form (ssl.PEM_cert_to_DER_cert)")
    return "sha256:" + sha256_hex(data)


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


def _proof_matches(expected: str, proof: str) -> bool:
    """Constant-time check of a peer's hex proof (either case) against ours."""
    if len(proof) != len(expected):
        return False
    candidate = proof.lower()
    if not _HEX_DIGITS.issuperset(candidate):
        return False
    return compare_digest(expected.encode("ascii"), candidate.encode("ascii"))


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
    _check_limits(max_body, window)
    _key_bytes(key)
    own_fingerprint = _normalise_fingerprint(certificate_fingerprint)
    offered = list(versions)
    nonce = os.urandom(NONCE_BYTES)  # what secrets.token_bytes is; secrets would import hashlib
    # Encoded before any I/O: facts too large or not JSON are the caller's ValueError/TypeError.
    challenge = encode_frame(
        {
            "t": "challenge",
            "versions": offered,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "agent": agent or _default_agent_name(),
            "facts": facts or {},
            "max_body": max_body,
            "window": window,
        }
    )
    expected = inbound_proof(key, nonce, own_fingerprint)
    return await _handshake(
        _agent_accept_exchange(reader, writer, challenge, expected, offered, max_body, window),
        writer, timeout, "controller", "hello",
    )


async def _agent_accept_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    challenge: bytes,
    expected: str,
    versions: List[int],
    max_body: int,
    window: int,
) -> Welcome:
    writer.write(challenge)
    await writer.drain()
    frame = await read_frame(reader, max_body)
    header = frame.header
    if frame.type == "error":
        raise _peer_refusal(header, "controller")
    if frame.type != "hello":
        raise ProtocolError(f"expected hello, got {frame.type[:40]!r}")
    proof = header.get("proof")
    if not isinstance(proof, str):
        raise ProtocolError('hello needs a "proof" string')
    # Checked before anything else, so a peer without the key learns nothing more.
    if not _proof_matches(expected, proof):
        raise ProtocolError("proof of the server key failed", "auth_failed")
    version = header.get("version")
    if not is_int(version):
        raise ProtocolError('hello needs an integer "version"')
    if version not in versions:
        raise ProtocolError(
            f"the controller chose a version the agent did not offer: it speaks "
            f"{sorted(set(versions))}",
            "unsupported_version",
        )
    server = header.get("server")
    if not isinstance(server, str) or not 0 < len(server) <= MAX_PEER_TEXT or not encodable(server):
        raise ProtocolError(f'hello needs a "server" name of 1 to {MAX_PEER_TEXT} characters')
    raw_heartbeat = header.get("heartbeat_s")
    heartbeat_s = _peer_heartbeat(header, "hello")
    peer_max_body = _peer_limit(header, "max_body", DEFAULT_MAX_BODY, MIN_LIMIT, MAX_ANNOUNCED_BODY)
    peer_window = _peer_limit(header, "window", DEFAULT_WINDOW, MIN_LIMIT, MAX_ANNOUNCED_WINDOW)
    writer.write(
        encode_frame(
            {
                "t": "welcome",
                "version": version,
                "server": server,
                "heartbeat_s": raw_heartbeat,
                "max_body": max_body,
                "window": window,
            }
        )
    )
    await writer.drain()
    return Welcome(
        version=int(version),
        server=server,
        heartbeat_s=heartbeat_s,
        peer_max_body=peer_max_body,
        peer_window=peer_window,
        max_body=max_body,
        window=window,
        header={k: v for k, v in header.items() if k != "proof"},
    )


def _decode_nonce(value: Any) -> bytes:
    # 32 bytes are 44 base64 characters; the length check comes before any decoding.
    if isinstance(value, str) and len(value) <= 64:
        try:
            nonce = base64.b64decode(value.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            nonce = b""
        if len(nonce) == NONCE_BYTES:
            return nonce
    raise ProtocolError(f'challenge needs a "nonce": base64 of {NONCE_BYTES} bytes')


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
    _check_limits(max_body, window)
    if not 0 < heartbeat_s <= 3600:
        raise ValueError("heartbeat_s must be in (0, 3600]")
    _key_bytes(key)
    if not isinstance(server, str) or not 0 < len(server) <= MAX_PEER_TEXT:
        raise ValueError(f"server must be a name of 1 to {MAX_PEER_TEXT} characters")
    pinned = _normalise_fingerprint(agent_fingerprint)
    spoken = list(versions)
    waiting = ["challenge"]
    try:
        seen = _normalise_fingerprint(peer_certificate_fingerprint(writer))
        if not compare_digest(seen, pinned):
            raise HandshakeError(
                "transport_error",
                "the agent's TLS certificate is not the one agent_fingerprint names",
            )
        return await asyncio.wait_for(
            _controller_connect_exchange(
                reader,
                writer,
                key,
                seen,
                server,
                heartbeat_s,
                spoken,
                max_body,
                window,
                waiting,
            ),
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
    versions: List[int],
    max_body: int,
    window: int,
    waiting: List[str],
) -> Accepted:
    frame = await read_frame(reader, max_body)
    challenge = frame.header
    if frame.type == "error":
        raise _peer_refusal(challenge, "agent")
    if frame.type != "challenge":
        raise ProtocolError(f"expected challenge, got {frame.type[:40]!r}")
    offered = _offered_versions(challenge, "challenge")
    nonce = _decode_nonce(challenge.get("nonce"))
    if not isinstance(challenge.get("facts", {}), dict):
        raise ProtocolError('challenge "facts" must be an object')
    if not isinstance(challenge.get("agent", ""), str):
        raise ProtocolError('challenge "agent" must be a string')
    peer_max_body = _peer_limit(
        challenge, "max_body", DEFAULT_MAX_BODY, MIN_LIMIT, MAX_ANNOUNCED_BODY
    )
    peer_window = _peer_limit(challenge, "window", DEFAULT_WINDOW, MIN_LIMIT, MAX_ANNOUNCED_WINDOW)
    common = set(offered) & set(versions)
    if not common:
        raise ProtocolError(
            f"no common protocol version: the controller speaks {sorted(set(versions))}",
            "unsupported_version",
        )
    version = max(common)
    writer.write(
        encode_frame(
            {
                "t": "hello",
                "version": version,
                "proof": inbound_proof(key, nonce, seen),
                "server": server,
                "heartbeat_s": heartbeat_s,
                "max_body": max_body,
                "window": window,
            }
        )
    )
    await writer.drain()
    waiting[0] = "welcome"
    frame = await read_frame(reader, max_body)
    welcome = frame.header
    if frame.type == "error":
        raise _peer_refusal(welcome, "agent")
    if frame.type != "welcome":
        raise ProtocolError(f"expected welcome, got {frame.type[:40]!r}")
    if welcome.get("version") != version or not is_int(welcome.get("version")):
        raise ProtocolError("welcome names a version other than the one chosen")
    if welcome.get("server") != server:
        raise ProtocolError('welcome does not echo the hello\'s "server"')
    if _peer_heartbeat(welcome, "welcome") != float(heartbeat_s):
        raise ProtocolError('welcome does not echo the hello\'s "heartbeat_s"')
    # The welcome repeats the challenge's limits; the smaller is safe either way.
    peer_max_body = min(
        peer_max_body,
        _peer_limit(welcome, "max_body", peer_max_body, MIN_LIMIT, MAX_ANNOUNCED_BODY),
    )
    peer_window = min(
        peer_window,
        _peer_limit(welcome, "window", peer_window, MIN_LIMIT, MAX_ANNOUNCED_WINDOW),
    )
    hello = {k: v for k, v in challenge.items() if k != "nonce"}
    hello.setdefault("agent", "")
    hello.setdefault("facts", {})
    return Accepted(
        server=server,
        hello=hello,
        version=version,
        heartbeat_s=float(heartbeat_s),
        peer_max_body=peer_max_body,
        peer_window=peer_window,
        max_body=max_body,
        window=window,
    )
