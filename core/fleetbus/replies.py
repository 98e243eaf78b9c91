"""Request/reply for the Python client, with each reply handed over as it is read.

nats-py's ``request()`` takes a reply through a callback subscription (a queue and a
task that awaits the callback) and then ``asyncio.wait_for`` (a done callback that is
itself scheduled before the requester wakes): event-loop iterations between reading a
reply and the requester seeing it, on every command. :class:`Replies` keeps one
wildcard reply subscription per connection (:class:`~fleetbus.dispatch.ReplyInbox`) and resolves the waiting request's future
from nats-py's read loop, so no loop iteration stands between reading a reply and the
requester seeing it (its measured effect: docs/performance.md, "History of measured
changes").

It raises what ``Client.request`` raises for the outcomes the client handles:
``nats.errors.NoRespondersError`` and ``nats.errors.TimeoutError``.
"""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header

from .connection import send_now
from .dispatch import ReplyInbox


class Replies:
    """Requests on one connection, each waiting for its reply on a shared inbox."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._inbox = ReplyInbox(nc, self._deliver)

    async def request(self, subject: str, payload: bytes, timeout: float,
                      headers: dict[str, str] | None = None) -> Msg:
        """Publish ``payload`` on ``subject`` and return the first reply within ``timeout``."""
        token, reply = await self._inbox.reply_to()
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
            send_now(self._nc)
            try:
                async with asyncio.timeout(timeout):
                    msg = await future
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        finally:
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            raise nats.errors.NoRespondersError
        return msg

    async def close(self) -> None:
        """Stop listening for replies."""
        await self._inbox.close()

    def _deliver(self, token: str, msg: Msg) -> None:
        future = self._waiting.pop(token, None)
        if future is not None and not future.done():
            future.set_result(msg)
