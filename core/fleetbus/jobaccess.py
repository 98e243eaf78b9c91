"""Who may do what with jobs: the job service is a deputy for users.

The job service runs in fleetbus's own account and publishes each server's command
itself, so NATS's permissions on the user never see those commands. For a user (a
request with ``Nats-Request-Info``, :func:`fleetbus.subjects.identity_in`) it therefore
checks, before a job exists, that every server the selection resolves to is covered by
one of the user's grants allowing the job's operation (:meth:`JobAccess.routes`), and
each command then goes out on that grant's subject (``<p>.v1.grants.<id>.<server>.<op>``),
which a worker serves only while the grant still selects the server: the worker's
subscription is the second check. The user is named to the worker in
``Fleetbus-On-Behalf-Of`` (trusted only inside fleetbus's account), so its audit
record names the user with ``via: jobs``.

A user sees only its own jobs (:meth:`JobAccess.visible`: another's id is
``not_found``, so ids do not leak); the owner sees every job. Users follow a job by
polling ``jobs.get`` (replies say ``"follow": "poll"``) rather than through job events:
those are fleetbus's own subjects, which users may not subscribe to, and polling adds no
subject fleetbus publishes on for a user (no new confused-deputy surface) and works the
same for a job followed long after its start (``jobs watch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from nats.js.kv import KeyValue

from .errors import Forbidden
from .grants import UserDirectory
from .jobrecords import JobDefinition
from .jobrequest import JobRequest
from .metrics import Metrics
from .records import Server
from .subjects import Identity, Names, ReplySubjects, identity_in

log = logging.getLogger("fleetbus.jobs")

#: How long the job service waits for the users bucket at start before it serves.
USERS_READY_S = 10.0
#: How many refused servers a ``forbidden`` start names.
NAMED_REFUSED = 5
#: Operations a user can never run as a job: both move files through the object store,
#: which is fleetbus's own (a user reaches no JetStream, and an object holds any
#: requester's file).
OBJECT_STORE_OPS = ("put", "get")


@dataclass(frozen=True)
class Asker:
    """Who sent a job request: as declared (``Fleetbus-Requester``) and as NATS
    authenticated it, with the user's name from the users bucket."""

    requester: str
    identity: Identity


class JobAccess:
    """The users bucket, followed, and the job service's rules for users.
    ``start``/``stop`` in that order."""

    def __init__(self, users_kv: KeyValue, names: Names, metrics: Metrics) -> None:
        self.users_kv = users_kv
        self.names = names
        self.metrics = metrics
        self.users: UserDirectory | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.users = UserDirectory(self.users_kv)
        ready = asyncio.Event()

        async def nothing() -> None:
            return None

        self._task = asyncio.create_task(self.users.watch(nothing, ready), name="fleetbus-jobs-users")
        try:
            await asyncio.wait_for(ready.wait(), USERS_READY_S)
        except TimeoutError:
            # Until they load, a user is unknown: its jobs are refused, never widened.
            log.warning("the users did not load within %g s; users' jobs are refused until they do",
                        USERS_READY_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def asker(self, headers: Mapping[str, str] | None, requester: str) -> Asker:
        """Who sent a request, with the user's name filled in when the bucket knows the key."""
        identity = identity_in(headers)
        if not identity.is_owner and self.users is not None:
            name = self.users.name_of(identity.user)
            if name is not None:
                identity = dataclasses.replace(identity, name=name)
        return Asker(requester, identity)

    def replies_for(self, asker: Asker, owner: ReplySubjects) -> ReplySubjects:
        """Where a job's ``output_subject`` may point: ``owner`` for the owner, the
        user's own inboxes for a user."""
        if asker.identity.is_owner:
            return owner
        return ReplySubjects.for_identity(asker.identity, self.names.prefix)

    def denied(self, asker: Asker, verb: str) -> None:
        """Count a job request refused as ``forbidden``."""
        self.metrics.denied.labels(asker.identity.user, f"jobs.{verb}").inc()

    def check_request(self, req: JobRequest, asker: Asker, verb: str) -> None:
        """Refuse what a user can never do through a job, whatever its grants."""
        if asker.identity.is_owner:
            return
        if req.op in OBJECT_STORE_OPS:
            self.denied(asker, verb)
            raise Forbidden(f"a {req.op} job moves its files through the object store, which is "
                            "fleetbus's own: users may not use it (send put/get to each server with "
                            "a streamed transfer instead)", before_start=True)

    def routes(self, asker: Asker, op: str, servers: list[Server], verb: str) -> dict[str, str] | None:
        """For a user: the grant each of ``servers`` is reached through (server -> grant
        id). Any server none of its grants covers for ``op`` refuses the whole job
        (``forbidden``, counted), naming how many and the first few. None for the owner,
        whose commands go on the servers' own subjects."""
        identity = asker.identity
        if identity.is_owner:
            return None
        routes: dict[str, str] = {}
        refused: list[str] = []
        for server in servers:
            grant = (self.users.grant_for(identity.name, server, op)
                     if self.users is not None and identity.name is not None else None)
            if grant is None:
                refused.append(server.name)
            else:
                routes[server.name] = grant.id
        if refused:
            self.denied(asker, verb)
            named = ", ".join(refused[:NAMED_REFUSED]) + (", ..." if len(refused) > NAMED_REFUSED else "")
            who = identity.name or identity.user or "this user"
            raise Forbidden(f"{len(refused)} of the {len(servers)} selected servers are outside "
                            f"{who}'s grants for {op} ({named}): nothing was started", before_start=True)
        return routes

    @staticmethod
    def visible(definition: JobDefinition, identity: Identity) -> bool:
        """Whether ``identity`` may see (get, cancel, rerun, list) the job: the owner
        every job, a user its own (a job kept before identities were: the owner's)."""
        return identity.is_owner or definition.identity_key == identity.key

    @staticmethod
    def on_behalf(identity: Identity) -> str | None:
        """The ``Fleetbus-On-Behalf-Of`` value of a user's job commands; None for the owner."""
        if identity.is_owner:
            return None
        return json.dumps({**identity.record(), "via": "jobs"})
