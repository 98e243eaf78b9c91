"""The error hierarchy, one class per bus error code, and the one way into it.

Every failure that crosses a process boundary is one of these codes::

    FleetbusError            the base (its own code: internal)
    ├── InvalidRequest       invalid_request
    ├── NotFound             not_found
    ├── ServerOffline        server_offline
    ├── AuthFailed           auth_failed
    ├── TransportError       transport_error
    ├── Timeout              timeout
    ├── Cancelled            cancelled
    ├── TooLarge             too_large
    ├── Busy                 busy
    ├── Lost                 lost
    ├── Forbidden            forbidden
    └── InternalError        internal

Transport authors raise these (most often :class:`TransportError`,
:class:`ServerOffline` or :class:`AuthFailed`) and never need to know how they travel.
Anything else becomes one of them here, in one place, as httpx's ``map_exceptions``
does for its transports:

- a code someone reported (a reply, an agent's ``fail``, a script's result, the
  operations' ``OpError``): :func:`error_for_code`, with one fallback rule for codes
  this version does not know;
- an exception of the OS or its sockets (``OSError``: ``ConnectionError``,
  ``ssl.SSLError``, ``TimeoutError``): :func:`mapped_errors` with a table,
  :data:`REACHING` while a server is being reached (``server_offline``) or
  :data:`RUNNING` once a command is under way (``transport_error``).

Library-specific translators (the wmi transport's ``map_error`` for pywinrm) stay
with their library and end in these classes too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar, Self

from fleetbus_base.text import first_line, shorten

#: How much of an exception's first line a mapped error quotes.
MAX_CAUSE_CHARS = 200


class FleetbusError(Exception):
    """Base of all fleetbus errors. ``code`` is the bus error code."""

    code: ClassVar[str] = "internal"
    #: True when the command this error ends never reached the server: it was refused
    #: or cancelled while waiting for a slot, or its session could not be opened. The
    #: plugin host then drops the command id's claim, so a retry with the same id runs
    #: the command. Set by whoever knows (``before_start=True`` where the error is made,
    #: :meth:`not_started` where one raised below is found to end such a command);
    #: never sent on the wire, where the code alone says what happened.
    before_start: bool

    def __init__(self, message: str, *, before_start: bool = False, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.before_start = before_start

    def not_started(self) -> Self:
        """Mark this error as ending a command that never reached the server; returns it."""
        self.before_start = True
        return self

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def from_wire(error: dict[str, Any]) -> FleetbusError:
        """The error a fleetbus reply carries (``to_wire``'s inverse)."""
        return error_for_code(error.get("code"), str(error.get("message", "unknown error")),
                              details=error.get("details"))


class InvalidRequest(FleetbusError):
    """The request was malformed: bad JSON, unknown or missing fields, bad names."""

    code = "invalid_request"


class NotFound(FleetbusError):
    """The named server, credential, file or command does not exist."""

    code = "not_found"


class ServerOffline(FleetbusError):
    """Nobody serves the server right now, or the server cannot be reached."""

    code = "server_offline"


class Timeout(FleetbusError):
    """The command ran past its time limit and was stopped."""

    code = "timeout"


class Cancelled(FleetbusError):
    """The command was cancelled before it finished."""

    code = "cancelled"


class AuthFailed(FleetbusError):
    """The server (or fleetbus) refused the credentials or key."""

    code = "auth_failed"


class TransportError(FleetbusError):
    """The transport failed to carry out the command (I/O error, protocol error)."""

    code = "transport_error"


class TooLarge(FleetbusError):
    """A request, inline payload or output exceeded a size limit."""

    code = "too_large"


class Busy(FleetbusError):
    """The worker is shedding load: too much work is waiting there (or too much of it
    from this requester). Nothing was run; retry with backoff."""

    code = "busy"


class Lost(FleetbusError):
    """The worker running the command died before it answered; whether the process ran
    (and how far) is unknown. A retry with the same id gets this answer too, never a
    second run; to run the command again, send it with a new id."""

    code = "lost"


class Forbidden(FleetbusError):
    """The requester may not do this: NATS refused the subject (its permissions), or
    fleetbus decided (a subject outside the requester's own inboxes, a command id or
    cancel that belongs to another identity). Nothing was run."""

    code = "forbidden"


class InternalError(FleetbusError):
    """A bug: something fleetbus did not expect. The message never carries secrets."""

    code = "internal"


ERROR_CLASSES: dict[str, type[FleetbusError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        NotFound,
        ServerOffline,
        Timeout,
        Cancelled,
        AuthFailed,
        TransportError,
        TooLarge,
        Busy,
        Lost,
        Forbidden,
        InternalError,
    )
}

ERROR_CODES: tuple[str, ...] = tuple(ERROR_CLASSES)


def error_for_code(code: object, message: str, *, reporter: str | None = None,
                   details: Mapping[str, Any] | None = None) -> FleetbusError:
    """The fleetbus error for a bus error code someone reported, with ``message``.

    The one fallback rule. With no ``reporter``, fleetbus itself reported the code (a
    reply, the operations run in this process), and a code this version does not know
    is ``internal``. A ``reporter`` is a peer (``"the agent"``, a script on the
    server): its own ``internal``, and any code this version does not know, are the
    transport failing, never fleetbus's bug: ``transport_error``, "<reporter> failed:
    <message>".
    """
    cls = ERROR_CLASSES.get(str(code))
    if reporter is None:
        error = (cls or InternalError)(message)
    elif cls is None or cls is InternalError:
        error = TransportError(f"{reporter} failed: {message}")
    else:
        error = cls(message)
    # Set, not passed as keywords: reported details never reach the constructor's own
    # arguments (``before_start``).
    error.details = dict(details or {})
    return error


#: While a server is being reached (a session opening): the OS failing to reach it
#: means it is offline, and no command was started.
REACHING: Mapping[type[BaseException], type[FleetbusError]] = {OSError: ServerOffline}
#: Once a command is under way: the OS failing under it is the transport failing.
RUNNING: Mapping[type[BaseException], type[FleetbusError]] = {OSError: TransportError}


def mapped_errors(mapping: Mapping[type[BaseException], type[FleetbusError]], what: str, *,
                  before_start: bool = False) -> _MappedErrors:
    """``with mapped_errors(RUNNING, "ssh transport failed"):`` raises what the block
    raises as a fleetbus error: a :class:`FleetbusError` as it is, an exception of a type
    in ``mapping`` (the first that matches, in order) as its fleetbus error, "<what>:
    <the exception's first line>", chained to it. Anything else passes unchanged: the
    host reports it as ``internal`` (a bug), once. ``before_start`` marks the mapped
    error and any fleetbus error (see :attr:`FleetbusError.before_start`)."""
    return _MappedErrors(mapping, what, before_start)


class _MappedErrors:
    # A class, not contextlib.contextmanager: it wraps every command, and a generator
    # per use costs more than the rest of the mapping.
    __slots__ = ("before_start", "mapping", "what")

    def __init__(self, mapping: Mapping[type[BaseException], type[FleetbusError]], what: str,
                 before_start: bool) -> None:
        self.mapping = mapping
        self.what = what
        self.before_start = before_start

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # done, or CancelledError and the like: not ours to map
        if isinstance(exc, FleetbusError):
            if self.before_start:
                exc.not_started()
            return False
        for source, target in self.mapping.items():
            if isinstance(exc, source):
                detail = shorten(first_line(exc), MAX_CAUSE_CHARS)
                raise target(f"{self.what}: {detail}", before_start=self.before_start) from exc
        return False
