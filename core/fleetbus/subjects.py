"""Names on the bus: subjects, KV buckets, streams, header names. One place, derived from the prefix.

Subjects are built by :class:`Names` and read back by :meth:`Names.server_op`; the
request headers fleetbus sets are written by :func:`request_headers` and read by
:func:`requester_in` and :func:`deadline_in`, and nowhere else.

Also the reply namespace (:class:`ReplySubjects`): the only subjects a requester may
name for fleetbus to publish on (``output_subject``, streamed-transfer subjects).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidRequest

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# A reply prefix: one or more plain tokens (no wildcards, no spaces), ending in a dot.
_REPLY_PREFIX_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*\.$")

#: Where nats-py (and most NATS clients) put inboxes unless told otherwise.
DEFAULT_REPLY_PREFIXES: tuple[str, ...] = ("_INBOX.",)
#: The deployment setting (comma-separated) for other inbox prefixes on a shared NATS.
ENV_REPLY_PREFIXES = "FLEETBUS_REPLY_PREFIXES"
#: Who sent a request, as the requester declares it (recorded in the audit trail).
HDR_REQUESTER = "Fleetbus-Requester"
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

    @staticmethod
    def user_inbox(user: str) -> str:
        """The inbox prefix of a user (with its final dot): the only subjects it may subscribe to."""
        return f"_I.{user}."

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

    def __post_init__(self) -> None:
        if not self.prefixes:
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
        """``subject`` if allowed, else ValueError naming the rule (pydantic's error)."""
        if not self.allows(subject):
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
