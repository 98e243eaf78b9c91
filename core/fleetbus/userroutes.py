"""Where a user's client sends a server's operation: its grant subjects, from NATS itself.

A user (docs/security.md) may publish a server's operation only on the subjects its
permissions list: ``<p>.v1.grants.<grant id>.*.<op>`` for each grant allowing ``op``
(the worker serving a server the grant's selector matches answers there) and, for
grants naming servers outright, ``<p>.v1.servers.<name>.<op>``. The client learns that
list from nats-server, not from fleetbus: ``$SYS.REQ.USER.INFO`` (every account imports
it; a user's permissions allow it) answers with the caller's own account, public key
and permissions. So a user needs nothing but its seed, and no admin endpoint.

Which grant covers a server is the selector's business, which the user cannot read; a
grant that does not cover it has no responder there, which NATS answers at once, so the
client tries the grant subjects in turn (:meth:`UserRoutes.subjects`). A request nobody
received ran nowhere, so trying the next one cannot run a command twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, ValidationError

from .connection import watch_errors
from .subjects import NATS_USER_INFO, Names

log = logging.getLogger("fleetbus.userroutes")

#: How long to wait for nats-server's answer (it answers from memory, in a millisecond).
USER_INFO_TIMEOUT_S = 3.0


class _Allow(BaseModel):
    model_config = ConfigDict(extra="ignore")
    allow: list[str] = []


class _Permissions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    publish: _Allow | None = None
    subscribe: _Allow | None = None


class _UserInfo(BaseModel):
    """The ``data`` of nats-server's answer to ``$SYS.REQ.USER.INFO`` (the parts used)."""

    model_config = ConfigDict(extra="ignore")
    user: str
    account: str
    permissions: _Permissions | None = None


@dataclass(frozen=True)
class UserRoutes:
    """A user's publish permissions, read as routes to servers."""

    names: Names
    account: str
    publish: tuple[str, ...]
    #: Whether it is a user as fleetbus makes them: its subscribe permissions are its own
    #: inboxes ``_I.<key>.>`` (userperms.permissions). The owner, fleetbus's own
    #: processes with an nkey on a shared NATS, or an operator's own creds are not.
    is_user: bool

    def subjects(self, server: str, op: str) -> list[str]:
        """The subjects to try, in order, to send ``op`` to ``server``: the server's own
        subject if a grant names it outright, then each grant allowing ``op``. Empty
        when no permission allows ``op`` anywhere."""
        allowed = set(self.publish)
        out = []
        direct = self.names.server(server, op)
        if direct in allowed:
            out.append(direct)
        for subject in self.publish:
            grant_id = self._grant_of(subject, op)
            if grant_id is not None:
                out.append(self.names.grant(grant_id, server, op))
        return out

    def _grant_of(self, subject: str, op: str) -> str | None:
        """The grant id of a permission ``<p>.v1.grants.<id>.*.<op>``, else None."""
        head = f"{self.names.prefix}.v1.grants."
        tail = f".*.{op}"
        if not (subject.startswith(head) and subject.endswith(tail)):
            return None
        grant_id = subject[len(head):-len(tail)]
        return grant_id if grant_id and "." not in grant_id and grant_id not in ("*", ">") else None


async def ask_user_info(nc: NATS, names: Names, inbox_prefixes: tuple[str, ...]) -> UserRoutes | None:
    """nats-server's account of this connection (see the module), read as routes; None
    when it does not answer or may not be asked.

    Asked on an explicit subscription under the first of ``inbox_prefixes`` (with their
    final dots), then, only if NATS refuses that subscription, under the next: a user's
    permissions allow only ``_I.<key>.``, an operator's own restricted creds perhaps only
    ``_INBOX.``. A refusal comes back as an error on the connection, so nothing waits
    on a clock for it, and a user's log shows no refused ``_INBOX.`` subscription."""
    token = secrets.token_hex(11)
    msg = None
    for prefix in inbox_prefixes:
        try:
            msg = await _ask(nc, f"{prefix}info.{token}")
            break
        except _Refused:
            continue
    if msg is None:
        log.debug("no answer to %s", NATS_USER_INFO)
        return None
    try:
        info = _UserInfo.model_validate(json.loads(msg.data).get("data") or {})
    except (ValueError, ValidationError, AttributeError):
        log.debug("unreadable answer to %s", NATS_USER_INFO)
        return None
    perms = info.permissions
    publish = tuple(perms.publish.allow) if perms and perms.publish else ()
    subscribe = perms.subscribe.allow if perms and perms.subscribe else []
    return UserRoutes(names, info.account, publish, is_user=Names.user_inbox(info.user) + ">" in subscribe)


class _Refused(Exception):
    """NATS refused the subscription for the answer."""


async def _ask(nc: NATS, reply: str) -> Msg | None:
    """nats-server's answer to ``$SYS.REQ.USER.INFO`` on ``reply``; None without an
    answer; :class:`_Refused` when NATS refuses to let us subscribe there."""
    answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    refusal = f'permissions violation for subscription to "{reply.lower()}"'

    def refused(exc: Exception) -> None:
        if refusal in str(exc).lower() and not answer.done():
            answer.set_exception(_Refused())

    async def answered(msg: Msg) -> None:
        if not answer.done():
            answer.set_result(msg)

    watch_errors(nc, refused)  # stays chained, and does nothing once answered
    sub = await nc.subscribe(reply, cb=answered, max_msgs=1)
    try:
        await nc.publish(NATS_USER_INFO, b"", reply=reply)
        try:
            return await asyncio.wait_for(answer, USER_INFO_TIMEOUT_S)
        except TimeoutError:
            return None
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass  # max_msgs already removed it
