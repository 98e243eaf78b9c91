"""The fleetbus agent wire protocol: framing, handshake, multiplexed streams, flow control.

The agent and fleetbus's TLS gateway (or, in inbound mode, the agent listener and the
``agent-inbound`` transport) talk over one TLS connection with this package on both
ends. The spec is docs/agent-protocol.md; this is the map of the code, bottom up.

* :mod:`.frames`: the framing, bytes in and bytes out (:func:`read_frame`,
  :func:`encode_frame`, :class:`FrameParser`, :class:`Frame`).
* :mod:`.peer`: what is accepted from an untrusted peer and how a connection is left.
* :mod:`.negotiation`: the one negotiation (versions, limits, heartbeat) every
  handshake runs, and :mod:`.proof`, the inbound key proof (pure functions).
* :mod:`.handshake`: that negotiation in four variants.
  Outbound, :func:`agent_handshake` / :func:`controller_handshake` exchange ``hello`` /
  ``welcome`` and the agent sends its key. Inbound,
  :func:`agent_accept_handshake` / :func:`controller_connect_handshake` exchange
  ``challenge`` / ``hello`` / ``welcome`` and the controller proves it knows the key
  (:func:`inbound_proof`, bound to the agent's certificate). Each produces a
  :class:`Welcome` (agent) or :class:`Accepted` (controller).
* :mod:`.streams`: the two ends of one operation, :class:`ControllerStream` and
  :class:`AgentStream`, with per-stream credit.
* :mod:`.connection`: :class:`Connection` runs a handshaken connection (frame parser fed
  by the transport, a writer task, heartbeats).

Policy lives elsewhere: which keys are valid, certificate checks, reconnecting and
running commands are the callers' business. Standard library only, Python 3.9+ (no
``asyncio.timeout``, no ``TaskGroup``).
"""

from .connection import Connection, ConnectionStats, OnOpen
from .frames import (
    DEFAULT_MAX_BODY,
    DEFAULT_WINDOW,
    MAX_HEADER,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Frame,
    FrameParser,
    ProtocolError,
    decode_header,
    encode_frame,
    max_frame_size,
    read_frame,
)
from .handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_S,
    Accepted,
    Authenticate,
    AuthError,
    HandshakeError,
    Welcome,
    agent_accept_handshake,
    agent_handshake,
    certificate_fingerprint,
    controller_connect_handshake,
    controller_handshake,
    inbound_proof,
    peer_certificate_fingerprint,
)
from .streams import AgentStream, ControllerStream, Event, StreamError

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
    "Authenticate",
    "Connection",
    "ConnectionStats",
    "ControllerStream",
    "Event",
    "Frame",
    "FrameParser",
    "HandshakeError",
    "OnOpen",
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
