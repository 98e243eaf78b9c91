"""NATS permissions generated from the users bucket, and keeping nats-server in step.

Each user's permissions are a pure function of its record (:func:`permissions`):

- publish: ``<p>.v1.grants.<grant id>.*.<op>`` for each operation a grant allows, plus
  ``.cancel``; ``<p>.v1.servers.<name>.<op>`` (and ``.cancel``) for servers a grant names
  outright; ``<p>.v1.admin.<endpoint>`` per admin endpoint granted; ``<p>.v1.xfer.>``
  (the worker's side of a streamed transfer); ``$SYS.REQ.USER.INFO`` (nats-server
  answers it with the user's own permissions: how its client finds its grant subjects);
  ``<p>.v1.jobs.start|get|list|cancel|rerun``
  for a user with a grant (the job service checks every selected server against its
  grants, and shows a user only its own jobs);
- subscribe: ``_I.<its public key>.>`` only, the user's own inbox.

Nothing else: no ``$JS.API``, no events, no other user's inbox. An expired user is left
out altogether, which nats-server treats as removed (its connection is closed).

:class:`UserSync` runs beside the embedded NATS: it watches the users bucket and writes
the USERS account's users anew on every change and when the next user expires, then
nats-server reloads (:meth:`fleetbus.natsaccounts.UsersFile.apply`: the embedded NATS's
or, beside a shared one, the file ``fleetbus core --nats-users-file`` names).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta

from nats.js.kv import KeyValue

from .records import utcnow
from .subjects import NATS_USER_INFO, Names
from .users import UserRecord, UserStore

log = logging.getLogger("fleetbus.userperms")

#: The longest the sync sleeps without looking at expiry (a clock step, a missed watch).
RECHECK_S = 60.0
#: After a failed apply, the wait before trying again.
RETRY_S = 5.0


def permissions(names: Names, user: UserRecord) -> dict[str, list[str]]:
    """What ``user`` may publish and subscribe to, as NATS subjects (sorted, unique)."""
    # users.reach: why nothing answered on its grant subjects (outside them, or offline).
    publish: set[str] = {f"{names.prefix}.v1.xfer.>", NATS_USER_INFO, names.admin("users.reach")}
    for grant in user.grants:
        for op in (*grant.ops, "cancel"):
            publish.add(names.grant(grant.id, "*", op))
            publish.update(names.server(server, op) for server in grant.by_name())
    publish.update(names.admin(endpoint) for endpoint in user.admin)
    if user.grants:  # jobs over the servers its grants cover, checked by the job service
        publish.update(names.jobs(verb) for verb in ("start", "get", "list", "cancel", "rerun"))
    return {"publish": sorted(publish), "subscribe": [names.user_inbox(user.public_key) + ">"]}


def render_users(names: Names, users: Iterable[UserRecord], now: datetime | None = None) -> str:
    """The USERS account's ``users: [...]`` block for every user not expired at ``now``.

    JSON is valid NATS config, and quoting every value keeps a name or subject from
    being read as anything else. Public keys only: the file holds no secret.
    """
    now = now or utcnow()
    entries = []
    keys: set[str] = set()
    for user in sorted(users, key=lambda u: u.name):
        if user.expired(now):
            continue
        if user.public_key in keys:
            # nats-server refuses a key listed twice, and with it every other change; the
            # admin API never stores one twice, so this is a record written around it.
            log.warning("user %s shares its key with another user: left out of NATS", user.name)
            continue
        keys.add(user.public_key)
        perms = permissions(names, user)
        entries.append("  " + json.dumps({
            "nkey": user.public_key,
            "permissions": {"publish": {"allow": perms["publish"]},
                            "subscribe": {"allow": perms["subscribe"]}},
        }))
    if not entries:
        return "users: []\n"
    return "users: [\n" + "\n".join(entries) + "\n]\n"


def next_expiry(users: Iterable[UserRecord], now: datetime) -> datetime | None:
    """When the next user still present expires, if any does."""
    pending = [u.expires for u in users if u.expires is not None and u.expires > now]
    return min(pending) if pending else None


Apply = Callable[[str], Awaitable[bool]]


class UserSync:
    """Keeps the running nats-server's USERS account equal to the users bucket.

    ``apply`` takes the rendered users and returns whether they changed
    (:meth:`fleetbus.natsaccounts.UsersFile.apply`). One task: a watch on the
    bucket wakes it; it also wakes when the next user expires, and every
    :data:`RECHECK_S` s regardless.
    """

    def __init__(self, kv: KeyValue, names: Names, apply: Apply, recheck_s: float = RECHECK_S) -> None:
        self.store = UserStore(kv)
        self.names = names
        self.apply = apply
        self.recheck_s = recheck_s
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Passes begun, and the number of the last one that completed: a change made
        #: when ``started`` was n is in NATS once ``applied`` > n.
        self.started = 0
        self.applied = 0
        self._applied_event = asyncio.Event()

    async def start(self) -> None:
        # Before start returns: the users are in place, the expired ones already out. If
        # they cannot be (a users file that cannot be written, nats-server refusing it or
        # out of reach) the core serves all the same and the task tries again shortly.
        try:
            next_at = await self.sync_once()
        except Exception as exc:
            log.warning("could not update NATS users: %s", exc)
            next_at = utcnow() + timedelta(seconds=RETRY_S)
        self._tasks = [asyncio.create_task(self._watch(), name="fleetbus-users-watch"),
                       asyncio.create_task(self._run(next_at), name="fleetbus-users-sync")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def sync_once(self) -> datetime | None:
        """Render and apply the bucket's users now; when the next one expires."""
        self.started += 1
        number = self.started
        users = await self.store.list()
        now = utcnow()
        if await self.apply(render_users(self.names, users, now)):
            log.info("NATS users updated: %d user(s)", sum(not u.expired(now) for u in users))
        self.applied = number
        self._applied_event.set()
        return next_expiry(users, now)

    async def wait_applied(self, after: int, timeout: float) -> bool:
        """Wait until a pass begun after pass number ``after`` has completed (True), or
        ``timeout`` s (False). Read ``started`` after a change, then wait on it."""
        async def passed() -> None:
            while self.applied <= after:
                self._applied_event.clear()
                await self._applied_event.wait()

        try:
            await asyncio.wait_for(passed(), timeout)
        except TimeoutError:
            return False
        return True

    def changed(self) -> None:
        """Ask for a pass soon (the admin service calls it after a change)."""
        self._wake.set()

    async def _run(self, next_at: datetime | None) -> None:
        while True:
            wait = self.recheck_s
            if next_at is not None:
                wait = max(0.0, min(wait, (next_at - utcnow()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            try:
                next_at = await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Access stays as nats-server last accepted it; the next pass tries again.
                log.warning("could not update NATS users: %s", exc)
                next_at = None
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    async def _watch(self) -> None:
        """Wake the sync on any change to the bucket, from any core."""
        while True:
            try:
                watcher = await self.store.kv.watchall(include_history=False, ignore_deletes=False)
                try:
                    async for _ in watcher:
                        self._wake.set()
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("users watch ended (%s); watching again", exc)
            await asyncio.sleep(1.0)
