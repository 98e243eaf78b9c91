"""Retrying JetStream calls through a NATS node loss.

When a node of a JetStream cluster dies, every stream whose leader it was elects a new
one among the survivors; for a few seconds a publish or a KV call to such a stream
times out, gets NATS "no responders" (nats-py: "no response from stream") or a 503
("JetStream system temporarily unavailable"), and a client connected to the dead node
is reconnecting. Those errors say "not now", not "no": :func:`retry_js` tries again
with a short, growing backoff for at most :data:`JS_RETRY_WINDOW_S`, and then raises
:class:`~fleetbus.errors.ServerOffline`, a code a caller retries, never ``internal``.

Anything else (a wrong last sequence, a key not found, a bad request) is an answer and
passes through at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

from .errors import ServerOffline

log = logging.getLogger("fleetbus.jsretry")
T = TypeVar("T")

#: How long a JetStream call on a command's path is retried before the command fails
#: with ``server_offline``. A stream whose leader died has no leader, and answers
#: nothing, until its Raft group elects another: nats-server's election timeout is 4-9 s,
#: and 6 s was measured in tests/test_failover.py. With a shorter window every election
#: would fail a few seconds of commands; with this one they wait instead. Longer
#: outages are not transient, and the caller's own retry (same id) is the right answer.
JS_RETRY_WINDOW_S = 10.0
#: The first pause between attempts, doubled each time up to :data:`JS_RETRY_MAX_PAUSE_S`.
JS_RETRY_FIRST_PAUSE_S = 0.05
JS_RETRY_MAX_PAUSE_S = 0.5
#: The time limit of each attempt: a request to a stream without a leader is not
#: answered at all, so the default 10 s of nats-py would spend the window on one try.
JS_ATTEMPT_TIMEOUT_S = 1.0


def transient(exc: BaseException) -> bool:
    """True for the errors a JetStream leader election or a reconnect produces."""
    if isinstance(exc, nats.js.errors.APIError):
        # 503 "JetStream system temporarily unavailable", 500 "stream is offline" and the
        # like: the cluster is moving; a 4xx is a real answer.
        # KeyNotFoundError and its kin never set `code` (nats-py builds them bare).
        code = getattr(exc, "code", None)
        return isinstance(code, int) and code >= 500
    return isinstance(exc, (
        nats.js.errors.NoStreamResponseError,  # no stream leader took the publish
        nats.errors.TimeoutError,  # also FlushTimeoutError
        nats.errors.NoRespondersError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
        asyncio.TimeoutError,
    ))


async def retry_js(call: Callable[[], Awaitable[T]], what: str, *,
                   window_s: float = JS_RETRY_WINDOW_S) -> T:
    """``await call()``, again after transient JetStream errors for up to ``window_s``.

    ``call`` must be safe to repeat (a KV create whose first attempt may have stored its
    value is made so by its caller: dedupe.py recognizes its own claim). Raises
    :class:`ServerOffline` naming ``what`` once the window is spent.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + window_s
    pause = JS_RETRY_FIRST_PAUSE_S
    attempts = 0
    while True:
        attempts += 1
        try:
            remaining = give_up - loop.time()
            async with asyncio.timeout(min(JS_ATTEMPT_TIMEOUT_S, max(0.2, remaining))):
                result = await call()
        except Exception as exc:
            if not transient(exc):
                raise
            if loop.time() + pause >= give_up:
                log.warning("%s: JetStream still unavailable after %d attempts in %g s (%s)",
                            what, attempts, window_s, type(exc).__name__)
                raise ServerOffline(
                    f"{what}: JetStream did not answer within {window_s:g} s (a NATS node "
                    "loss or a leader election); retry it") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, JS_RETRY_MAX_PAUSE_S)
            continue
        if attempts > 1:
            log.info("%s: JetStream answered after %d attempts", what, attempts)
        return result
