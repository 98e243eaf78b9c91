"""The registry as this process sees it: kept current by a watch, read with read-your-writes.

The job service resolves a selection against every registered server on each
``jobs.start``. Reading the registry for that (:meth:`Registry.list`: an ephemeral
consumer over the bucket, every record parsed) costs a millisecond or more with a few
servers and tens of milliseconds with a thousand (docs/performance.md, "Jobs"). The
view instead keeps every server parsed in memory and applies each change as the
registry's KV stream delivers it, through one ordered consumer that lives as long as
the view.

A watch alone can lag: a server registered a moment ago, possibly through another core
on the same NATS, must be selected by the next ``jobs.start``. So :meth:`servers` first
asks the stream for its last sequence (one request) and, only when the view has not
applied that far yet, waits for the watch to catch up. Should it not within
:data:`CATCH_UP_S` (a watch whose consumer was lost, or a last message the watch never
delivers, e.g. one purged meanwhile), the answer comes from a snapshot as before and the
watch is started afresh.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE
from pydantic import ValidationError

from .records import Server
from .registry import Registry
from .replies import Replies

log = logging.getLogger("fleetbus.registry")

#: How long :meth:`RegistryView.servers` waits for the watch to apply the registry's
#: last write before it reads a snapshot instead.
CATCH_UP_S = 1.0
STREAM_INFO_TIMEOUT_S = 10.0
# A server-placed marker (nats-server 2.11+: a key removed by TTL, age or purge).
_MARKER_REASON = "Nats-Marker-Reason"


class _Closed(Exception):
    """The view was closed while a caller waited for it."""


class RegistryView:
    """Every registered server, parsed, as of the registry's last write. ``start`` then
    ``aclose``."""

    def __init__(self, js: JetStreamContext, registry: Registry, bucket: str,
                 requests: Replies | None = None) -> None:
        self.js = js
        self.registry = registry
        self._requests = requests
        # The KV protocol's names for a bucket's stream and subjects.
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._servers: dict[str, Server] = {}
        self._applied = 0  # stream sequence of the last message applied
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sub: Any = None
        self._generation = 0  # which watch's messages are applied

    async def start(self) -> None:
        await self._watch()

    async def aclose(self) -> None:
        await self._unwatch()
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(_Closed())
        self._waiters.clear()

    async def _watch(self) -> None:
        """Subscribe from scratch: the last record of every key, then every change."""
        self._servers.clear()
        self._applied = 0
        self._generation += 1
        generation = self._generation

        async def on_message(msg: Any) -> None:
            if generation == self._generation:  # not a message of a watch since replaced
                self._apply(msg)

        self._sub = await self.js.subscribe(
            self._prefix + ">", stream=self._stream, cb=on_message, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)

    async def _unwatch(self) -> None:
        sub, self._sub = self._sub, None
        self._generation += 1
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection has dropped it already
                log.debug("stopping the registry watch: %s", type(exc).__name__)

    async def servers(self) -> list[Server]:
        """Every registered server, including any whose registration was acknowledged
        before this call (on any core)."""
        last = await self._last_seq()
        if self._applied < last:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((last, waiter))
            try:
                await asyncio.wait_for(waiter, CATCH_UP_S)
            except _Closed:
                return await self.registry.list()
            except TimeoutError:
                log.warning("the registry watch did not reach sequence %d within %.0f s (at %d); "
                            "reading the registry and watching it afresh", last, CATCH_UP_S, self._applied)
                if self._sub is not None:  # not replaced by a concurrent call meanwhile
                    await self._unwatch()
                    await self._watch()
                return await self.registry.list()
        return list(self._servers.values())

    async def _last_seq(self) -> int:
        """The sequence of the stream's last message: one request.

        Sent through ``requests`` where given (its reply is resolved straight from the
        read loop) and only that field read from the answer; nats-py's ``stream_info``
        (a reply task, and the whole stream description parsed into objects) took about
        0.1 ms more per start. Any answer but the expected one goes the usual way, which
        raises what nats-py raises."""
        prefix = getattr(self.js, "_prefix", None)  # nats-py's JetStream API prefix
        if self._requests is not None and isinstance(prefix, str):
            msg = await self._requests.request(f"{prefix}.STREAM.INFO.{self._stream}", b"",
                                               timeout=STREAM_INFO_TIMEOUT_S)
            try:
                return int(json.loads(msg.data)["state"]["last_seq"])
            except (ValueError, KeyError, TypeError):
                pass
        info = await self.js.stream_info(self._stream)
        return info.state.last_seq

    def _apply(self, msg: Any) -> None:
        key = msg.subject[len(self._prefix):]
        headers = msg.headers or {}
        if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or _MARKER_REASON in headers or not msg.data:
            self._servers.pop(key, None)
        else:
            try:
                self._servers[key] = Server.model_validate_json(msg.data)
            except ValidationError:
                log.warning("ignoring a corrupt registry record for %r", key[:64])
                self._servers.pop(key, None)
        self._applied = max(self._applied, msg.metadata.sequence.stream)
        if self._waiters:
            keep = []
            for seq, waiter in self._waiters:
                if seq <= self._applied:
                    if not waiter.done():
                        waiter.set_result(None)
                elif not waiter.done():  # done: its caller gave up waiting
                    keep.append((seq, waiter))
            self._waiters = keep
