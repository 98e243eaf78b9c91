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
``nats.errors.NoRespondersError`` and ``nats.errors.TimeoutError``; and
:class:`~fleetbus.errors.Forbidden` at once when NATS refuses the request's subject.

NATS answers a publish its permissions refuse with ``-ERR 'Permissions Violation for
Publish to "<subject>"'`` and nothing else: the request would only time out. nats-py
hands that line (lowercased, whole) to the connection's error callback without closing
it, so the requests waiting are kept by subject and those on the refused subject fail
there (fleetbus's subjects are lowercase by its name rules, so they compare equal).
"""

from __future__ import annotations

import asyncio
import re

import nats.errors
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header

from .connection import send_now, watch_errors
from .dispatch import ReplyInbox
from .errors import Forbidden

# nats-py lowercases the server's -ERR line before it reaches the error callback.
_VIOLATION_RE = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"')


class Replies:
    """Requests on one connection, each waiting for its reply on a shared inbox."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        # subject (lowercased) -> the tokens of the requests waiting on it
        self._by_subject: dict[str, set[str]] = {}
        self._inbox = ReplyInbox(nc, self._deliver)
        watch_errors(nc, self._on_error)

    async def request(self, subject: str, payload: bytes, timeout: float,
                      headers: dict[str, str] | None = None) -> Msg:
        """Publish ``payload`` on ``subject`` and return the first reply within ``timeout``."""
        token, reply = await self._inbox.reply_to()
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        key = subject.lower()
        self._by_subject.setdefault(key, set()).add(token)
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
            tokens = self._by_subject.get(key)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._by_subject[key]
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

    def _on_error(self, exc: Exception) -> None:
        """Fail the requests NATS's permissions refused (see the module)."""
        found = _VIOLATION_RE.search(str(exc))
        if found is None:
            return
        kind, subject = found.groups()
        if kind == "publish":
            tokens = set(self._by_subject.get(subject, ()))
            error = Forbidden(f"NATS refused {subject}: your permissions do not allow it")
        elif self._inbox.prefix and subject.startswith(self._inbox.prefix.lower()):
            # Our reply inbox: no reply can arrive, for any request waiting.
            tokens = set(self._waiting)
            error = Forbidden(f"NATS refused the subscription to {subject}: your permissions do "
                              "not allow it (a user's inbox prefix is _I.<its public key>)")
        else:
            return
        for token in tokens:
            future = self._waiting.pop(token, None)
            if future is not None and not future.done():
                future.set_exception(error)
