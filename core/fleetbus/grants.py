"""What the serving side reads of the users bucket: who a public key is, and the grants.

A user sends a command through a grant (docs/bus-api.md, "Grant subjects"):
``<prefix>.v1.grants.<grant id>.<server>.<op>``, a subject its NATS permissions allow for
the grant's operations. Whatever serves a server subscribes the grant subjects of every
grant whose selector matches that server, so who may reach which server follows the
registry with no permission change (the research's Q8). This module is the serving
side's read-only view of ``<prefix>_users``: the records' shape and their writing
belong to the users module (``users add``); a record here is parsed leniently, only
the fields this side needs, so that a newer record still reads.

A record (JSON under the user's name)::

    {"name": "ci-deploy", "public_key": "UA...",
     "grants": [{"id": "g1a2b3c4d", "ops": ["exec", "put"], "selector": {"role": "web"}}], ...}

:class:`UserDirectory` follows the bucket: the name of each public key (for the audit
trail; users' inboxes are ``_I.<public key>.``, known without it) and every grant,
calling back on each change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from .records import Server
from .selection import Selection

log = logging.getLogger("fleetbus.grants")

# A grant id is one subject token; a user name is one token of its inbox prefix.
_GRANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_USER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class GrantView:
    """One grant: operations on the servers its selector matches."""

    id: str
    user: str
    ops: tuple[str, ...]
    selector: Selection

    def covers(self, server: Server) -> bool:
        """Whether the grant's subjects for ``server`` are to be served."""
        return bool(self.ops) and not self.selector.is_empty() and self.selector.matches(server)


@dataclass(frozen=True)
class UserView:
    """One user: its name, key (its inboxes are ``_I.<key>.``) and grants."""

    name: str
    public_key: str
    grants: tuple[GrantView, ...]


def parse_user(key: str, raw: bytes) -> UserView | None:
    """The view of one record; None (logged) when it cannot be read."""
    try:
        data = json.loads(raw)
        name, public_key = data["name"], data["public_key"]
        if name != key or not _USER_NAME_RE.fullmatch(name) or not isinstance(public_key, str):
            raise ValueError("name or public_key")
        grants = []
        for item in data.get("grants") or []:
            if not _GRANT_ID_RE.fullmatch(str(item.get("id", ""))):
                raise ValueError("grant id")
            selector = Selection.model_validate(item.get("selector") or {})
            grants.append(GrantView(item["id"], name, tuple(str(op) for op in item.get("ops") or ()),
                                    selector))
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError):
        # A record the users module would refuse too: nobody is served through it.
        log.warning("ignoring an unreadable users record for %r", key[:64])
        return None
    return UserView(name, public_key, tuple(grants))


Change = Callable[[], Awaitable[None]]


class UserDirectory:
    """The users bucket, followed: :meth:`name_of` a public key and :meth:`grants`."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._users: dict[str, UserView] = {}  # by name
        self._names: dict[str, str] = {}  # public key -> name

    def name_of(self, public_key: str) -> str | None:
        """The user name of an nkey (or JWT) public key, None when no user has it."""
        return self._names.get(public_key)

    def grants(self) -> list[GrantView]:
        """Every user's grants."""
        return [grant for user in self._users.values() for grant in user.grants]

    def user(self, name: str) -> UserView | None:
        """The user named ``name``, None when there is none (removed, or not read yet)."""
        return self._users.get(name)

    def grant_for(self, name: str, server: Server, op: str) -> GrantView | None:
        """A grant of user ``name`` allowing ``op`` on ``server`` (the first, in the order
        of its record), None when none does: whether the user could send it itself."""
        user = self._users.get(name)
        for grant in user.grants if user is not None else ():
            if op in grant.ops and grant.covers(server):
                return grant
        return None

    def _apply(self, key: str, user: UserView | None) -> None:
        old = self._users.pop(key, None)
        if old is not None and self._names.get(old.public_key) == key:
            del self._names[old.public_key]
        if user is not None:
            self._users[key] = user
            self._names[user.public_key] = key

    async def watch(self, on_change: Change, ready: asyncio.Event | None = None) -> None:
        """Follow the bucket, calling ``on_change()`` after each change once the current
        records were read (and once then). Runs until cancelled."""
        watcher = await self.kv.watchall()
        loaded = False
        try:
            async for entry in watcher:
                if entry is not None:
                    gone = entry.operation in (KV_DEL, KV_PURGE) or not entry.value
                    self._apply(entry.key, None if gone else parse_user(entry.key, entry.value))
                if entry is None or entry.delta == 0:
                    loaded = True
                if not loaded:
                    continue
                try:
                    await on_change()
                except Exception:
                    log.exception("following a users change failed")
                if ready is not None:
                    ready.set()
        finally:
            await watcher.stop()
