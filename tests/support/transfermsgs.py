"""Streamed-transfer messages seen from a test: an inbox to await them on, and a sender.

Shared by the tests that play one side of a transfer by hand (tests/test_streams.py)
and those that play a stranger injecting into someone else's (tests/test_users_transfer.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

KIND_HEADER = "Fleetbus-Transfer"


class Inbox:
    """A subscription on a fresh inbox of ``nc`` whose messages the test awaits with a
    deadline (never a sleep)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.subject = nc.new_inbox()
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.sub: Any = None

    async def start(self) -> Inbox:
        async def on_msg(msg: Msg) -> None:
            self.queue.put_nowait(msg)

        self.sub = await self.nc.subscribe(self.subject, cb=on_msg)
        await self.nc.flush()
        return self

    async def next(self, kind: str | None = None, timeout: float = 30) -> Msg:
        """The next message (of ``kind``, skipping others) within ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.queue.get()
                if kind is None or (msg.headers or {}).get(KIND_HEADER) == kind:
                    return msg


async def send(nc: NATS, subject: str, kind: str, body: bytes = b"", **headers: str) -> None:
    """Publish one transfer message of ``kind``."""
    await nc.publish(subject, body, headers={KIND_HEADER: kind, **headers})
