"""Users: who may send which operations to which servers, kept in the users bucket.

A user is a NATS identity in the ``USERS`` account (docs/security.md): an nkey whose
public key fleetbus keeps, never its seed. What it may do is a list of **grants** and of
admin endpoints; NATS enforces both through permissions generated from these records
(:mod:`fleetbus.userperms`), fleetbus does not check them in Python.

A grant reads like a sentence, ``OPS:SELECTOR`` (:func:`parse_grant`)::

    exec,put:role=web              exec and put on every server in role web
    info,ping:all                  info and ping on every server
    exec:role=web env=prod         ... in role web AND environment prod
    get:label team=payments        get where the label team is payments
    exec:db1 db2 web-*             exec on db1, db2 and servers matching web-*

Each grant gets an id; the user may publish ``<p>.v1.grants.<id>.<server>.<op>`` and
whatever serves a server subscribes the grant subjects of every grant whose selector
matches it (its :class:`~fleetbus.selection.Selection`), so adding a server to a role
needs no permission change. A grant naming only plain server names also allows their
own subjects, ``<p>.v1.servers.<name>.<op>``.

Records are JSON under the user's name in ``<prefix>_users``::

    {"name": "ci-deploy", "public_key": "UA...", "grants": [{"id": "g1a2b3c4d",
     "ops": ["exec", "put"], "selector": {"role": "web", ...}, "text": "exec,put:role=web"}],
     "admin": ["servers.list"], "expires": "2027-03-07T12:00:00Z" | null,
     "created": "...", "rotated": "..." | null}
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

import nkeys
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest, NotFound
from .messages import OPERATIONS
from .names import USER_KEY_RE
from .records import Server, utcnow
from .registry import kv_snapshot
from .selection import Selection

# A user's name is a KV key and shows in audit records and metrics: lowercase, no dots.
USER_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,30}[a-z0-9])?$")
GRANT_ID_RE = re.compile(r"^g[0-9a-f]{8}$")
ADMIN_ENDPOINT_RE = re.compile(r"^[a-z]+\.[a-z-]+$")
#: Names that are not users: the FLEETBUS account's owner.
RESERVED_NAMES = frozenset({"owner"})
MAX_GRANTS = 64
#: Written as ``90d``, ``12h``, ``30m`` or ``3600s``.
_DURATION_RE = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def is_user_key(text: str) -> bool:
    """Whether ``text`` is an nkey user public key, checksum included: nats-server
    refuses a config holding anything else, and one such record would stop every
    later users change from reaching it."""
    if not USER_KEY_RE.fullmatch(text):
        return False
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return False
    return raw[0] == nkeys.PREFIX_BYTE_USER and nkeys.crc16_checksum(raw[:-2]) == raw[-2:]


def check_user_name(name: str) -> str:
    if not USER_NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise InvalidRequest(
            f"invalid user name {name[:64]!r}: 1-32 lowercase letters, digits, '_' or '-' "
            "(not 'owner', the FLEETBUS account's own user)")
    return name


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w`` or ``3600s`` as a timedelta (InvalidRequest otherwise)."""
    found = _DURATION_RE.fullmatch(text.strip().lower())
    if not found or int(found.group(1)) == 0:
        raise InvalidRequest(f"{text[:32]!r} is not a duration like 90d, 12h, 30m or 2w")
    return timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])


class Grant(BaseModel):
    """Operations on the servers a selector picks, under a stable id."""

    model_config = ConfigDict(extra="forbid")

    id: str
    ops: list[str] = Field(min_length=1)
    selector: Selection
    text: str = Field(default="", max_length=1024, description="The grant as it was written.")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not GRANT_ID_RE.fullmatch(v):
            raise ValueError(f"invalid grant id {v[:32]!r}")
        return v

    @field_validator("ops")
    @classmethod
    def _ops(cls, v: list[str]) -> list[str]:
        for op in v:
            if op not in OPERATIONS:
                raise ValueError(f"unknown operation {op[:32]!r} (one of {', '.join(OPERATIONS)})")
        return sorted(set(v), key=OPERATIONS.index)

    def reaches(self, server: Server, op: str) -> bool:
        """Whether the grant allows ``op`` on ``server`` (what the workers serving the
        grant's subjects decide by its selector, grants.GrantView.covers)."""
        return op in self.ops and not self.selector.is_empty() and self.selector.matches(server)

    def by_name(self) -> list[str]:
        """The servers the grant names outright (no glob, no other criterion), else []."""
        sel = self.selector
        if sel.all or sel.role or sel.environment or sel.labels:
            return []
        if any(set(p) & set("*?[]!") for p in sel.servers):
            return []
        return list(sel.servers)


def new_grant_id() -> str:
    return "g" + secrets.token_hex(4)


def parse_grant(text: str, grant_id: str | None = None) -> Grant:
    """A grant from its sentence form, ``OPS:SELECTOR`` (module docstring).

    OPS is a comma-separated list of operations, or ``*`` for all of them. SELECTOR is
    words separated by spaces: ``all``, ``role=R``, ``env=E``, ``label K=V``, or a server
    name or glob; every criterion must hold, any one of several names is enough.
    """
    ops_text, sep, selector_text = text.partition(":")
    if not sep or not ops_text.strip() or not selector_text.strip():
        raise InvalidRequest(f"grant {text[:64]!r}: write OPS:SELECTOR, e.g. exec,put:role=web")
    ops = [o.strip() for o in ops_text.split(",") if o.strip()]
    if ops == ["*"]:
        ops = list(OPERATIONS)
    words = selector_text.split()
    fields: dict[str, object] = {"servers": [], "labels": {}}
    at = 0
    while at < len(words):
        word = words[at]
        key, eq, value = word.partition("=")
        if word == "all":
            fields["all"] = True
        elif word == "label":
            pair = words[at + 1] if at + 1 < len(words) else ""
            label, eq2, label_value = pair.partition("=")
            if not eq2 or not label or not label_value:
                raise InvalidRequest(f"grant {text[:64]!r}: write label KEY=VALUE")
            fields["labels"][label] = label_value  # type: ignore[index]
            at += 1
        elif eq and key in ("role", "env", "environment"):
            name = "role" if key == "role" else "environment"
            if name in fields or not value:
                raise InvalidRequest(f"grant {text[:64]!r}: one {key}= with a value, at most")
            fields[name] = value
        elif eq:
            raise InvalidRequest(f"grant {text[:64]!r}: unknown criterion {key[:32]!r} "
                                 "(role=, env=, label K=V, all, or server names)")
        else:
            fields["servers"].append(word)  # type: ignore[union-attr]
        at += 1
    try:
        selector = Selection.model_validate(fields)
        return Grant(id=grant_id or new_grant_id(), ops=ops, selector=selector, text=text.strip())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"grant {text[:64]!r}: {first['msg']}") from None


class UserRecord(BaseModel):
    """One user as the users bucket holds it: public parts only."""

    model_config = ConfigDict(extra="forbid")

    name: str
    public_key: str
    grants: list[Grant] = Field(default_factory=list, max_length=MAX_GRANTS)
    admin: list[str] = Field(default_factory=list, max_length=64)
    expires: datetime | None = None
    created: datetime = Field(default_factory=utcnow)
    rotated: datetime | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_user_name(v)

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not is_user_key(v):
            raise ValueError("not an nkey user public key (U and 55 base32 characters with a valid checksum)")
        return v

    @field_validator("admin")
    @classmethod
    def _admin(cls, v: list[str]) -> list[str]:
        for endpoint in v:
            if not ADMIN_ENDPOINT_RE.fullmatch(endpoint):
                raise ValueError(f"invalid admin endpoint {endpoint[:64]!r} (like servers.list)")
        return sorted(set(v))

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and self.expires <= (now or utcnow())


class UserStore:
    """The users bucket: one key per user name, changed by compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def add(self, record: UserRecord) -> None:
        try:
            await self.kv.create(record.name, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            raise InvalidRequest(f"user {record.name} exists; remove it first, or rotate its key") from None

    async def get(self, name: str) -> UserRecord:
        return (await self._get(name))[0]

    async def _get(self, name: str) -> tuple[UserRecord, int]:
        try:
            entry = await self.kv.get(check_user_name(name))
        except KVNotFound:
            raise NotFound(f"no user named {name}") from None
        if entry.value is None or entry.revision is None:
            raise NotFound(f"no user named {name}")
        return UserRecord.model_validate_json(entry.value), entry.revision

    async def replace_key(self, name: str, public_key: str) -> UserRecord:
        """Give ``name`` a new public key; the old one stops working at the next apply."""
        record, revision = await self._get(name)
        updated = record.model_copy(update={"public_key": public_key, "rotated": utcnow()})
        UserRecord.model_validate(updated.model_dump())  # the new key's form
        try:
            await self.kv.update(name, updated.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError:
            raise InvalidRequest(f"user {name} changed meanwhile; try again") from None
        return updated

    async def change(self, name: str, change: Callable[[UserRecord], UserRecord]) -> UserRecord:
        """Store ``change(record)`` for ``name``, compare-and-set: a concurrent change is
        ``invalid_request`` (try again), never lost. ``change`` raises to refuse."""
        record, revision = await self._get(name)
        updated = change(record)
        try:
            await self.kv.update(name, updated.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError:
            raise InvalidRequest(f"user {name} changed meanwhile; try again") from None
        return updated

    async def remove(self, name: str) -> None:
        await self._get(name)
        await self.kv.delete(name)

    async def list(self) -> list[UserRecord]:
        out = []
        for raw in (await kv_snapshot(self.kv)).values():
            try:
                out.append(UserRecord.model_validate_json(raw))
            except ValidationError:
                continue  # not ours to show; never fatal to a listing
        return sorted(out, key=lambda r: r.name)
