"""The fleetbus agent wire protocol (v1): handshake, multiplexed streams, flow control.

The agent and fleetbus's TLS gateway (or, in inbound mode, the agent listener and the
``agent-inbound`` plugin) talk over one TLS connection with this module on both ends.
The spec is docs/agent-protocol.md; this docstring is the map of the code.

* :mod:`fleetbus_agent.frames` has the framing (:func:`read_frame`,
  :func:`encode_frame`, :class:`Frame`); everything is re-exported here.
* :func:`agent_handshake` / :func:`controller_handshake` run the ``hello`` /
  ``welcome`` exchange, in which the agent sends its key (outbound mode). The handshake
  roles ("agent", "controller") are independent of which side is the TLS client, so
  both functions work whichever side dialled.
* :func:`agent_accept_handshake` / :func:`controller_connect_handshake` run the inbound
  ``challenge`` / ``hello`` / ``welcome`` exchange, in which the controller proves it
  knows the key without sending it (:func:`inbound_proof`, bound to the agent's
  certificate: :func:`certificate_fingerprint`, :func:`peer_certificate_fingerprint`).
  They produce the same :class:`Welcome` / :class:`Accepted` as the outbound pair.
* :class:`Connection` runs a handshaken connection: a frame parser fed by the
  transport (no reader task), a writer task with a control queue before round-robin
  data queues, and a heartbeat timer. The
  controller opens :class:`ControllerStream` s; the agent gets an
  :class:`AgentStream` per ``open`` in its ``on_open`` callback.

Policy lives elsewhere: which keys are valid, certificate checks, reconnecting and
running commands are the callers' business. This module is standard library only and
runs on Python 3.9+ (no ``asyncio.timeout``, no ``TaskGroup``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Generic,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from .digests import compare_digest, hmac_sha256_hex, sha256_hex
from .frames import (
    DATA_FRAME_TYPES,
    DEFAULT_MAX_BODY,
    DEFAULT_WINDOW,
    MAX_ANNOUNCED_BODY,
    MAX_ANNOUNCED_WINDOW,
    MAX_HEADER,
    MIN_LIMIT,
    PROTOCOL_VERSION,
    STREAM_FRAME_TYPES,
    SUPPORTED_VERSIONS,
    Frame,
    FrameParser,
    ProtocolError,
    decode_header,
    encode_frame,
    max_frame_size,
    read_frame,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_BODY",
    "DEFAULT_WINDOW",
    "MAX_HEADER",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Accepted",
    "AgentStream",
    "AuthError",
    "Connection",
    "ConnectionStats",
    "ControllerStream",
    "Event",
    "Frame",
    "FrameParser",
    "HandshakeError",
    "ProtocolError",
    "StreamError",
    "Welcome",
    "agent_accept_handshake",
    "agent_handshake",
    "certificate_fingerprint",
    "controller_connect_handshake",
    "controller_handshake",
    "decode_header",
    "encode_frame",
    "inbound_proof",
    "max_frame_size",
    "peer_certificate_fingerprint",
    "read_frame",
]

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
"""Default interval between pings; the controller announces the real one in welcome."""

DEFAULT_HANDSHAKE_TIMEOUT = 5.0
"""Default deadline for the whole handshake, on the side waiting for its peer."""

DEAD_AFTER_HEARTBEATS = 3
"""A connection with no frame received for this many heartbeat intervals is dead."""

LINGER_S = 1.0
"""How long closing code waits for a last frame or a TLS close to get through."""

# Control frames up to this size go straight to an idle socket (see Connection._write_now).
_DIRECT_WRITE_MAX = 16 * 1024

MAX_PEER_TEXT = 1000
"""Peer-supplied messages are cut to this many characters before we keep or log them."""

ROLES = ("agent", "controller")

# Controls the per-stream grant: credit goes back once this fraction of the window was
# consumed, so a busy stream costs one small window frame per half window.
_GRANT_FRACTION = 2


# ---------------------------------------------------------------------------- errors


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


class StreamError(Exception):
    """Sending on a stream that has ended or whose connection is closed.

    ``code`` is ``server_offline`` when the connection is gone, ``cancelled`` after a
    cancel, ``invalid_request`` for misuse (sending after ``eof``/``done``), or the
    code the stream failed with.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------ handshake


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
    # Imported late: the package __init__ may one day import this module.
    try:
        from . import __version__ as version
    except ImportError:  # loaded as a namespace package (e.g. a stale editable install)
        version = "unknown"
    return f"fleetbus-agent/{version}"


def _check_limits(max_body: int, window: int) -> None:
    if not MIN_LIMIT <= max_body <= MAX_ANNOUNCED_BODY:
        raise ValueError(f"max_body must be between {MIN_LIMIT} and {MAX_ANNOUNCED_BODY}")
    if not MIN_LIMIT <= window <= MAX_ANNOUNCED_WINDOW:
        raise ValueError(f"window must be between {MIN_LIMIT} and {MAX_ANNOUNCED_WINDOW}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _peer_limit(header: Dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = header.get(name, default)
    if not _is_int(value) or not low <= value <= high:
        raise ProtocolError(f'"{name}" must be an integer between {low} and {high}')
    return int(value)


def _encodable(text: str) -> bool:
    """False for a string JSON decoded from a lone surrogate escape: it cannot be sent
    back (the welcome echoes the server name) and is no name anyway."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _peer_text(value: Any, default: str = "") -> str:
    text = value if isinstance(value, str) else default
    return text[:MAX_PEER_TEXT]


def _offered_versions(header: Dict[str, Any], what: str) -> List[int]:
    offered = header.get("versions")
    if (
        not isinstance(offered, list)
        or not offered
        or len(offered) > 64
        or not all(_is_int(v) for v in offered)
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


async def _send_error(writer: asyncio.StreamWriter, code: str, message: str) -> None:
    """Best effort: tell the peer why we are closing. Never raises."""
    try:
        writer.write(encode_frame({"t": "error", "code": code, "message": message}))
        await asyncio.wait_for(writer.drain(), LINGER_S)
    except Exception:  # the peer may already be gone; closing is what matters
        pass


async def _drop(writer: asyncio.StreamWriter) -> None:
    """Close the connection, aborting it if the TLS close does not finish promptly."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), LINGER_S)
        return
    except Exception:  # timeout (a silent peer never answers close_notify), TLS errors
        pass
    with contextlib.suppress(Exception):
        writer.transport.abort()


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
        code = _peer_text(header.get("code"), "invalid_request")
        message = _peer_text(header.get("message"), "refused by the controller")
        if code == "auth_failed":
            raise AuthError(code, message)
        raise HandshakeError(code, message)
    if frame.type != "welcome":
        raise ProtocolError(f"expected welcome, got {frame.type[:40]!r}")
    version = header.get("version")
    if not _is_int(version) or version not in versions:
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


# ------------------------------------------------------------ inbound handshake

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
    code = _peer_text(header.get("code"), "invalid_request")
    message = _peer_text(header.get("message"), f"refused by the {peer}")
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
        await _drop(writer)
        return HandshakeError("timeout", f"no {waiting} from the {peer} within {timeout:g} s")
    if isinstance(exc, HandshakeError):
        if refuse_own and exc.code not in ("timeout", "transport_error"):
            await _send_error(writer, exc.code, exc.message)
        await _drop(writer)
        return exc
    if isinstance(exc, ProtocolError):
        await _send_error(writer, exc.code, exc.message)
        await _drop(writer)
        return _own_refusal(exc, peer)
    if isinstance(exc, (EOFError, OSError)):
        await _drop(writer)
        return HandshakeError("transport_error", f"connection lost during handshake: {exc}")
    # A bug. Only the type is logged: the exception's text might quote a header value.
    log.error("handshake failed with %s", type(exc).__name__)
    await _drop(writer)
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
    if not _is_int(version):
        raise ProtocolError('hello needs an integer "version"')
    if version not in versions:
        raise ProtocolError(
            f"the controller chose a version the agent did not offer: it speaks "
            f"{sorted(set(versions))}",
            "unsupported_version",
        )
    server = header.get("server")
    if not isinstance(server, str) or not 0 < len(server) <= MAX_PEER_TEXT or not _encodable(server):
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
    if welcome.get("version") != version or not _is_int(welcome.get("version")):
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


# ------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class Event:
    """One thing that happened on a :class:`ControllerStream`, from ``events()``.

    ``kind`` is ``"out"`` (process output; ``stream`` is ``"stdout"``/``"stderr"``,
    ``body`` the bytes), ``"meta"`` (``size`` and ``mode`` of a file being sent),
    ``"data"`` (``body`` is a chunk of file content), ``"done"`` (``result`` is the
    operation's result object) or ``"fail"`` (``error`` is ``{"code", "message"}``).
    ``done`` and ``fail`` are always last.
    """

    kind: str
    stream: Optional[str] = None
    body: bytes = field(default=b"", repr=False)
    result: Optional[Dict[str, Any]] = None
    error: Optional[Dict[str, str]] = None
    size: Optional[int] = None
    mode: Optional[int] = None


@dataclass
class ConnectionStats:
    """Counters for metrics and for tests that check memory stays bounded."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    queued_data_bytes: int = 0
    """Body bytes waiting in this side's writer data queues right now."""
    max_queued_data_bytes: int = 0
    buffered_in_bytes: int = 0
    """Received body bytes not yet taken by a consumer right now."""
    max_buffered_in_bytes: int = 0
    pings_sent: int = 0
    """Heartbeat pings this side sent (only when the link was quiet)."""


_T = TypeVar("_T")


class _Inbox(Generic[_T]):
    """A FIFO with one consumer and no bound: the part of asyncio.Queue a stream uses.

    Every command opens a stream, and asyncio.Queue's constructor (two deques and an
    Event) showed up at about 6% of a gateway's CPU when it was answering pings. Flow
    control bounds what arrives here, not the inbox.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: Deque[_T] = deque()
        self._waiter: Optional[asyncio.Future[None]] = None

    def put_nowait(self, item: _T) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> _T:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> _T:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                # Cancelled while waiting: nothing was taken, so nothing is lost.
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()


class _Stream:
    """State common to both ends of a stream: credit for sending, accounting for receiving."""

    def __init__(self, conn: Connection, stream_id: int, op: str, args: Dict[str, Any]) -> None:
        self.conn = conn
        self.id = stream_id
        self.op = op
        self.args = args
        self._credit = conn.peer_window
        # Made on first wait: most streams (ping, info, exec without much output) never wait.
        self._credit_event: Optional[asyncio.Event] = None
        self._recv_unacked = 0  # received body bytes not yet granted back
        self._consumed = 0  # consumed body bytes not yet granted back
        self._ended = False
        self._end_error: Optional[Tuple[str, str]] = None

    @property
    def ended(self) -> bool:
        """True once the stream finished (done, fail, cancel or connection closed)."""
        return self._ended

    def _check_sendable(self) -> None:
        if self.conn._closing:
            raise StreamError("server_offline", self.conn.close_reason or "connection closed")
        if self._ended:
            code, message = self._end_error or ("invalid_request", "stream already ended")
            raise StreamError(code, message)

    async def _wait_credit(self) -> None:
        while True:
            self._check_sendable()
            if self._credit > 0:
                return
            if self._credit_event is None:
                self._credit_event = asyncio.Event()
            self._credit_event.clear()
            await self._credit_event.wait()

    def _add_credit(self, n: int) -> None:
        # Capped at the announced window: a peer granting more than it received must
        # not make us queue unbounded data for it.
        self._credit = min(self._credit + n, self.conn.peer_window)
        if self._credit_event is not None:
            self._credit_event.set()

    async def _send_body(
        self, header: Dict[str, Any], data: Union[bytes, bytearray, memoryview]
    ) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        offset = 0
        total = len(view)
        while offset < total:
            await self._wait_credit()
            n = min(total - offset, self.conn.peer_max_body, self._credit)
            self._credit -= n
            self.conn._enqueue_data(self.id, encode_frame(header, view[offset : offset + n]), n)
            offset += n

    def _mark_ended(self, code: Optional[str], message: str) -> None:
        self._ended = True
        if code is not None:
            self._end_error = (code, message)
        self.conn._streams.pop(self.id, None)
        if self._credit_event is not None:
            self._credit_event.set()  # wake senders so they raise StreamError


class ControllerStream(_Stream):
    """The controller's end of one operation; made by :meth:`Connection.open_stream`.

    Send request data with :meth:`send` / :meth:`send_eof` (for ``put``), read what
    the agent sends with :meth:`events` (one consumer), stop it with :meth:`cancel`.
    """

    def __init__(self, conn: Connection, stream_id: int, op: str, args: Dict[str, Any]) -> None:
        super().__init__(conn, stream_id, op, args)
        self._inbox: _Inbox[Event] = _Inbox()
        self._eof_sent = False
        self._got_meta = False
        self._finished = False  # the consumer has taken done/fail

    async def send(self, body: Union[bytes, bytearray, memoryview]) -> None:
        """Send ``body`` as ``data`` frames, split to the agent's ``max_body``.

        Waits while the agent has a full window of our bytes unconsumed, so a slow
        agent slows the caller down instead of growing a buffer. Raises
        :class:`StreamError` if the stream ended (the agent finished or failed, the
        stream was cancelled, the connection closed) or after :meth:`send_eof`.
        """
        if self._eof_sent:
            raise StreamError("invalid_request", "data after eof")
        await self._send_body({"t": "data", "s": self.id}, body)

    async def send_eof(self) -> None:
        """Mark the end of the request data; sent after every queued data frame."""
        self._check_sendable()
        if not self._eof_sent:
            self._eof_sent = True
            self.conn._enqueue_ordered(self.id, encode_frame({"t": "eof", "s": self.id}))

    async def events(self) -> AsyncIterator[Event]:
        """Yield the agent's events in order, ending after ``done`` or ``fail``.

        Taking a ``data``/``out`` event gives its bytes back to the agent as credit.
        If the connection closes, a ``fail`` event with code ``server_offline``
        arrives at once, so iterating never hangs on a dead agent. Only one task may
        iterate.
        """
        while not self._finished:
            yield await self.next_event()

    async def next_event(self) -> Event:
        """The next event, as :meth:`events` yields them, without an async generator.

        A generator left at ``done`` is finalized later by the event loop (a wake-up
        and a task for every command); a caller that stops at ``done`` uses this.
        Raises :class:`StreamError` once ``done`` or ``fail`` was taken.
        """
        if self._finished:
            raise StreamError("invalid_request", "the final event was already taken")
        event = await self._inbox.get()
        if event.kind in DATA_FRAME_TYPES:
            self.conn._consumed(self, len(event.body))
        elif event.kind in ("done", "fail"):
            self._finished = True
        return event

    async def final(self) -> Event:
        """Wait for the ``done`` or ``fail`` event and return it, dropping any before it.

        The cheap way to await an operation whose output nobody reads (ping, info):
        no async generator per call. Dropped ``data``/``out`` bytes are given back as
        credit like taken ones. Only one task may wait, and not beside :meth:`events`.
        """
        while True:
            event = await self.next_event()
            if event.kind in ("done", "fail"):
                return event

    def cancel(self) -> None:
        """Cancel the operation: the agent cancels its handler.

        The stream ends here at once with a ``fail`` event (code ``cancelled``); any
        late frames the agent sends for it are ignored. No-op if already ended.
        """
        if self._ended:
            return
        self.conn._drop_data(self.id)
        if not self.conn._closing:
            self.conn._enqueue_control(encode_frame({"t": "cancel", "s": self.id}))
        self._drain_inbox()
        self._finish_with(
            Event("fail", error={"code": "cancelled", "message": "cancelled by the controller"})
        )

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            event = self._inbox.get_nowait()
            self.conn._unbuffer(len(event.body))

    def _finish_with(self, event: Event) -> None:
        error = event.error or {}
        if event.kind == "fail":
            self._mark_ended(error.get("code", "internal"), error.get("message", ""))
        else:
            self._mark_ended("invalid_request", "stream already ended")
        self._inbox.put_nowait(event)

    # -- called by the connection's reader

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        h = frame.header
        if t in DATA_FRAME_TYPES:
            if not frame.body:
                return  # empty chunks cost no credit; dropping them bounds the inbox
            self.conn._account_received(self, len(frame.body))
            name = h.get("stream") if t == "out" else None
            self._inbox.put_nowait(
                Event(t, stream=_peer_text(name, "stdout") if t == "out" else None, body=frame.body)
            )
        elif t == "meta":
            if self._got_meta:
                return  # one per stream; more would be an unbounded queue
            self._got_meta = True
            size, mode = h.get("size"), h.get("mode")
            self._inbox.put_nowait(
                Event(
                    "meta",
                    size=size if _is_int(size) else None,
                    mode=mode if _is_int(mode) else None,
                )
            )
        elif t == "done":
            result = h.get("result", {})
            if isinstance(result, dict):
                self._finish_with(Event("done", result=result))
            else:
                self._finish_with(
                    Event(
                        "fail",
                        error={"code": "internal", "message": "agent sent a malformed result"},
                    )
                )
        elif t == "fail":
            error = h.get("error")
            error = error if isinstance(error, dict) else {}
            self._finish_with(
                Event(
                    "fail",
                    error={
                        "code": _peer_text(error.get("code"), "internal"),
                        "message": _peer_text(error.get("message"), "operation failed"),
                    },
                )
            )
        # anything else (e.g. a future frame type) is ignored

    def _connection_closed(self, reason: str) -> None:
        if not self._ended:
            self._finish_with(Event("fail", error={"code": "server_offline", "message": reason}))


class AgentStream(_Stream):
    """The agent's end of one operation, handed to the connection's ``on_open`` callback.

    ``op`` and ``args`` are what the controller asked for. Send with
    :meth:`send_out` / :meth:`send_meta` / :meth:`send_data`, read uploaded data with
    :meth:`data`, finish with :meth:`done` or :meth:`fail` (or just return from the
    callback: see :class:`Connection`).
    """

    def __init__(
        self,
        conn: Connection,
        stream_id: int,
        op: str,
        args: Dict[str, Any],
        header: Dict[str, Any],
    ) -> None:
        super().__init__(conn, stream_id, op, args)
        self.header = header
        """The raw ``open`` header, for fields a later revision may add."""
        self._inbox: _Inbox[Optional[bytes]] = _Inbox()
        self._eof = False  # eof frame received
        self._eof_taken = False  # data() reached it
        self._cancel_requested = False
        self._task: Optional[asyncio.Task[None]] = None

    @property
    def cancelled(self) -> bool:
        """True once the controller sent ``cancel`` for this stream."""
        return self._cancel_requested

    async def send_out(self, stream_name: str, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send process output (``stream_name`` is ``"stdout"`` or ``"stderr"``).

        Split into frames of at most the controller's ``max_body``; waits for credit
        when the controller has a full window unconsumed.
        """
        if stream_name not in ("stdout", "stderr"):
            raise ValueError('stream_name must be "stdout" or "stderr"')
        await self._send_body({"t": "out", "s": self.id, "stream": stream_name}, data)

    async def send_meta(self, size: int, mode: Optional[int] = None) -> None:
        """Announce the size and permission bits of the file about to be sent (``get``)."""
        self._check_sendable()
        self.conn._enqueue_ordered(
            self.id, encode_frame({"t": "meta", "s": self.id, "size": size, "mode": mode})
        )

    async def send_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send file content as ``data`` frames; flow-controlled like :meth:`send_out`."""
        await self._send_body({"t": "data", "s": self.id}, data)

    async def data(self) -> AsyncIterator[bytes]:
        """Yield the chunks the controller sends, until its ``eof``.

        Taking a chunk gives its bytes back to the controller as credit, so reading
        slowly throttles the sender. Only one task may iterate.
        """
        while not self._eof_taken:
            chunk = await self._inbox.get()
            if chunk is None:
                self._eof_taken = True
                return
            self.conn._consumed(self, len(chunk))
            yield chunk

    async def done(self, result: Optional[Dict[str, Any]] = None) -> None:
        """Finish successfully with ``result``; sent after all queued output."""
        self._end({"t": "done", "s": self.id, "result": result or {}})

    async def fail(self, code: str, message: str) -> None:
        """Finish with an error (``code`` from the bus error codes); sent after queued output."""
        self._end({"t": "fail", "s": self.id, "error": {"code": code, "message": message}})

    def _end(self, header: Dict[str, Any]) -> None:
        self._check_sendable()
        frame = encode_frame(header)
        self._mark_ended("invalid_request", "stream already ended")
        self._drain_inbox()
        self._inbox.put_nowait(None)  # a data() still iterating ends instead of hanging
        self.conn._enqueue_ordered(self.id, frame)

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            chunk = self._inbox.get_nowait()
            if chunk is not None:
                self.conn._unbuffer(len(chunk))

    # -- called by the connection's reader

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t == "data":
            if not frame.body or self._eof:
                return
            self.conn._account_received(self, len(frame.body))
            self._inbox.put_nowait(frame.body)
        elif t == "eof":
            if not self._eof:
                self._eof = True
                self._inbox.put_nowait(None)
        elif t == "cancel":
            self._cancel_requested = True
            self.conn._drop_data(self.id)
            if self._task is not None and not self._task.done():
                self._task.cancel()

    def _connection_closed(self, reason: str) -> None:
        if not self._ended:
            self._mark_ended("server_offline", reason)
        if (
            self._task is not None
            and not self._task.done()
            and self._task is not asyncio.current_task()
        ):
            self._task.cancel()


class _FrameReader(asyncio.Protocol):
    """The transport's protocol once a :class:`Connection` starts: frames are parsed and
    dispatched in the transport's own callback.

    The handshake reads with asyncio's stream reader; after it, a reader task cost a
    loop iteration per received frame (the reader wakes the task, which runs in the
    next iteration), and a command is one frame each way. The stream writer stays in
    use: write-side flow control (``pause_writing``/``resume_writing``, behind
    ``drain()``) and the end of the connection (behind ``wait_closed()``) are passed on
    to the stream protocol the handshake used, so both keep working unchanged.
    """

    def __init__(self, conn: Connection, previous: asyncio.BaseProtocol) -> None:
        self._conn = conn
        self._previous = previous

    def data_received(self, data: bytes) -> None:
        self._conn._data_received(data)

    def eof_received(self) -> Optional[bool]:
        self._conn._eof_received()
        eof_received = getattr(self._previous, "eof_received", None)
        return eof_received() if eof_received is not None else None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._conn._connection_lost(exc)
        self._previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        self._previous.resume_writing()


OnOpen = Callable[[AgentStream], Awaitable[Optional[Dict[str, Any]]]]
"""``async on_open(stream) -> result or None``: runs one operation on the agent."""


# ----------------------------------------------------------------------- connection


class Connection:
    """One handshaken protocol connection, for either role.

    Build it with :meth:`from_welcome` (agent) or :meth:`from_accepted` (controller)
    right after the handshake, or with the constructor. Then :meth:`start` it (or use
    ``async with``), and :meth:`close` it when done; :meth:`wait_closed` returns when
    it closed for any reason, and :attr:`close_reason` says why.

    Controller role: :meth:`open_stream` starts an operation on the agent.

    Agent role: each ``open`` runs ``await on_open(stream)`` in its own task, unless
    ``on_open`` has an ``answer_now(stream)`` method that returns the result dict at
    once (it returns None for operations that need the task, and must not raise). The
    stream is finished for you when the callback does not: a returned dict (or None)
    becomes ``done``; an exception with string ``code`` and ``message`` attributes
    becomes ``fail`` with those; any other exception becomes ``fail`` ``internal``
    (logged here, never sent); a ``cancel`` from the controller cancels the task and
    answers ``fail`` ``cancelled``. When the connection closes every handler task is
    cancelled.

    All methods must be called from the event loop that runs the connection.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        role: str,
        heartbeat_s: float,
        peer_max_body: int,
        peer_window: int,
        max_body: int = DEFAULT_MAX_BODY,
        window: int = DEFAULT_WINDOW,
        on_open: Optional[OnOpen] = None,
        name: Optional[str] = None,
        version: int = 1,
    ) -> None:
        """``max_body``/``window`` are ours (as announced in the handshake),
        ``peer_*`` the other side's; ``name`` is the server name, for messages;
        ``version`` the negotiated protocol version."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if role == "controller" and on_open is not None:
            raise ValueError("only the agent role runs operations (on_open)")
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        self.role = role
        self.name = name
        self.version = version
        self.heartbeat_s = float(heartbeat_s)
        self.max_body = max_body
        self.window = window
        self.peer_max_body = peer_max_body
        self.peer_window = peer_window
        self.stats = ConnectionStats()
        self._reader = reader
        self._writer = writer
        self._on_open = on_open
        self._peer = "agent" if role == "controller" else "controller"
        self._streams: Dict[int, Union[ControllerStream, AgentStream]] = {}
        self._next_id = 1  # controller: next stream id to open
        self._last_open = 0  # agent: highest stream id opened so far
        self._handlers: Dict[int, asyncio.Task[None]] = {}
        # Writer queues. Control frames first, then one data frame per stream in turn.
        self._control: Deque[bytes] = deque()
        self._grants: Dict[int, int] = {}  # coalesced window frames, one per stream
        self._pong: Optional[int] = None  # coalesced: only the latest ping is answered
        self._ping: Optional[int] = None
        self._data: Dict[int, Deque[Tuple[bytes, int]]] = {}
        self._round: Deque[int] = deque()  # stream ids with queued data, in turn order
        self._wake = asyncio.Event()
        self._final: Optional[bytes] = None  # goaway/error to flush before closing
        self._final_sent = asyncio.Event()
        self._tasks: List[asyncio.Task[None]] = []  # the writer task, once started
        self._parser = FrameParser(max_body)
        self._last_rx = time.monotonic()
        self._write_blocked_since: Optional[float] = None
        self._ping_seq = 0
        self._next_ping = 0.0
        self._heartbeat_timer: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closing = False
        self._close_reason: Optional[str] = None
        self._close_code: Optional[str] = None
        self._close_task: Optional[asyncio.Task[None]] = None
        self._closed = asyncio.Event()

    @classmethod
    def from_welcome(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        welcome: Welcome,
        on_open: OnOpen,
    ) -> Connection:
        """The agent's connection after :func:`agent_handshake` returned ``welcome``."""
        return cls(
            reader,
            writer,
            role="agent",
            heartbeat_s=welcome.heartbeat_s,
            peer_max_body=welcome.peer_max_body,
            peer_window=welcome.peer_window,
            max_body=welcome.max_body,
            window=welcome.window,
            on_open=on_open,
            name=welcome.server,
            version=welcome.version,
        )

    @classmethod
    def from_accepted(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: Accepted
    ) -> Connection:
        """The controller's connection after :func:`controller_handshake` returned ``accepted``."""
        return cls(
            reader,
            writer,
            role="controller",
            heartbeat_s=accepted.heartbeat_s,
            peer_max_body=accepted.peer_max_body,
            peer_window=accepted.peer_window,
            max_body=accepted.max_body,
            window=accepted.window,
            name=accepted.server,
            version=accepted.version,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start reading, the writer task and the heartbeat timer (once, inside the event loop).

        Frames the handshake's reader already holds are dispatched before this returns.
        """
        if self._tasks or self._closing:
            raise RuntimeError("connection already started or closed")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_rx = now = time.monotonic()
        label = self.name or "?"
        self._tasks = [loop.create_task(self._write_loop(), name=f"fleetbus-proto-write-{label}")]
        self._next_ping = now + self.heartbeat_s
        self._heartbeat_timer = loop.call_at(self._next_ping, self._heartbeat)
        self._take_over_reading()

    async def close(
        self, reason: str = "connection closed", code: Optional[str] = None, goaway: bool = False
    ) -> None:
        """Close the connection; safe to call many times and from any task.

        Every open stream fails at once with ``server_offline`` and ``reason`` as its
        message. With ``goaway=True`` the peer is told first (``{"t": "goaway",
        "code": code, "message": reason}``, waited for at most a second) so its
        streams fail with the same message. Returns once the connection is closed;
        cancelling the caller does not stop the close.
        """
        final = None
        if goaway:
            final = encode_frame({"t": "goaway", "code": code or "closing", "message": reason})
        self._begin_close(reason, code, final)
        assert self._close_task is not None
        await asyncio.shield(self._close_task)

    @property
    def closed(self) -> bool:
        """True as soon as closing started (streams have failed; nothing more is sent)."""
        return self._closing

    @property
    def close_reason(self) -> Optional[str]:
        """Why the connection closed (the message streams failed with), or None if open."""
        return self._close_reason

    @property
    def close_code(self) -> Optional[str]:
        """The code given to :meth:`close` or received in the peer's goaway/error, if any."""
        return self._close_code

    async def wait_closed(self) -> None:
        """Return once the connection is fully closed (tasks stopped, socket closed)."""
        await self._closed.wait()

    @property
    def peer_address(self) -> Any:
        """The peer's socket address, as ``writer.get_extra_info("peername")`` gives it."""
        return self._writer.get_extra_info("peername")

    @property
    def open_streams(self) -> int:
        """How many streams are in flight."""
        return len(self._streams)

    async def __aenter__(self) -> Connection:  # noqa: PYI034 - typing.Self is 3.11+, the agent runs on 3.9
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close("connection closed")

    def _begin_close(
        self, reason: str, code: Optional[str], final: Optional[bytes], abort: bool = False
    ) -> None:
        """Synchronous first half of closing: fail streams now, then close in a task.

        ``abort`` skips the polite TLS close for a peer known to be dead, which would
        only sit out the linger time waiting for an answer that never comes.
        """
        if self._close_task is not None:
            return
        self._closing = True
        self._close_reason = reason
        self._close_code = code
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        for stream in list(self._streams.values()):
            stream._connection_closed(reason)
        self._streams.clear()
        # Nothing queued goes out any more, except the final goaway/error frame.
        self._control.clear()
        self._data.clear()
        self._round.clear()
        self._grants.clear()
        self._pong = self._ping = None
        self.stats.queued_data_bytes = 0
        self._final = final
        self._wake.set()
        self._close_task = asyncio.get_running_loop().create_task(
            self._finish_close(abort), name=f"fleetbus-proto-close-{self.name or '?'}"
        )

    async def _finish_close(self, abort: bool) -> None:
        writer_task = self._tasks[0] if self._tasks else None
        if self._final is not None:
            if writer_task is not None and not writer_task.done():
                # A peer that is not reading gets LINGER_S; closing matters more.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._final_sent.wait(), LINGER_S)
            elif writer_task is None:
                try:  # never started: write it directly
                    self._writer.write(self._final)
                    await asyncio.wait_for(self._writer.drain(), LINGER_S)
                except Exception:
                    pass
        for task in self._tasks:
            task.cancel()
        handlers = list(self._handlers.values())
        for task in handlers:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if handlers:
            # Bounded: a handler that swallows cancellation must not block closing.
            await asyncio.wait(handlers, timeout=LINGER_S)
        if abort:
            self._writer.transport.abort()
        else:
            await _drop(self._writer)
        self._closed.set()

    # ----------------------------------------------------------------- controller

    def open_stream(self, op: str, args: Optional[Dict[str, Any]] = None) -> ControllerStream:
        """Open a stream running ``op`` (``exec``, ``put``, ``get``, ``info``, ``ping``)
        with ``args`` on the agent (controller role only).

        Raises :class:`StreamError` (``server_offline``) if the connection is closed
        and ValueError if the ``open`` header would exceed the 64 KiB limit.
        """
        if self.role != "controller":
            raise RuntimeError("only the controller opens streams")
        if self._closing:
            raise StreamError("server_offline", self._close_reason or "connection closed")
        args = dict(args or {})
        stream_id = self._next_id
        frame = encode_frame({"t": "open", "s": stream_id, "op": op, "args": args})
        self._next_id += 1
        stream = ControllerStream(self, stream_id, op, args)
        self._streams[stream_id] = stream
        self._enqueue_control(frame)
        return stream

    # ---------------------------------------------------------------------- agent

    def _on_open_frame(self, frame: Frame) -> None:
        stream_id = frame.stream
        assert stream_id is not None
        if stream_id <= self._last_open:
            raise ProtocolError("stream ids must increase")
        self._last_open = stream_id
        header = frame.header
        op, args = header.get("op"), header.get("args", {})
        stream = AgentStream(
            self,
            stream_id,
            op if isinstance(op, str) else "",
            args if isinstance(args, dict) else {},
            header,
        )
        self._streams[stream_id] = stream
        if not isinstance(op, str) or not isinstance(args, dict):
            self._finish_stream(
                stream, "fail", "invalid_request", "open needs a string op and an object args"
            )
            return
        if self._on_open is None:
            self._finish_stream(stream, "fail", "invalid_request", "this agent runs no operations")
            return
        answer_now = getattr(self._on_open, "answer_now", None)
        if answer_now is not None:
            # An operation that needs no waiting (ping) is answered here, without a task:
            # creating, running and reaping one was a third of an agent's CPU per ping.
            result = answer_now(stream)
            if result is not None:
                self._finish_stream(stream, "done", result=result)
                return
        task = asyncio.get_running_loop().create_task(
            self._run_handler(stream), name=f"fleetbus-op-{stream_id}-{op[:20]}"
        )
        stream._task = task
        self._handlers[stream_id] = task
        task.add_done_callback(lambda t, st=stream: self._handler_done(t, st))

    def _handler_done(self, task: asyncio.Task[None], stream: AgentStream) -> None:
        self._handlers.pop(stream.id, None)
        if task.cancelled() and stream._cancel_requested:
            # A cancel read with its open (one TCP read) cancels the task before its
            # first step: the handler never ran to answer it, and the stream would stay
            # in the table until the connection closes. Nothing if it was answered.
            self._finish_stream(stream, "fail", "cancelled", "cancelled by the controller")

    async def _run_handler(self, stream: AgentStream) -> None:
        assert self._on_open is not None
        try:
            result = await self._on_open(stream)
        except asyncio.CancelledError:
            if stream._cancel_requested and not self._closing:
                self._finish_stream(stream, "fail", "cancelled", "cancelled by the controller")
                return  # the cancel was ours to handle; the task ends normally
            raise
        except Exception as exc:
            code, message = getattr(exc, "code", None), getattr(exc, "message", None)
            if isinstance(code, str) and isinstance(message, str):
                self._finish_stream(stream, "fail", code, message)
            else:
                # Unexpected: log the traceback here, send nothing revealing.
                log.exception("operation %r on stream %d failed", stream.op, stream.id)
                self._finish_stream(stream, "fail", "internal", "internal error in the agent")
        else:
            if stream._cancel_requested:
                self._finish_stream(stream, "fail", "cancelled", "cancelled by the controller")
            elif isinstance(result, dict) or result is None:
                self._finish_stream(stream, "done", result=result)
            else:
                log.error("operation %r returned %s, not a dict", stream.op, type(result).__name__)
                self._finish_stream(stream, "fail", "internal", "internal error in the agent")

    def _finish_stream(
        self,
        stream: AgentStream,
        kind: str,
        code: str = "",
        message: str = "",
        result: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Send done/fail for a handler that did not; silently skipped if it cannot be sent."""
        if stream.ended or self._closing:
            return
        if kind == "done":
            stream._end({"t": "done", "s": stream.id, "result": result or {}})
        else:
            stream._end({"t": "fail", "s": stream.id, "error": {"code": code, "message": message}})

    # -------------------------------------------------------------- writer queues

    def _enqueue_control(self, frame: bytes) -> None:
        if self._closing:
            return
        if self._write_now(frame):
            return
        self._control.append(frame)
        self._wake.set()

    def _write_now(self, frame: bytes) -> bool:
        """Write ``frame`` at once when nothing waits ahead of it and the socket is idle.

        A command is a control frame each way (open, then done), and waking the writer
        task for each one was a loop iteration per frame on both ends; on a busy gateway
        that is a measurable part of every ping. Queue order is kept: the frame goes out
        directly only when every queue is empty. Larger frames and a socket with unsent
        bytes take the writer task, which waits for the peer and notices a stalled one,
        as does a write that fails here.
        """
        if (
            len(frame) > _DIRECT_WRITE_MAX
            or not self._tasks  # not started: the writer task sends everything in order
            or self._control
            or self._round
            or self._grants
            or self._pong is not None
            or self._ping is not None
        ):
            return False
        transport = self._writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        try:
            self._writer.write(frame)
        except Exception:  # the writer task meets the same error and closes
            return False
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(frame)
        return True

    def _enqueue_data(self, stream_id: int, frame: bytes, nbytes: int) -> None:
        if self._closing:
            return
        queue = self._data.get(stream_id)
        if queue is None:
            queue = self._data[stream_id] = deque()
            self._round.append(stream_id)
        queue.append((frame, nbytes))
        stats = self.stats
        stats.queued_data_bytes += nbytes
        stats.max_queued_data_bytes = max(stats.max_queued_data_bytes, stats.queued_data_bytes)
        self._wake.set()

    def _enqueue_ordered(self, stream_id: int, frame: bytes) -> None:
        """Queue a stream's control frame (meta/eof/done/fail) after its queued data.

        Control frames normally overtake data; these must not, or ``done`` would
        arrive before the output it ends.
        """
        queue = self._data.get(stream_id)
        if queue:
            queue.append((frame, 0))
            self._wake.set()
        else:
            self._enqueue_control(frame)

    def _drop_data(self, stream_id: int) -> None:
        queue = self._data.pop(stream_id, None)
        if queue:
            self.stats.queued_data_bytes -= sum(n for _, n in queue)
            with contextlib.suppress(ValueError):
                self._round.remove(stream_id)

    def _next_frame(self) -> Optional[bytes]:
        if self._control:
            return self._control.popleft()
        if self._pong is not None:
            frame = encode_frame({"t": "pong", "n": self._pong})
            self._pong = None
            return frame
        if self._grants:
            stream_id = next(iter(self._grants))
            n = self._grants.pop(stream_id)
            return encode_frame({"t": "window", "s": stream_id, "n": n})
        if self._ping is not None:
            frame = encode_frame({"t": "ping", "n": self._ping})
            self._ping = None
            self.stats.pings_sent += 1
            return frame
        while self._round:
            stream_id = self._round.popleft()
            queue = self._data.get(stream_id)
            if not queue:
                self._data.pop(stream_id, None)
                continue
            frame, nbytes = queue.popleft()
            if queue:
                self._round.append(stream_id)  # its next frame waits for the others
            else:
                del self._data[stream_id]
            self.stats.queued_data_bytes -= nbytes
            return frame
        return None

    async def _write_loop(self) -> None:
        writer = self._writer
        try:
            while True:
                if self._closing:
                    if self._final is not None:
                        writer.write(self._final)
                        await writer.drain()
                        self._final_sent.set()
                    return
                frame = self._next_frame()
                if frame is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                writer.write(frame)
                self.stats.frames_sent += 1
                self.stats.bytes_sent += len(frame)
                # Recorded so the heartbeat timer can drop a peer that stopped reading.
                self._write_blocked_since = time.monotonic()
                await writer.drain()
                self._write_blocked_since = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ConnectionResetError, ssl errors, closed transport
            reason = f"{self._peer} connection lost: write failed: {exc or type(exc).__name__}"
            self._begin_close(reason, None, None, abort=True)

    # --------------------------------------------------------------------- reader

    def _take_over_reading(self) -> None:
        """Parse frames in the transport's callback from now on (see :class:`_FrameReader`)."""
        reader, transport = self._reader, self._writer.transport
        # What the stream reader holds already (frames sent right behind the handshake)
        # comes first. Private attributes, but the same from 3.9 to 3.13; StreamReader
        # has no public way to take its buffer without awaiting.
        buffered = reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)
        buffered.clear()
        transport.set_protocol(_FrameReader(self, transport.get_protocol()))
        if getattr(reader, "_paused", False):  # it had stopped reading for a full buffer
            reader._paused = False  # type: ignore[attr-defined]
            transport.resume_reading()
        if leftover:
            self._data_received(leftover)
        exc = reader.exception()
        if exc is not None:  # the connection broke before we took it over
            self._connection_lost(exc)
        elif reader.at_eof():
            self._eof_received()

    def _data_received(self, data: bytes) -> None:
        if self._closing:
            return  # as a cancelled reader task would: nothing read is acted on any more
        parser = self._parser
        parser.feed(data)
        stats = self.stats
        try:
            while not self._closing:
                frame = parser.next()
                if frame is None:
                    return
                self._last_rx = time.monotonic()
                stats.frames_received += 1
                stats.bytes_received += frame.size
                self._on_frame(frame)
        except ProtocolError as exc:
            final = encode_frame({"t": "error", "code": exc.code, "message": exc.message})
            self._begin_close(
                f"{self._peer} connection lost: protocol error: {exc.message}", exc.code, final
            )
        except Exception as exc:
            log.exception("protocol reader failed")
            self._begin_close(
                f"{self._peer} connection lost: internal error: {type(exc).__name__}",
                "internal",
                None,
            )

    def _eof_received(self) -> None:
        if self._closing:
            return
        what = "connection closed in the middle of a frame" if self._parser.pending else "connection closed by peer"
        self._begin_close(f"{self._peer} connection lost: {what}", None, None)

    def _connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._closing:
            return
        if exc is None:
            self._eof_received()
            return
        # A socket or TLS error (ssl.SSLError, ConnectionResetError): nobody to be polite to.
        reason = f"{self._peer} connection lost: {exc or type(exc).__name__}"
        self._begin_close(reason, None, None, abort=True)

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t == "goaway":
            code = _peer_text(frame.header.get("code"), "closing")
            message = _peer_text(frame.header.get("message")) or f"{self._peer} closed the connection ({code})"
            self._begin_close(message, code, None)
        elif t == "error":
            code = _peer_text(frame.header.get("code"), "invalid_request")
            message = _peer_text(frame.header.get("message"))
            self._begin_close(
                f"{self._peer} connection lost: {self._peer} reported {code}: {message}", code, None
            )
        else:
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        t = frame.type
        if t == "ping":
            n = frame.header.get("n")
            n = n if _is_int(n) else 0
            # Straight to an idle socket: waking the writer task for it was a loop
            # iteration per idle connection per interval.
            if not self._write_now(encode_frame({"t": "pong", "n": n})):
                self._pong = n
                self._wake.set()
            return
        if t not in STREAM_FRAME_TYPES:
            return  # pong (liveness is already noted) or a type from a later revision
        stream_id = frame.stream
        if stream_id is None:
            raise ProtocolError(f'"{t}" frame lacks a stream id')
        if t == "open":
            if self.role == "agent":
                self._on_open_frame(frame)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # finished or cancelled stream: late frames are expected
        if t == "window":
            n = frame.header.get("n")
            if not _is_int(n) or n <= 0:
                raise ProtocolError('"window" needs a positive integer "n"')
            stream._add_credit(n)
            return
        stream._on_frame(frame)

    # ---------------------------------------------------------------- flow control

    def _account_received(self, stream: _Stream, nbytes: int) -> None:
        # Enforced, not trusted: a peer ignoring our window could otherwise fill memory.
        if stream._recv_unacked + nbytes > self.window:
            raise ProtocolError(f"stream {stream.id} exceeded its flow-control window")
        stream._recv_unacked += nbytes
        stats = self.stats
        stats.buffered_in_bytes += nbytes
        stats.max_buffered_in_bytes = max(stats.max_buffered_in_bytes, stats.buffered_in_bytes)

    def _unbuffer(self, nbytes: int) -> None:
        self.stats.buffered_in_bytes -= nbytes

    def _consumed(self, stream: _Stream, nbytes: int) -> None:
        """A consumer took ``nbytes``: grant them back once half a window piled up."""
        self._unbuffer(nbytes)
        if stream.ended or self._closing:
            return
        stream._consumed += nbytes
        if stream._consumed >= max(1, self.window // _GRANT_FRACTION):
            n = stream._consumed
            stream._consumed = 0
            stream._recv_unacked -= n
            self._grants[stream.id] = self._grants.get(stream.id, 0) + n
            self._wake.set()

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        """Check liveness and ping a quiet link; runs from a loop timer, not a task.

        One timer per connection, rescheduled for the next moment something can be
        due: a task sleeping in a loop cost a future and a task step per wake-up as
        well, and with thousands of idle agents on a gateway those wake-ups were a
        large part of its idle CPU.

        A ping is only needed where nothing else has arrived: any frame proves the peer
        alive, and a ping's pong proves it to the pinger while the ping proves it to the
        other side. So only the controller pings an idle link; the agent pings only once
        the controller has been silent for two intervals. One ping and one pong per
        interval per idle connection, instead of two each.
        """
        self._heartbeat_timer = None
        if self._closing:
            return
        interval = self.heartbeat_s
        dead_after = DEAD_AFTER_HEARTBEATS * interval
        quiet_for = interval if self.role == "controller" else 2 * interval
        now = time.monotonic()
        last_rx = self._last_rx
        if now - last_rx >= dead_after:
            self._begin_close(f"{self._peer} connection lost: heartbeat timeout", None, None, True)
            return
        blocked = self._write_blocked_since
        if blocked is not None and now - blocked >= dead_after:
            self._begin_close(f"{self._peer} connection lost: write timeout", None, None, True)
            return
        if now >= self._next_ping:
            if now - last_rx >= quiet_for:
                self._send_ping()
                self._next_ping = now + interval
            else:
                self._next_ping = last_rx + quiet_for  # heard from recently: wait until quiet
        wake_at = min(self._next_ping, last_rx + dead_after)
        if blocked is not None:
            wake_at = min(wake_at, blocked + dead_after)
        assert self._loop is not None
        self._heartbeat_timer = self._loop.call_at(max(now, wake_at), self._heartbeat)

    def _send_ping(self) -> None:
        self._ping_seq += 1
        if self._write_now(encode_frame({"t": "ping", "n": self._ping_seq})):
            self.stats.pings_sent += 1
            return
        self._ping = self._ping_seq
        self._wake.set()
