"""nats-py: a larger socket read, replies written without waiting for its flusher, and
messages handed over without its per-subscription task.

The patches target nats-py 2.9-2.16 (written against 2.16.0, the version this project
installs) and rely on private parts of ``nats.aio.client`` and ``nats.aio.subscription``;
:func:`read_buffer`, :func:`direct_writes` and :func:`direct_dispatch` check those parts
exist before applying, so another nats-py leaves them "not applied" (a debug log) and
fleetbus works through nats-py's public API alone.

:func:`send_now`, :func:`publish_now` and :func:`publish_soon` are what the plugin host
and the client call on every command. They write directly only once
:func:`direct_writes` was applied (by :func:`fleetbus.tuning.apply` at the entry
point); otherwise they leave the bytes to nats-py's flusher.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import nats.aio.client
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

log = logging.getLogger("fleetbus.tuning")

NATS_READ_BUFFER = 512 * 1024
"""What nats-py reads from its socket at a time once :func:`read_buffer` is applied."""

# What direct writes touch on a nats-py Client, all set in its __init__.
_CLIENT_PARTS = ("_pending", "_pending_data_size", "_max_pending_size", "_max_payload",
                 "_transport", "_flush_queue", "stats")

_direct = False
_dispatch = False


def _not_applied(name: str, why: str) -> None:
    log.debug("tuning %s not applied: %s", name, why)


def read_buffer() -> str | None:
    """Patch ``nats_read_buffer``: read the NATS socket 512 KiB at a time.

    nats-py reads its socket in ``DEFAULT_BUFFER_SIZE`` pieces (32 KiB), and its stream
    reader stops reading the socket above twice that: a 1 MiB transfer chunk then costs
    a pause/resume of the socket and a parser pass every 32 KiB. No connect option
    exposes it; the module global is what nats-py reads at connect time and in its read
    loop, so connections made after this read more at once.
    """
    current = getattr(nats.aio.client, "DEFAULT_BUFFER_SIZE", None)
    if not isinstance(current, int):
        return _not_applied("nats_read_buffer", "nats.aio.client has no DEFAULT_BUFFER_SIZE")
    if current >= NATS_READ_BUFFER:
        return f"already {current // 1024} KiB"
    nats.aio.client.DEFAULT_BUFFER_SIZE = NATS_READ_BUFFER
    return f"{current // 1024} -> {NATS_READ_BUFFER // 1024} KiB"


def direct_writes() -> str | None:
    """Patch ``nats_direct_writes``: let :func:`send_now` and :func:`publish_now` write
    to the socket in place of nats-py's flusher task.

    nats-py's ``publish`` only queues the bytes and wakes its flusher, which writes them
    one event-loop iteration later: latency on every command's request and reply.
    Relies on the Client's pending buffer and transport (:data:`_CLIENT_PARTS`).
    """
    global _direct
    client = NATS()
    missing = [part for part in _CLIENT_PARTS if not hasattr(client, part)]
    if missing or not isinstance(getattr(client, "_pending", None), list):
        return _not_applied("nats_direct_writes", f"nats-py's Client differs ({', '.join(missing) or '_pending'})")
    _direct = True
    return "requests and replies written in the loop turn that publishes them"


def direct_dispatch() -> str | None:
    """Patch ``nats_direct_dispatch``: let :func:`fleetbus.dispatch.subscribe_direct` take
    messages straight from nats-py's read loop.

    nats-py gives every callback subscription a queue and a task that awaits the
    callback, one message after another: an event-loop iteration (and a queue put and
    get) between reading a request and handling it. ``subscribe_direct`` puts a stand-in
    where the subscription's queue was (``Subscription._pending_queue``, with
    ``_pending_size`` and ``_wait_for_msgs_task``: checked here on a fresh subscription,
    and again on each one). Without it, messages are read through the subscription's
    public iterator.
    """
    global _dispatch
    sub = Subscription(None, 0, "fleetbus.tuning.check")
    if not (isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)
            and isinstance(getattr(sub, "_pending_size", None), int)
            and hasattr(sub, "_wait_for_msgs_task")):
        return _not_applied("nats_direct_dispatch", "nats-py's Subscription differs")
    _dispatch = True
    return "messages handed to the plugin host and the client from nats-py's read loop"


def dispatches_directly() -> bool:
    """Whether :func:`direct_dispatch` was applied in this process."""
    return _dispatch


def send_now(nc: NATS) -> None:
    """Hand what nats-py has buffered for sending to the socket now, once per loop turn.

    Does the flusher's write in place, but only for the first call in an iteration:
    under load many requests or replies are published in one iteration, and writing
    each on its own multiplies nats-server's CPU per message; the rest still go out
    together through the flusher, which always runs and waits for the socket to drain.
    Does nothing while nats-py is not connected (it keeps the bytes for after a
    reconnect), or without :func:`direct_writes`.
    """
    if not _direct or nc in _wrote_this_turn:
        return
    pending = getattr(nc, "_pending", None)
    transport = getattr(nc, "_transport", None)
    if not pending or transport is None or not isinstance(pending, list) or not nc.is_connected:
        return
    try:
        transport.writelines(pending[:])
    except Exception:  # the flusher meets the same error and handles it
        return
    nc._pending = []
    nc._pending_data_size = 0
    _wrote(nc)


def publish_now(nc: NATS, subject: str, payload: bytes) -> bool:
    """Write one message without headers (a reply) to the socket at once; False when it
    cannot, and the caller publishes it the usual way (``publish``, then
    :func:`send_now`).

    nats-py's ``publish`` makes a future and queues it for its flusher on every message;
    for the reply a command's requester waits on, this writes the ``PUB`` directly. It
    writes only when nothing is buffered (so messages keep their order), only for the
    first message in a loop turn (the rest are batched, as with :func:`send_now`), only
    while connected, and only with :func:`direct_writes`.
    """
    if not _direct or nc in _wrote_this_turn or not nc.is_connected:
        return False
    transport = getattr(nc, "_transport", None)
    stats = getattr(nc, "stats", None)
    if (transport is None or getattr(nc, "_pending", True) or not isinstance(stats, dict)
            or len(payload) > getattr(nc, "_max_payload", 0) or not _plain_subject(subject)):
        return False
    try:
        transport.write(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
    except Exception:
        return False
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    _wrote(nc)
    return True


def publish_soon(nc: NATS, subject: str, payload: bytes) -> bool:
    """Publish one message without headers from code that cannot await (a dispatch
    callback in nats-py's read loop); False when it cannot be sent.

    With :func:`direct_writes`: written at once when :func:`publish_now` can, otherwise
    queued where nats-py's ``publish`` queues it and its flusher woken; refused above
    nats-py's own outbound buffer limit. Without: nats-py's ``publish`` in a task
    (tasks start in the order they were made, so messages keep their order). Refused
    while not connected.
    """
    if not nc.is_connected or not _plain_subject(subject):
        return False
    if not _direct:
        task = asyncio.get_running_loop().create_task(nc.publish(subject, payload))
        _publishing.add(task)
        task.add_done_callback(_published)
        return True
    if publish_now(nc, subject, payload):
        return True
    pending = getattr(nc, "_pending", None)
    queue = getattr(nc, "_flush_queue", None)
    size = getattr(nc, "_pending_data_size", None)
    limit = getattr(nc, "_max_pending_size", 0)
    stats = getattr(nc, "stats", None)
    if (not isinstance(pending, list) or not isinstance(queue, asyncio.Queue) or not isinstance(size, int)
            or not isinstance(stats, dict) or len(payload) > getattr(nc, "_max_payload", 0)):
        return False
    cmd = b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)
    if limit > 0 and size + len(cmd) > limit:
        return False
    pending.append(cmd)
    nc._pending_data_size = size + len(cmd)
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    if not queue.full():  # a full queue already holds wake-ups for the flusher
        queue.put_nowait(asyncio.get_running_loop().create_future())
    return True


def _published(task: asyncio.Task[Any]) -> None:
    _publishing.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("a message published from a callback was not sent: %s", type(exc).__name__)


def _plain_subject(subject: str) -> bool:
    # What nats-py's publish checks: a subject is one token of the protocol line.
    return bool(subject) and subject.isascii() and subject.isprintable() and " " not in subject


def _wrote(nc: NATS) -> None:
    """Note that ``nc`` was written to directly in this loop turn."""
    _wrote_this_turn.add(nc)
    asyncio.get_running_loop().call_soon(_wrote_this_turn.discard, nc)


# Connections written to directly in the current event-loop iteration (see send_now).
_wrote_this_turn: set[NATS] = set()
# publish_soon's tasks without direct writes, held until done.
_publishing: set[asyncio.Task[Any]] = set()
