"""Names on the bus: subjects, KV buckets, streams, header names. One place, derived from the prefix.

Subjects are built by :class:`Names` and read back by :meth:`Names.server_op`; the
request headers fleetbus sets are written by :func:`request_headers` and read by
:func:`requester_in` and :func:`deadline_in`, and nowhere else. Who NATS authenticated
(the ``Nats-Request-Info`` header nats-server writes on a request crossing a service
import) is read by :func:`identity_in` into an :class:`Identity`.

Also the reply namespace (:class:`ReplySubjects`): the only subjects a requester may
name for fleetbus to publish on (``output_subject``, streamed-transfer subjects).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import Forbidden, InvalidRequest
from .names import USER_KEY_RE

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# A reply prefix: one or more plain tokens (no wildcards, no spaces), ending in a dot.
_REPLY_PREFIX_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*\.$")

#: Where nats-py (and most NATS clients) put inboxes unless told otherwise.
DEFAULT_REPLY_PREFIXES: tuple[str, ...] = ("_INBOX.",)
#: The deployment setting (comma-separated) for other inbox prefixes on a shared NATS.
ENV_REPLY_PREFIXES = "FLEETBUS_REPLY_PREFIXES"
#: Who sent a request, as the requester declares it (recorded in the audit trail).
HDR_REQUESTER = "Fleetbus-Requester"
#: Who NATS authenticated: nats-server writes it (JSON) on every request that crosses a
#: service import, replacing any the client sent (docs/bus-api.md, "Identity").
HDR_REQUEST_INFO = "Nats-Request-Info"
#: Whom fleetbus's job service sends a command for (JSON: the starting user's
#: ``Identity.record()`` and ``via``). Trusted only on a request without
#: ``Nats-Request-Info``, one from inside fleetbus's own account, where only fleetbus and
#: the owner connect; a user's request carrying it is that user's (:func:`on_behalf_in`).
HDR_ON_BEHALF_OF = "Fleetbus-On-Behalf-Of"
#: The reply subjects nats-server makes for a request crossing a service import: one
#: prefix per exporting account, shared by every requester (so never a requester's key).
IMPORT_REPLY_PREFIX = "_R_."
#: The root of users' inboxes: a user's are ``_I.<its public key>.``, the only subjects
#: its NATS permissions let it subscribe to, so the only ones fleetbus publishes on for it.
#: Keyed by the public key, not the name: a client knows it from its own seed alone, and
#: a worker from ``Nats-Request-Info`` alone, whether or not the users bucket has caught up.
USER_INBOX_ROOT = "_I"
#: nats-server's own answer to "who am I and what may I do" (account, public key,
#: permissions), which every account imports: how a user's client finds its grant subjects.
NATS_USER_INFO = "$SYS.REQ.USER.INFO"
#: The most of each Nats-Request-Info field that is kept.
MAX_IDENTITY_CHARS = 128
#: When the requester stops waiting for the reply: seconds since the Unix epoch on its
#: clock (docs/bus-api.md, "Conventions"). A request a worker reaches later than that,
#: plus the host's allowance for clocks that disagree, is answered `timeout`, never run.
HDR_DEADLINE = "Fleetbus-Deadline"
#: Which core's server checker sent a ``ping`` (checks.py).
HDR_CHECKER = "Fleetbus-Checker"

# A command's live output on the requester's output subject (output.py).
#: ``stdout`` or ``stderr``.
HDR_STREAM = "Fleetbus-Stream"
#: The message's sequence number (live output and streamed transfers alike).
HDR_SEQ = "Fleetbus-Seq"
#: Present on the last message of a command's output.
HDR_END = "Fleetbus-End"
#: The exit code, on the end marker.
HDR_EXIT = "Fleetbus-Exit-Code"
#: The error code that ended a command's output or a transfer.
HDR_ERROR = "Fleetbus-Error"
#: The command id the output belongs to.
HDR_COMMAND = "Fleetbus-Command"

# A streamed transfer's messages between requester and worker (streams.py).
#: What a transfer message is (data, end, credit, alive, abort).
HDR_TRANSFER = "Fleetbus-Transfer"
#: The transfer's total size, when known.
HDR_SIZE = "Fleetbus-Size"
#: The SHA-256 of the content, on the end message.
HDR_SHA256 = "Fleetbus-Sha256"
#: Bytes of credit a receiver grants.
HDR_CREDIT = "Fleetbus-Credit"
#: The subject the sender of a transfer message answers on.
HDR_SUBJECT = "Fleetbus-Subject"
#: Who sent a request when its headers do not say.
DEFAULT_REQUESTER = "bus"
#: The most of a declared requester that is kept (it is recorded in every audit record).
MAX_REQUESTER_CHARS = 128

# NATS's own subjects all start with "$" ($JS, $KV, $O, $SYS, $SRV, $MQTT, $NRG, ...):
# publishing there acts on the server itself (deleting a stream takes an empty message).
_SYSTEM_MARK = "$"


@dataclass(frozen=True)
class Names:
    prefix: str = "fleetbus"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise InvalidRequest(
                f"invalid prefix {self.prefix!r}: 1-32 lowercase letters, digits, '_' or '-'"
            )

    # subjects -----------------------------------------------------------------
    def server(self, name: str, op: str) -> str:
        return f"{self.prefix}.v1.servers.{name}.{op}"

    def server_all(self, name: str) -> str:
        return f"{self.prefix}.v1.servers.{name}.*"

    @staticmethod
    def server_op(subject: str) -> tuple[str, str]:
        """The server and the operation of a subject :meth:`server` built.

        Its last two tokens: server names and operations hold no dots (names.py).
        """
        _, server, op = subject.rsplit(".", 2)
        return server, op

    def grant(self, grant_id: str, server: str, op: str) -> str:
        """An operation on a server sent through a user's grant (users.py); ``server`` may be ``*``.
        Its last two tokens are the server and operation, as :meth:`server_op` reads them."""
        return f"{self.prefix}.v1.grants.{grant_id}.{server}.{op}"

    def xfer(self, token: str) -> str:
        """The worker's side of one streamed transfer (streams.py): what the requester
        sends data, credit and aborts to. ``token`` is one random subject token."""
        return f"{self.prefix}.v1.xfer.{token}"

    @property
    def xfer_root(self) -> str:
        """What every :meth:`xfer` subject starts with (with its final dot)."""
        return f"{self.prefix}.v1.xfer."

    @staticmethod
    def user_inbox(public_key: str) -> str:
        """The inbox prefix (with its final dot) of the user with nkey ``public_key``: the
        only subjects it may subscribe to. nats-py's ``inbox_prefix`` is this without the dot."""
        return f"{USER_INBOX_ROOT}.{public_key}."

    @property
    def user_services(self) -> tuple[str, ...]:
        """The subjects a user's account imports as services from fleetbus's: server and
        grant commands, the admin and job services, the worker's side of transfers."""
        p = f"{self.prefix}.v1"
        return (f"{p}.servers.*.*", f"{p}.grants.*.*.*", f"{p}.admin.>", f"{p}.jobs.>", f"{p}.xfer.>")

    @staticmethod
    def user_inboxes() -> str:
        """Every user's inboxes, which fleetbus's account exports to the users' as a stream."""
        return f"{USER_INBOX_ROOT}.>"

    def admin(self, endpoint: str) -> str:
        return f"{self.prefix}.v1.admin.{endpoint}"

    @property
    def admin_root(self) -> str:
        return f"{self.prefix}.v1.admin"

    def audit(self, server: str, op: str) -> str:
        return f"{self.prefix}.v1.audit.{server}.{op}"

    @property
    def audit_all(self) -> str:
        return f"{self.prefix}.v1.audit.>"

    def event(self, *tokens: str) -> str:
        return ".".join((f"{self.prefix}.v1.events", *tokens))

    @property
    def events_all(self) -> str:
        return f"{self.prefix}.v1.events.>"

    def jobs(self, verb: str) -> str:
        """The job service's endpoints: ``start``, ``get``, ``list``, ``cancel``, ``rerun``."""
        return f"{self.prefix}.v1.jobs.{verb}"

    def job_event(self, job: str, kind: str) -> str:
        """A job's event (``started``, ``result``, ``progress``, ``finished``); ``job`` may be ``*``."""
        return self.event("jobs", job, kind)

    def job_events(self, job: str) -> str:
        """Every event of one job."""
        return self.event("jobs", job, ">")

    def queue_group(self, transport: str) -> str:
        return f"{self.prefix}.transport.{transport}"

    def reply_subjects(self, prefixes: tuple[str, ...] = DEFAULT_REPLY_PREFIXES) -> ReplySubjects:
        """The reply namespace of a deployment with this prefix."""
        return ReplySubjects(prefixes, own_prefix=self.prefix)

    # JetStream ----------------------------------------------------------------
    @property
    def _b(self) -> str:
        return self.prefix.replace("-", "_")

    @property
    def servers_bucket(self) -> str:
        return f"{self._b}_servers"

    @property
    def status_bucket(self) -> str:
        return f"{self._b}_status"

    @property
    def credentials_bucket(self) -> str:
        return f"{self._b}_credentials"

    @property
    def commands_bucket(self) -> str:
        return f"{self._b}_commands"

    @property
    def agent_keys_bucket(self) -> str:
        return f"{self._b}_agent_keys"

    @property
    def gateways_bucket(self) -> str:
        return f"{self._b}_gateways"

    @property
    def gateway_state_bucket(self) -> str:
        """The gateways' shared state: the deployment CA and which gateway holds each agent."""
        return f"{self._b}_gateway_state"

    @property
    def users_bucket(self) -> str:
        """Users and their grants (users.py); public keys only."""
        return f"{self._b}_users"

    @property
    def files_bucket(self) -> str:
        return f"{self._b}_files"

    @property
    def job_cores_bucket(self) -> str:
        return f"{self._b}_job_cores"

    @property
    def jobs_live_bucket(self) -> str:
        return f"{self._b}_jobs_live"

    @property
    def workers_bucket(self) -> str:
        return f"{self._b}_workers"

    @property
    def audit_stream(self) -> str:
        return f"{self._b.upper()}_AUDIT"

    @property
    def jobs_stream(self) -> str:
        return f"{self._b.upper()}_JOBS"

    @property
    def job_records(self) -> list[str]:
        """The job events the jobs stream keeps (not ``progress``: it only repeats counts)."""
        return [self.job_event("*", kind) for kind in ("started", "result", "finished")]


@dataclass(frozen=True)
class ReplySubjects:
    """The reply namespace: subjects fleetbus may publish on for a requester.

    fleetbus publishes a command's live output and a transfer's data, credit and end
    markers on subjects the requester names, as itself. Were any subject allowed, a
    requester could make fleetbus publish where the requester itself may not (its admin
    API, another server's commands, the audit stream, ``$JS.API.STREAM.DELETE.<name>``):
    a confused deputy. So a requester-named subject must start with one of ``prefixes``
    (inbox prefixes; ``_INBOX.`` by default) and must never be under fleetbus's own
    ``own_prefix`` or a NATS system subject (first token starting with ``$``), whatever
    the prefixes say. docs/bus-api.md, "Reply subjects". Build it with
    :meth:`Names.reply_subjects` (or :meth:`parse` with ``own_prefix``) so that the
    deployment's own prefix is refused as a reply prefix.
    """

    prefixes: tuple[str, ...] = DEFAULT_REPLY_PREFIXES
    own_prefix: str | None = None
    #: Set for a user's namespace (:meth:`for_identity`): a subject outside it is then
    #: ``forbidden`` (the user may not read there), not ``invalid_request``.
    user: str | None = field(default=None, compare=False)

    @classmethod
    def for_identity(cls, identity: Identity, own_prefix: str | None = None) -> ReplySubjects:
        """A user's namespace: its own inboxes ``_I.<public key>.`` only (none at all for
        an identity whose ``user`` is not an nkey public key: then every subject is
        ``forbidden``)."""
        prefix = identity.inbox_prefix
        return cls((prefix,) if prefix else (), own_prefix, user=identity.name or identity.user or "?")

    def __post_init__(self) -> None:
        if not self.prefixes and self.user is None:
            raise InvalidRequest("give at least one reply prefix (the default is _INBOX.)")
        for prefix in self.prefixes:
            if not _REPLY_PREFIX_RE.fullmatch(prefix):
                raise InvalidRequest(
                    f"invalid reply prefix {prefix[:64]!r}: one or more subject tokens "
                    "without wildcards or spaces, ending in '.' (like _INBOX.)"
                )
            if self._reserved(prefix):
                raise InvalidRequest(
                    f"reply prefix {prefix[:64]!r} lies under fleetbus's own subjects or NATS's "
                    "($...): fleetbus never publishes there for a requester"
                )

    @classmethod
    def parse(cls, text: str | None, own_prefix: str | None = None) -> ReplySubjects:
        """From the setting's text: comma-separated prefixes, each with or without the
        final dot (``_INBOX, _INBOX_ci.``); empty or None is the default."""
        items = [p.strip() for p in (text or "").split(",") if p.strip()]
        prefixes = tuple(p if p.endswith(".") else p + "." for p in items)
        return cls(prefixes or DEFAULT_REPLY_PREFIXES, own_prefix)

    def _reserved(self, subject: str) -> bool:
        first = subject.split(".", 1)[0]
        return first.startswith(_SYSTEM_MARK) or (self.own_prefix is not None and first == self.own_prefix)

    def allows(self, subject: str) -> bool:
        """Whether fleetbus may publish on ``subject`` for a requester."""
        # Enough on its own: a prefix is whole tokens and none was accepted whose first
        # token is reserved, so a subject under one shares that first token.
        return subject.startswith(self.prefixes)

    def check(self, subject: str) -> str:
        """``subject`` if allowed, else ValueError naming the rule (pydantic's error), or
        for a user's namespace :class:`Forbidden`, which pydantic does not wrap."""
        if not self.allows(subject):
            if self.user is not None:
                raise Forbidden(
                    f"{subject[:64]!r} is not one of your inboxes: fleetbus publishes for you only "
                    f"under {self.prefixes[0] if self.prefixes else f'{USER_INBOX_ROOT}.<your public key>.'} "
                    "(and only for a user with an nkey)",
                    before_start=True)
            raise ValueError(
                f"not a reply subject: fleetbus publishes for a requester only under "
                f"{' or '.join(self.prefixes)}, never on its own, $JS, $KV, $O, $SYS or $SRV subjects"
            )
        return subject


def request_headers(requester: str, deadline: float | None = None) -> dict[str, str]:
    """The headers of a request fleetbus sends: who sends it (``Fleetbus-Requester``)
    and, when given, until when (Unix seconds) it waits for the reply
    (``Fleetbus-Deadline``)."""
    headers = {HDR_REQUESTER: requester}
    if deadline is not None:
        headers[HDR_DEADLINE] = f"{deadline:.3f}"
    return headers


def requester_in(headers: Mapping[str, str] | None) -> str:
    """Who a request says sent it, bounded; ``bus`` when it does not say."""
    if not headers:
        return DEFAULT_REQUESTER
    return str(headers.get(HDR_REQUESTER, DEFAULT_REQUESTER))[:MAX_REQUESTER_CHARS]


def deadline_in(headers: Mapping[str, str] | None) -> float | None:
    """A request's ``Fleetbus-Deadline`` (Unix seconds); None when absent or unreadable
    (an unreadable one is ignored rather than refused: it only ever drops work)."""
    value = headers.get(HDR_DEADLINE) if headers else None
    if value is None:
        return None
    try:
        deadline = float(value)
    except ValueError:
        return None
    return deadline if math.isfinite(deadline) else None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request, as NATS authenticated it, not as the request says.

    ``account`` is None for the owner: a request without ``Nats-Request-Info`` came
    from inside fleetbus's own account (the owner, or fleetbus itself), where no
    header is added. Otherwise ``account`` and ``user`` are the header's ``acc`` and
    ``user`` (a user name, or an nkey or JWT public key), ``name_tag`` a JWT user's
    name. ``name`` is not NATS's: the name of the user record holding that public key
    (grants.UserDirectory), filled in by whoever follows the users bucket, for the
    audit trail only: a user's inboxes follow from ``user`` (:attr:`inbox_prefix`). The header
    is trusted because nats-server writes it on the import itself
    and removes any the client sent; a user never reaches fleetbus's services but
    through the import (docs/bus-api.md, "Identity").
    """

    account: str | None
    user: str
    name_tag: str | None = None
    name: str | None = None

    @property
    def is_owner(self) -> bool:
        return self.account is None

    @property
    def key(self) -> str:
        """One string per identity, for claims, fairness and comparisons."""
        return "owner" if self.account is None else f"{self.account}:{self.user}"

    @property
    def inbox_prefix(self) -> str | None:
        """``_I.<user>.``, where this user's NATS permissions let it subscribe, for a user
        NATS names by its nkey (or JWT) public key; None for the owner (whose inboxes are
        the deployment's reply prefixes) and for any other ``user`` (a user/password
        user, or an import without ``share``), for which fleetbus publishes nowhere."""
        if self.account is None or not USER_KEY_RE.fullmatch(self.user):
            return None
        return Names.user_inbox(self.user)

    def record(self) -> dict[str, Any]:
        """The audit record's ``identity`` field (the owner's is one shared dict: read it,
        never change it)."""
        if self.account is None and self.user == "owner":
            return _OWNER_RECORD  # every command of the owner: no dict built per record
        out: dict[str, Any] = {"account": self.account, "user": self.user}
        if self.name_tag is not None:
            out["name_tag"] = self.name_tag
        if self.name is not None:
            out["name"] = self.name
        return out


#: The identity of every request without ``Nats-Request-Info``.
OWNER = Identity(account=None, user="owner")
_OWNER_RECORD: dict[str, Any] = {"account": None, "user": "owner"}
# A header that is there but unreadable cannot have come from nats-server: only from
# inside fleetbus's own account, which can claim anything anyway. It is no user's, so
# it is recorded as such and fleetbus publishes nowhere for it.
_UNREADABLE = Identity(account="?", user="?")


def identity_in(headers: Mapping[str, str] | None) -> Identity:
    """Who NATS authenticated for a request: :data:`OWNER` without
    ``Nats-Request-Info``, else its ``acc``, ``user`` and ``name_tag`` (bounded)."""
    value = headers.get(HDR_REQUEST_INFO) if headers else None
    if value is None:
        return OWNER
    try:
        info = json.loads(value)
    except ValueError:
        return _UNREADABLE
    if not isinstance(info, dict) or not isinstance(info.get("acc"), str) or not info["acc"]:
        return _UNREADABLE
    user = info.get("user")
    tag = info.get("name_tag")
    return Identity(
        account=info["acc"][:MAX_IDENTITY_CHARS],
        # Without `share: true` on the import NATS names only the account.
        user=user[:MAX_IDENTITY_CHARS] if isinstance(user, str) else "",
        name_tag=tag[:MAX_IDENTITY_CHARS] if isinstance(tag, str) and tag else None,
    )


def reply_allowed(replies: ReplySubjects, reply: str, identity: Identity) -> bool:
    """Whether to answer a request on its reply subject ``reply``.

    A user's request crossed the service import, so its reply is one nats-server made
    (``_R_.``), which it maps back to the user's own; the owner's must be in the reply
    namespace ``replies`` (docs/bus-api.md, "Reply subjects"). A ``_R_.`` reply without
    an identity is not nats-server's doing and is not answered."""
    if identity.is_owner:
        return replies.allows(reply)
    return reply.startswith(IMPORT_REPLY_PREFIX)


def on_behalf_in(headers: Mapping[str, str] | None, identity: Identity) -> dict[str, Any] | None:
    """The audit record's identity for a command fleetbus sent for a user (the job
    service, a deputy: docs/bus-api.md, "Jobs"): the ``Fleetbus-On-Behalf-Of`` record,
    bounded, with ``via``. None unless ``identity`` is the owner, i.e. the request came
    from inside fleetbus's own account: a user's own request with the header is that
    user's, whatever it claims. Reply and namespace rules stay ``identity``'s."""
    value = headers.get(HDR_ON_BEHALF_OF) if headers and identity.is_owner else None
    if value is None:
        return None
    try:
        info = json.loads(value)
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("user"), str):
        return None
    out: dict[str, Any] = {"account": info.get("account") if isinstance(info.get("account"), str) else None}
    for key in ("user", "name_tag", "name", "via"):
        if isinstance(info.get(key), str):
            out[key] = info[key][:MAX_IDENTITY_CHARS]
    return out


def on_behalf_identity(record: Mapping[str, Any]) -> Identity:
    """The user an :func:`on_behalf_in` record names, as an :class:`Identity`: whose
    inboxes a job's live output may go to (the job service checked the subject against
    that user's namespace before it sent the command)."""
    account = record.get("account")
    return Identity(account=account if isinstance(account, str) and account else "?",
                    user=str(record.get("user", "")), name=record.get("name"))
