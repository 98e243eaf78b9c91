"""The server registry and server status, both JetStream key-value buckets.

One key per server name. The registry holds what operators declared (name, transport,
address, credential reference, roles, environment, labels, options); the status bucket
holds what the fleet last observed, written by whichever process serves the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from .errors import InvalidRequest, NotFound
from .names import check_server_name
from .records import Server, ServerStatus

log = logging.getLogger("fleetbus.registry")

ServerChange = Callable[[str, Server | None], Awaitable[None]]


async def kv_snapshot(kv: KeyValue) -> dict[str, bytes]:
    """Every live key and value in one pass (one consumer, not one request per key).

    The consumer is ephemeral; a short inactivity threshold lets the server drop it soon
    after, so frequent snapshots never pile up against the consumer limit.
    """
    watcher = await kv.watchall(inactive_threshold=2.0)
    out: dict[str, bytes] = {}
    received = 0
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=10)
            except Exception:
                break
            if entry is None:
                # nats-py (2.x) sends this "nothing more" marker when the consumer's info
                # says nothing is pending and no message has been read yet, which also
                # happens while every value is already on its way to us: under load the
                # snapshot came back empty ("no server named local" right after a listing
                # showed it). Only the consumer's own count settles it.
                if await _all_read(watcher, received):
                    break
                continue
            received += 1
            if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
                out.pop(entry.key, None)
            else:
                out[entry.key] = entry.value
            if entry.delta == 0:
                break
    finally:
        await watcher.stop()
    return out


async def _all_read(watcher: Any, received: int) -> bool:
    """True when the watch's consumer has delivered no more than the ``received``
    messages and has none pending (or when it cannot say: then trust the marker)."""
    sub = getattr(watcher, "_sub", None)
    if sub is None:
        return True
    try:
        info = await sub.consumer_info()
    except Exception:
        return True
    return info.num_pending == 0 and info.delivered.consumer_seq <= received


class Registry:
    def __init__(self, servers: KeyValue, status: KeyValue) -> None:
        self.servers = servers
        self.status_kv = status

    async def add(self, server: Server, replace: bool = False) -> Server:
        value = server.model_dump_json().encode()
        if replace:
            await self.servers.put(server.name, value)
            return server
        try:
            await self.servers.create(server.name, value)
        except KeyWrongLastSequenceError:
            raise InvalidRequest(
                f"server {server.name} is already registered; remove it first or use --replace"
            ) from None
        return server

    async def find(self, name: str) -> Server | None:
        check_server_name(name)
        try:
            entry = await self.servers.get(name)
        except KVNotFound:
            return None
        if entry.value is None:
            return None
        return _parse_server(name, entry.value)

    async def get(self, name: str) -> Server:
        server = await self.find(name)
        if server is None:
            raise NotFound(f"no server named {name}")
        return server

    async def list(self) -> list[Server]:
        snapshot = await kv_snapshot(self.servers)
        out = []
        for name, raw in sorted(snapshot.items()):
            server = _parse_server(name, raw)
            if server is not None:
                out.append(server)
        return out

    async def remove(self, name: str) -> None:
        await self.get(name)
        await self.servers.delete(name)
        try:
            await self.status_kv.delete(name)
        except KVNotFound:
            pass

    async def set_status(self, status: ServerStatus) -> None:
        await self.status_kv.put(status.name, status.model_dump_json().encode())

    async def status(self, name: str) -> ServerStatus | None:
        try:
            entry = await self.status_kv.get(name)
        except KVNotFound:
            return None
        if entry.value is None:
            return None
        try:
            return ServerStatus.model_validate_json(entry.value)
        except ValidationError:
            return None

    async def statuses(self) -> dict[str, ServerStatus]:
        out: dict[str, ServerStatus] = {}
        for name, raw in (await kv_snapshot(self.status_kv)).items():
            try:
                out[name] = ServerStatus.model_validate_json(raw)
            except ValidationError:
                continue
        return out

    async def watch(self, on_change: ServerChange, ready: asyncio.Event | None = None) -> None:
        """Call ``on_change(name, server_or_None)`` for every server now and on every change.

        Runs until cancelled. ``ready`` is set once the current registry was delivered.
        """
        watcher = await self.servers.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    if ready is not None:
                        ready.set()
                    continue
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    server = None
                else:
                    server = _parse_server(entry.key, entry.value)
                try:
                    await on_change(entry.key, server)
                except Exception:
                    log.exception("handling a registry change for %s failed", entry.key)
                if ready is not None and entry.delta == 0:
                    ready.set()
        finally:
            await watcher.stop()


def _parse_server(name: str, raw: bytes) -> Server | None:
    try:
        return Server.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring a corrupt registry record for %r", name[:64])
        return None


