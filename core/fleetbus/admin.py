"""The admin API: registry and credential management as a NATS micro service.

Subjects are ``<prefix>.v1.admin.<area>.<verb>``; the service answers NATS micro
discovery (``$SRV.PING|INFO|STATS``) as ``fleetbus-admin``. Only the core runs it, and
only the core holds the master key, so a secret sent to ``credentials.add`` is sealed
before it is stored and is never sent back by any endpoint.

``servers.add`` checks a server against its transport's declarations
(:class:`fleetbus.transport.Transport`): ``Options`` (a typo is ``invalid_request``
naming the option), ``capabilities.needs_host``, ``capabilities.issues_agent_key``. A
transport not installed beside the core cannot be checked: such a server is registered
with a warning saying so (a deployment may run that plugin on its workers only), and its
options are first checked when a worker opens a session to it.

``audit.query`` reads the audit trail back (auditquery.py); like the other reads it is
not itself audited.

``users.add|list|show|remove|rotate`` keep the users bucket (users.py). They take and
show public keys only: whoever adds a user makes its nkey and keeps the seed (the CLI
writes it to a 0600 file), so no seed ever crosses the bus. Where this process runs the
embedded NATS, a change is answered once nats-server has it (``applied: true``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Service
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .audit import Auditor, AuditRecord
from .auditquery import AuditQuery, AuditReader
from .endpoint import answer
from .errors import InvalidRequest, NotFound
from .keys import AgentKeys
from .messages import OPERATIONS, describe_validation_error
from .names import check_credential_name, check_server_name
from .records import CredentialInfo, CredentialType, Server, utcnow
from .registry import Registry, kv_snapshot
from .subjects import Identity, Names, ReplySubjects, identity_in, requester_in
from .transport import Transport
from .userperms import UserSync
from .users import UserRecord, UserStore, check_user_name, parse_duration, parse_grant
from .vault import Vault

log = logging.getLogger("fleetbus.admin")

GATEWAY_CACHE_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerAdd(_Body):
    server: Server
    replace: bool = False


class NameBody(_Body):
    name: str


class CredentialAdd(_Body):
    name: str
    type: CredentialType
    user: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=1024)
    secret_b64: str = Field(repr=False)
    passphrase_b64: str | None = Field(default=None, repr=False)
    replace: bool = False


class CredentialRemove(_Body):
    name: str
    force: bool = False


class UserReach(_Body):
    """``users.reach``: may the asker send ``op`` to ``server``, and is it served?"""

    server: str = Field(max_length=256)
    op: str = Field(max_length=32)


class UserAdd(_Body):
    name: str
    public_key: str
    allow: list[str] = Field(default_factory=list, max_length=64,
                             description="Grants, each OPS:SELECTOR (users.parse_grant).")
    admin: list[str] = Field(default_factory=list, max_length=64)
    expires_in: str | None = Field(default=None, description="Like 90d, 12h; none: never.")


class UserChange(_Body):
    """``users.change``: grants and admin endpoints added or taken away, a new expiry;
    the key, and the ids of the grants kept, stay."""

    name: str
    allow: list[str] = Field(default_factory=list, max_length=64,
                             description="Grants to add, each OPS:SELECTOR.")
    revoke: list[str] = Field(default_factory=list, max_length=64,
                              description="Grants to take away: ids (g1a2b3c4d) or their text.")
    admin: list[str] = Field(default_factory=list, max_length=64, description="Admin endpoints to add.")
    revoke_admin: list[str] = Field(default_factory=list, max_length=64,
                                    description="Admin endpoints to take away.")
    expires_in: str | None = Field(default=None, description="Like 90d, or 'never'; none: unchanged.")


class UserRotate(_Body):
    name: str
    public_key: str

#: How long a users change waits for nats-server to have it before answering anyway.
USERS_APPLY_WAIT_S = 10.0


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64") from None


class AdminService:
    def __init__(self, nc: NATS, names: Names, registry: Registry, vault: Vault,
                 agent_keys: AgentKeys, gateways: KeyValue, transports: Mapping[str, type[Transport]],
                 replies: ReplySubjects | None = None, users: UserStore | None = None,
                 user_sync: UserSync | None = None) -> None:
        self.nc = nc
        self.names = names
        self.replies = replies or names.reply_subjects()
        self.registry = registry
        self.vault = vault
        self.agent_keys = agent_keys
        self.gateways = gateways
        self.auditor = Auditor(nc, names)
        self.audit_reader = AuditReader(nc.jetstream(), names)
        self._gateway_cache: tuple[float, list[dict[str, Any]]] | None = None
        #: The transport classes installed beside the core, by name: their declarations.
        self.transports = dict(transports)
        self.service: Service | None = None
        self.users = users
        #: Set where this process runs the embedded NATS: changes are applied and awaited.
        self.user_sync = user_sync
        self.endpoints: dict[str, Handler] = {
            "servers.add": self.servers_add,
            "servers.list": self.servers_list,
            "servers.get": self.servers_get,
            "servers.remove": self.servers_remove,
            "servers.rotate-key": self.servers_rotate_key,
            "servers.revoke-key": self.servers_revoke_key,
            "gateways.list": self.gateways_list,
            "credentials.add": self.credentials_add,
            "credentials.list": self.credentials_list,
            "credentials.remove": self.credentials_remove,
            "audit.query": self.audit_query,
        }
        if users is not None:
            self.endpoints.update({
                "users.add": self.users_add,
                "users.list": self.users_list,
                "users.show": self.users_show,
                "users.remove": self.users_remove,
                "users.rotate": self.users_rotate,
                "users.reach": self.users_reach,
                "users.change": self.users_change,
            })
        #: Endpoints whose answer depends on who asks: called with the verified identity.
        self._per_identity: dict[str, Callable[[dict[str, Any], Identity], Awaitable[dict[str, Any]]]] = {
            "users.reach": self.users_reach}

    async def start(self) -> None:
        self.service = await add_service(
            self.nc, name="fleetbus-admin", version=__version__,
            description="fleetbus registry and credential administration",
        )
        for subject, handler in self.endpoints.items():
            await self.service.add_endpoint(
                name=subject.replace(".", "-"), subject=self.names.admin(subject),
                handler=self._wrap(handler, subject),
            )

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        await self.auditor.close()

    def _wrap(self, handler: Handler, endpoint: str) -> Callable[[MicroRequest], Awaitable[None]]:
        per_identity = self._per_identity.get(endpoint)

        async def run(req: MicroRequest) -> None:
            started = time.monotonic()
            if per_identity is not None:
                identity = identity_in(req.headers)
                answered = await answer(req, self.replies, lambda body: per_identity(body, identity))
            else:
                answered = await answer(req, self.replies, handler)
            if answered is not None:
                await self._audit(req, *answered, started)

        return run

    async def _audit(self, req: MicroRequest, body: dict[str, Any], reply: dict[str, Any],
                     started: float) -> None:
        """Who changed the registry or the vault: names only, never a secret."""
        endpoint = req.subject[len(self.names.admin_root) + 1:]
        if endpoint.endswith((".list", ".get", ".show", ".query", ".reach")):
            return  # reads are not changes
        server_body = body.get("server")
        target = body.get("name") or (server_body.get("name") if isinstance(server_body, dict) else None)
        error = reply.get("error") or {}
        requester = requester_in(req.headers)
        await self.auditor.record(AuditRecord(
            ts=utcnow(), id=uuid.uuid4().hex, server=str(target or "")[:64], transport="admin",
            op=endpoint, requester=requester, identity=identity_in(req.headers).record(),
            outcome="ok" if reply.get("ok") else str(error.get("code", "internal")),
            duration_s=round(time.monotonic() - started, 6), worker="core",
            summary=f"{endpoint} {target or ''}".strip()), admin=True)

    async def _event(self, *tokens: str) -> None:
        try:
            await self.nc.publish(self.names.event(*tokens), b"{}")
        except Exception:
            pass

    # servers ---------------------------------------------------------------------
    async def servers_add(self, body: dict[str, Any]) -> dict[str, Any]:
        req = ServerAdd.model_validate(body)
        server = req.server
        transport = self.transports.get(server.transport)
        if transport is not None:
            self._check_declared(server, transport)
        if server.credential is not None:
            await self.vault.info(server.credential)  # NotFound names the credential
        await self.registry.add(server, replace=req.replace)
        await self._event("servers", server.name, "registered")
        reply: dict[str, Any] = {"ok": True}
        if transport is not None and transport.capabilities.issues_agent_key:
            # The key is returned this once and stored only as a hash.
            issued = await self.agent_keys.issue(server.name)
            reply["key"] = issued.key
            reply["gateways"] = await self._gateways()
        warnings = []
        if transport is None:
            warnings.append(
                f"no transport named {server.transport!r} is installed beside the core, so its "
                "options were not checked; the server answers once a worker with that plugin runs"
            )
        reply.update(server=server.model_dump(mode="json"), warnings=warnings)
        return reply

    @staticmethod
    def _check_declared(server: Server, transport: type[Transport]) -> None:
        """What the transport declares about its servers, checked before anything is stored."""
        caps = transport.capabilities
        if caps.needs_host and not server.host:
            port = f" (and a port unless it is {caps.default_port})" if caps.default_port else ""
            raise InvalidRequest(f"a server of the {server.transport} transport needs a host{port}")
        transport.check_options(server.options)

    async def servers_list(self, body: dict[str, Any]) -> dict[str, Any]:
        _Body.model_validate(body)
        servers = await self.registry.list()
        statuses = await self.registry.statuses()
        return {
            "ok": True,
            "servers": [
                {**s.model_dump(mode="json"),
                 "status": statuses[s.name].model_dump(mode="json") if s.name in statuses else None}
                for s in servers
            ],
        }

    async def servers_get(self, body: dict[str, Any]) -> dict[str, Any]:
        name = check_server_name(NameBody.model_validate(body).name)
        server = await self.registry.get(name)
        status = await self.registry.status(name)
        return {"ok": True, "server": server.model_dump(mode="json"),
                "status": status.model_dump(mode="json") if status else None}

    async def servers_remove(self, body: dict[str, Any]) -> dict[str, Any]:
        name = check_server_name(NameBody.model_validate(body).name)
        await self.registry.remove(name)
        if await self.agent_keys.current_id(name) is not None:
            await self.agent_keys.revoke(name)  # drops a connected agent at once
        await self._event("servers", name, "removed")
        return {"ok": True, "name": name}

    async def _keyed_server(self, body: dict[str, Any]) -> Server:
        server = await self.registry.get(check_server_name(NameBody.model_validate(body).name))
        transport = self.transports.get(server.transport)
        if transport is None or not transport.capabilities.issues_agent_key:
            raise InvalidRequest(
                f"{server.name} uses the {server.transport} transport, which has no agent key")
        return server

    async def servers_rotate_key(self, body: dict[str, Any]) -> dict[str, Any]:
        server = await self._keyed_server(body)
        issued = await self.agent_keys.issue(server.name)
        await self._event("servers", server.name, "key-rotated")
        return {"ok": True, "name": server.name, "key": issued.key, "gateways": await self._gateways()}

    async def servers_revoke_key(self, body: dict[str, Any]) -> dict[str, Any]:
        server = await self._keyed_server(body)
        await self.agent_keys.revoke(server.name)
        await self._event("servers", server.name, "key-revoked")
        return {"ok": True, "name": server.name}

    async def _gateways(self) -> list[dict[str, Any]]:
        # Cached briefly: registering thousands of agent servers must not open a KV
        # consumer per request (the server limits consumers per stream).
        now = time.monotonic()
        if self._gateway_cache is not None and now - self._gateway_cache[0] < GATEWAY_CACHE_S:
            return self._gateway_cache[1]
        out = []
        for raw in (await kv_snapshot(self.gateways)).values():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        records = sorted(out, key=lambda g: str(g.get("worker")))
        self._gateway_cache = (now, records)
        return records

    async def gateways_list(self, body: dict[str, Any]) -> dict[str, Any]:
        _Body.model_validate(body)
        return {"ok": True, "gateways": await self._gateways()}

    # credentials -------------------------------------------------------------------
    async def credentials_add(self, body: dict[str, Any]) -> dict[str, Any]:
        req = CredentialAdd.model_validate(body)
        info = CredentialInfo(name=check_credential_name(req.name), type=req.type,
                              user=req.user, description=req.description)
        secret = _b64(req.secret_b64, "secret_b64")
        passphrase = None if req.passphrase_b64 is None else _b64(req.passphrase_b64, "passphrase_b64")
        await self.vault.add(info, secret, passphrase, replace=req.replace)
        await self._event("credentials", info.name, "added")
        return {"ok": True, "credential": info.model_dump(mode="json")}

    async def credentials_list(self, body: dict[str, Any]) -> dict[str, Any]:
        _Body.model_validate(body)
        return {"ok": True,
                "credentials": [c.model_dump(mode="json") for c in await self.vault.list()]}

    async def credentials_remove(self, body: dict[str, Any]) -> dict[str, Any]:
        req = CredentialRemove.model_validate(body)
        name = check_credential_name(req.name)
        await self.vault.info(name)
        users = [s.name for s in await self.registry.list() if s.credential == name]
        if users and not req.force:
            shown = ", ".join(users[:10]) + (" ..." if len(users) > 10 else "")
            raise InvalidRequest(f"credential {name} is used by {shown}; force removal (CLI: --force) to remove it anyway")
        await self.vault.remove(name)
        await self._event("credentials", name, "removed")
        return {"ok": True, "name": name, "was_used_by": users}


    # audit -------------------------------------------------------------------------
    async def audit_query(self, body: dict[str, Any]) -> dict[str, Any]:
        """Records of the audit trail (auditquery.py): for the owner and for a user granted it."""
        return await self.audit_reader.query(AuditQuery.model_validate(body))

    # users -------------------------------------------------------------------------
    def _store(self) -> UserStore:
        assert self.users is not None  # the endpoints exist only with a store
        return self.users

    async def _applied(self) -> bool:
        """After a change: ask the sync for a pass and wait for one that began after the
        change; False where no sync runs here, or it did not finish in time."""
        if self.user_sync is None:
            return False
        begun = self.user_sync.started
        self.user_sync.changed()
        return await self.user_sync.wait_applied(begun, USERS_APPLY_WAIT_S)

    def _shown(self, record: UserRecord) -> dict[str, Any]:
        return {**record.model_dump(mode="json"), "expired": record.expired()}

    def _reply(self, record: UserRecord | None, applied: bool, **more: Any) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": True, "applied": applied, **more}
        if record is not None:
            reply["user"] = self._shown(record)
        if not applied:
            reply["warnings"] = [
                "this core neither runs the NATS server (fleetbus up does) nor keeps a shared "
                "one's users (fleetbus core --nats-users-file), so the change is stored but not "
                "in NATS yet; see docs/operations.md, 'Users on a shared NATS'"
                if self.user_sync is None else
                "the change is stored; NATS had not applied it within "
                f"{USERS_APPLY_WAIT_S:g} s (see the core's log)"]
        return reply

    async def users_add(self, body: dict[str, Any]) -> dict[str, Any]:
        req = UserAdd.model_validate(body)
        self._known_endpoints(req.admin)
        if not req.allow and not req.admin:
            raise InvalidRequest("a user with no grant and no admin endpoint could do nothing: "
                                 "give --allow or --admin")
        expires = utcnow() + parse_duration(req.expires_in) if req.expires_in else None
        try:
            record = UserRecord(name=check_user_name(req.name), public_key=req.public_key,
                                grants=[parse_grant(text) for text in req.allow],
                                admin=req.admin, expires=expires)
        except ValueError as exc:  # pydantic's, for the public key's form
            raise InvalidRequest(str(exc).splitlines()[-1].strip()) from None
        await self._key_unused(record.public_key)
        await self._store().add(record)
        return self._reply(record, await self._applied())

    def _known_endpoints(self, endpoints: list[str]) -> None:
        unknown = [e for e in endpoints if e not in self.endpoints]
        if unknown:
            raise InvalidRequest(f"no admin endpoint {unknown[0][:64]!r} (one of {', '.join(sorted(self.endpoints))})")

    async def _key_unused(self, public_key: str) -> None:
        """One key, one user: NATS could not tell them apart."""
        holder = next((u.name for u in await self._store().list() if u.public_key == public_key), None)
        if holder is not None:
            raise InvalidRequest(f"that public key is user {holder}'s; make a new key")

    async def users_list(self, body: dict[str, Any]) -> dict[str, Any]:
        _Body.model_validate(body)
        return {"ok": True, "users": [self._shown(r) for r in await self._store().list()]}

    async def users_show(self, body: dict[str, Any]) -> dict[str, Any]:
        record = await self._store().get(NameBody.model_validate(body).name)
        return {"ok": True, "user": self._shown(record)}

    async def users_reach(self, body: dict[str, Any], identity: Identity | None = None) -> dict[str, Any]:
        """Whether the asker may send ``op`` to ``server`` and, if so, the server's status.

        A user's client asks this when nothing answered its request on any of its grant
        subjects, which NATS says alike for a server outside its grants and for one
        nobody serves (docs/security.md). Every user may ask (userperms), and only about
        itself: a server outside its grants, or not registered, is ``outside`` either way,
        so the answer names no server the user could not reach anyway.
        """
        req = UserReach.model_validate(body)
        if req.op not in OPERATIONS:
            raise InvalidRequest(f"unknown operation {req.op[:32]!r} (one of {', '.join(OPERATIONS)})")
        identity = identity or identity_in(None)
        server = await self.registry.find(check_server_name(req.server))
        grant_id: str | None = None
        if server is not None and not identity.is_owner:
            record = next((u for u in await self._store().list()
                           if u.public_key == identity.user and not u.expired()), None)
            grant = next((g for g in (record.grants if record is not None else ()) if g.reaches(server, req.op)),
                         None)
            if grant is None:
                server = None
            else:
                grant_id = grant.id
        if server is None:
            return {"ok": True, "server": req.server, "op": req.op, "reach": "outside"}
        status = await self.registry.status(server.name)
        return {"ok": True, "server": server.name, "op": req.op, "reach": "granted", "grant": grant_id,
                "created": server.created.isoformat(), "status": status.model_dump(mode="json") if status else None}

    async def users_remove(self, body: dict[str, Any]) -> dict[str, Any]:
        name = check_user_name(NameBody.model_validate(body).name)
        await self._store().remove(name)
        return self._reply(None, await self._applied(), name=name)

    async def users_change(self, body: dict[str, Any]) -> dict[str, Any]:
        """Change what a user may do without a new key: connected clients keep their
        connection and get the new permissions at the next apply."""
        req = UserChange.model_validate(body)
        self._known_endpoints(req.admin)
        added = [parse_grant(text) for text in req.allow]
        expires: datetime | None | bool = False  # False: unchanged
        if req.expires_in is not None:
            expires = None if req.expires_in == "never" else utcnow() + parse_duration(req.expires_in)

        def change(record: UserRecord) -> UserRecord:
            unknown = [g for g in req.revoke if not any(g in (have.id, have.text) for have in record.grants)]
            if unknown:
                raise NotFound(f"user {record.name} has no grant {unknown[0][:64]!r} "
                               f"(its grants: {', '.join(g.id for g in record.grants) or 'none'})")
            kept = [g for g in record.grants if g.id not in req.revoke and g.text not in req.revoke]
            grants = kept + [g for g in added if g.text not in {k.text for k in kept}]
            admin = sorted((set(record.admin) | set(req.admin)) - set(req.revoke_admin))
            if not grants and not admin:
                raise InvalidRequest(f"user {record.name} would have no grant and no admin endpoint, "
                                     "and could do nothing: remove the user instead")
            update: dict[str, Any] = {"grants": grants, "admin": admin}
            if expires is not False:
                update["expires"] = expires
            try:
                return UserRecord.model_validate({**record.model_dump(), **update})
            except ValidationError as exc:
                raise InvalidRequest(describe_validation_error(exc)) from None

        record = await self._store().change(check_user_name(req.name), change)
        return self._reply(record, await self._applied())

    async def users_rotate(self, body: dict[str, Any]) -> dict[str, Any]:
        req = UserRotate.model_validate(body)
        await self._key_unused(req.public_key)
        try:
            record = await self._store().replace_key(req.name, req.public_key)
        except ValueError as exc:
            raise InvalidRequest(str(exc).splitlines()[-1].strip()) from None
        return self._reply(record, await self._applied())
