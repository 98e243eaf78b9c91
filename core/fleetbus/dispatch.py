"""Handing a subscription's messages to a plain function, straight from the read loop.

nats-py gives every callback subscription a queue and a task that awaits the callback
for one message after another. The plugin host's callback only starts a task for the
request, so that hop buys nothing and costs an event-loop iteration (plus a queue put
and get) between reading a request and starting to handle it, on every command.
:func:`subscribe_direct` subscribes without a callback (nats-py then starts no task)
and puts a stand-in where the subscription's queue was: nats-py's read loop calls
``dispatch(msg)`` as it parses the message.

The stand-in relies on how nats-py 2.x delivers messages (``Subscription._pending_queue``
and ``_pending_size``), so it is a patch: used once :mod:`fleetbus.tuning` applied
``nats_direct_dispatch`` at the entry point, and checked again at subscribe time. Where
it was not applied (another nats-py, ``FLEETBUS_TUNING=off``), the messages are read
through the subscription's public iterator in a task of our own: slower by the same
hop, never wrong.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .tuning import natspy

log = logging.getLogger("fleetbus.dispatch")

Dispatch = Callable[[Msg], None]


class _DirectQueue:
    """Stands in for ``Subscription._pending_queue``: nothing is ever pending."""

    __slots__ = ("_dispatch", "_sub")

    def __init__(self, sub: Subscription, dispatch: Dispatch) -> None:
        self._sub = sub
        self._dispatch = dispatch

    def put_nowait(self, msg: Msg) -> None:
        # nats-py counted the bytes as pending just before; they are handled already.
        self._sub._pending_size -= len(msg.data)
        try:
            self._dispatch(msg)
        except Exception:
            # Raised into nats-py's read loop, it would take the connection down.
            log.exception("dispatching a message on %s failed", msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:  # Subscription.drain waits for the queue to empty
        return None


def _direct_possible(sub: Subscription) -> bool:
    return (natspy.dispatches_directly() and isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)
            and isinstance(getattr(sub, "_pending_size", None), int)
            and getattr(sub, "_wait_for_msgs_task", None) is None)


async def subscribe_direct(nc: NATS, subject: str, dispatch: Dispatch, *, queue: str = "",
                           **limits: Any) -> tuple[Subscription, asyncio.Task[None] | None]:
    """Subscribe ``subject`` (in queue group ``queue``) and call ``dispatch(msg)`` for
    each message, in the event loop, as soon as nats-py has parsed it.

    ``dispatch`` must not block or await: start a task for real work. An exception it
    raises is logged, and the next message is dispatched as usual. Returns the
    subscription (unsubscribe it as any other) and, where the direct path is not
    possible with this nats-py, the task that reads it instead (cancel it after
    unsubscribing).
    """
    sub = await nc.subscribe(subject, queue=queue, **limits)
    if _direct_possible(sub):
        old = sub._pending_queue
        direct = _DirectQueue(sub, dispatch)
        sub._pending_queue = direct  # type: ignore[assignment]
        while not old.empty():  # arrived while subscribe() was still flushing
            msg = old.get_nowait()
            sub._pending_size += len(msg.data)  # put_nowait takes it off again
            direct.put_nowait(msg)
        return sub, None
    log.debug("nats-py's subscription internals differ; reading %s through its iterator", subject)

    async def read() -> None:
        async for msg in sub.messages:
            try:
                dispatch(msg)
            except Exception:
                log.exception("dispatching a message on %s failed", msg.subject)

    return sub, asyncio.get_running_loop().create_task(read())


class ReplyInbox:
    """One wildcard reply subject on a connection, read with :func:`subscribe_direct`.

    Each publish that wants an answer takes a fresh reply subject from
    :meth:`reply_to`; the answers come to ``deliver(token, msg)`` from nats-py's read
    loop, told apart by the token the subject ends with. One subscription serves them
    all, instead of one per request (or nats-py's own reply machinery, a task and
    futures per message). Used for the client's requests and the audit trail's
    acknowledgements.
    """

    def __init__(self, nc: NATS, deliver: Callable[[str, Msg], None]) -> None:
        self._nc = nc
        self._deliver = deliver
        self._tokens = itertools.count()
        self._prefix = ""
        self._sub: Subscription | None = None
        self.reader: asyncio.Task[None] | None = None  # only where the direct path is not possible
        self._subscribing = asyncio.Lock()  # concurrent first users share one subscription

    async def reply_to(self) -> tuple[str, str]:
        """A fresh token and the reply subject that carries it; subscribes on first use."""
        if self._sub is None:
            async with self._subscribing:
                if self._sub is None:
                    prefix = self._nc.new_inbox() + "."
                    self._sub, self.reader = await subscribe_direct(self._nc, prefix + "*", self._on_msg)
                    self._prefix = prefix
        token = str(next(self._tokens))
        return token, self._prefix + token

    @property
    def prefix(self) -> str:
        """The reply subjects' common prefix (ending in "."); "" until first used."""
        return self._prefix

    async def close(self) -> None:
        """Stop listening (the subscription ends with the connection anyway)."""
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
            self.reader = None
        if self._sub is not None and self._nc.is_connected:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass  # closing meanwhile: the server drops it with the connection
        self._sub = None

    def _on_msg(self, msg: Msg) -> None:
        self._deliver(msg.subject[len(self._prefix):], msg)
