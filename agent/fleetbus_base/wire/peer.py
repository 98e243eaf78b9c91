"""What the wire accepts from a peer it does not trust yet, and how it leaves one.

Shared by the handshake, the streams and the connection: the cap on peer-supplied
text, integer checks that refuse ``bool``, and closing that never waits on a silent peer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .frames import encode_frame

LINGER_S = 1.0
"""How long closing code waits for a last frame or a TLS close to get through."""


MAX_PEER_TEXT = 1000
"""Peer-supplied messages are cut to this many characters before we keep or log them."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def peer_text(value: Any, default: str = "") -> str:
    text = value if isinstance(value, str) else default
    return text[:MAX_PEER_TEXT]


def encodable(text: str) -> bool:
    """False for a string JSON decoded from a lone surrogate escape: it cannot be sent
    back (the welcome echoes the server name) and is no name anyway."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def send_error(writer: asyncio.StreamWriter, code: str, message: str) -> None:
    """Best effort: tell the peer why we are closing. Never raises."""
    try:
        writer.write(encode_frame({"t": "error", "code": code, "message": message}))
        await asyncio.wait_for(writer.drain(), LINGER_S)
    except Exception:  # the peer may already be gone; closing is what matters
        pass


async def drop(writer: asyncio.StreamWriter) -> None:
    """Close the connection, aborting it if the TLS close does not finish promptly."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), LINGER_S)
        return
    except Exception:  # timeout (a silent peer never answers close_notify), TLS errors
        pass
    with contextlib.suppress(Exception):
        writer.transport.abort()
