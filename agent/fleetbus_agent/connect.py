"""Outbound mode: dial the gateway, prove the server's key, serve until told to stop.

The agent verifies the gateway first (a CA file, a pinned certificate fingerprint, or
both) and only then sends its key, inside TLS. A lost connection is retried with
jittered exponential backoff, reset after a connection that stayed up; operations in
flight when it drops are cancelled here (their results could not be delivered), and the
gateway fails them with ``server_offline``, so none runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Optional, Union

from . import __version__
from .digests import compare_digest, sha256_hex
from .handlers import Handler
from .ops.facts import server_facts
from .protocol import AuthError, Connection, HandshakeError, agent_handshake, shrink_tls_buffers

log = logging.getLogger("fleetbus_agent.connect")

CONNECT_TIMEOUT_S = 10.0
STABLE_AFTER_S = 30.0


@dataclass
class ConnectOptions:
    host: str
    port: int
    key: str
    ca_file: Optional[str] = None
    fingerprint: Optional[str] = None  # "sha256:<hex>"
    server_hostname: Optional[str] = None
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0

    def __repr__(self) -> str:  # the key stays out of any log or traceback
        return f"ConnectOptions(host={self.host!r}, port={self.port})"


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


class GatewayRejected(Exception):
    """The gateway is not who it should be (pin mismatch)."""


async def connect_once(opts: ConnectOptions, handler: Handler, stop: asyncio.Event) -> str:
    """One connection, until it closes or ``stop`` is set; returns why it ended."""
    ctx = client_context(opts)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(opts.host, opts.port, ssl=ctx,
                                server_hostname=_sni_name(opts.server_hostname or opts.host)),
        CONNECT_TIMEOUT_S,
    )
    if opts.fingerprint and not compare_digest(
        peer_fingerprint(writer), normalize_fingerprint(opts.fingerprint)
    ):
        writer.close()
        raise GatewayRejected("the gateway's certificate does not match the pinned fingerprint")
    facts = server_facts().to_dict()
    welcome = await agent_handshake(reader, writer, {"method": "key", "key": opts.key}, facts,
                                    agent=f"fleetbus-agent/{__version__}")
    conn = Connection.from_welcome(reader, writer, welcome, on_open=handler)
    conn.start()
    log.info("connected to %s:%s as %s", opts.host, opts.port, welcome.server)
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


async def run_connect(opts: ConnectOptions, stop: asyncio.Event,
                      handler: Optional[Handler] = None) -> None:
    """Stay connected to the gateway until ``stop`` is set."""
    shrink_tls_buffers()
    handler = handler or Handler()
    attempt = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            reason = await connect_once(opts, handler, stop)
            if stop.is_set():
                return
            log.warning("connection to the gateway ended: %s", reason)
        except AuthError as exc:
            log.error("the gateway refused this agent: %s", exc.message)
        except GatewayRejected as exc:
            log.error("%s; not sending the key", exc)
        except HandshakeError as exc:
            log.warning("handshake with the gateway failed: %s", exc.message)
        except ssl.SSLError as exc:
            log.error("TLS with the gateway failed: %s", exc.reason or exc)
        except (OSError, asyncio.TimeoutError, socket.gaierror) as exc:
            log.warning("cannot reach the gateway at %s:%s: %s", opts.host, opts.port,
                        exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__)
        if time.monotonic() - started > STABLE_AFTER_S:
            attempt = 0
        delay = min(opts.backoff_max_s, opts.backoff_min_s * (2 ** attempt))
        delay *= _jitter()  # jitter: a gateway restart must not bring a thundering herd
        attempt = min(attempt + 1, 30)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
