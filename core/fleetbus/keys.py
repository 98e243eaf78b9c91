"""Per-server secret keys for outbound agents: issued once, stored only as hashes.

A key reads ``fbk1_<id>_<secret>``: the id (public, 16 hex digits) finds the record
without scanning, the secret (256 random bits) proves possession. The bucket keeps
``sha256(secret)`` and compares with :func:`hmac.compare_digest`; a plain hash is
enough because the secret is random and long, so there is nothing to brute-force.

Records: ``id.<id>`` -> {server, sha256, created}; ``server.<name>`` -> id. Rotating
writes a new id and deletes the old one; gateways watch the bucket and drop a live
connection whose key id disappeared.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .errors import AuthFailed, NotFound
from .records import utcnow

KEY_RE = re.compile(r"^fbk1_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class IssuedKey:
    server: str
    key_id: str
    key: str  # shown to the operator once, never stored

    def __repr__(self) -> str:
        return f"IssuedKey(server={self.server!r}, key_id={self.key_id!r})"


@dataclass(frozen=True)
class KeyMatch:
    server: str
    key_id: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str] | None:
    m = KEY_RE.match(key.strip()) if isinstance(key, str) else None
    return (m.group(1), m.group(2)) if m else None


class AgentKeys:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def issue(self, server: str) -> IssuedKey:
        """A fresh key for ``server``, replacing (and so revoking) any earlier one."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = {"server": server, "sha256": _digest(secret), "created": utcnow().isoformat()}
        await self.kv.put(f"id.{key_id}", json.dumps(record).encode())
        old = await self.current_id(server)
        await self.kv.put(f"server.{server}", key_id.encode())
        if old is not None and old != key_id:
            await self._delete(f"id.{old}")
        return IssuedKey(server=server, key_id=key_id, key=f"fbk1_{key_id}_{secret}")

    async def current_id(self, server: str) -> str | None:
        try:
            entry = await self.kv.get(f"server.{server}")
        except KVNotFound:
            return None
        return entry.value.decode() if entry.value else None

    async def revoke(self, server: str) -> str:
        key_id = await self.current_id(server)
        if key_id is None:
            raise NotFound(f"{server} has no agent key")
        await self._delete(f"id.{key_id}")
        await self._delete(f"server.{server}")
        return key_id

    async def verify(self, key: str) -> KeyMatch:
        """The server a presented key belongs to; AuthFailed (without detail) otherwise."""
        parsed = parse_key(key)
        # Hash something even for malformed keys so timing does not tell them apart.
        presented = _digest(parsed[1] if parsed else str(key))
        if parsed is None:
            raise AuthFailed("unknown or revoked key")
        try:
            entry = await self.kv.get(f"id.{parsed[0]}")
        except KVNotFound:
            raise AuthFailed("unknown or revoked key") from None
        record = json.loads(entry.value or b"{}")
        if not hmac.compare_digest(presented, str(record.get("sha256", ""))):
            raise AuthFailed("unknown or revoked key")
        return KeyMatch(server=str(record["server"]), key_id=parsed[0])

    async def watch_revoked(self) -> AsyncIterator[str]:
        """The id of every key deleted from now on (rotated or revoked), as it happens;
        raises when the watch fails (NATS reconnecting), for the caller to watch again."""
        watcher = await self.kv.watch("id.*")
        async for entry in watcher:
            if entry is None or entry.operation not in (KV_DEL, KV_PURGE):
                continue
            yield entry.key.split(".", 1)[1]

    async def _delete(self, key: str) -> None:
        try:
            await self.kv.delete(key)
        except KVNotFound:
            pass
