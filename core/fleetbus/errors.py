"""The error hierarchy, one class per bus error code.

Every failure that crosses a process boundary is one of these codes; the plugin host
turns any exception a transport raises into one of them, and the client library turns
an error reply back into the matching exception. Transport authors raise these (most
often :class:`TransportError`, :class:`ServerOffline` or :class:`AuthFailed`) and never
need to know how they travel.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self


class FleetbusError(Exception):
    """Base of all fleetbus errors. ``code`` is the bus error code."""

    code: ClassVar[str] = "internal"
    #: True when the command this error ends never reached the server: it was refused
    #: or cancelled while waiting for a slot, or its session could not be opened. The
    #: plugin host then drops the command id's claim, so a retry with the same id runs
    #: the command. Set by whoever knows (the host, the session pool); never sent on the
    #: wire, where the code alone says what happened.
    before_start: bool = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

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
        cls = ERROR_CLASSES.get(str(error.get("code")), InternalError)
        err = cls(str(error.get("message", "unknown error")), **(error.get("details") or {}))
        return err


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
        InternalError,
    )
}

ERROR_CODES: tuple[str, ...] = tuple(ERROR_CLASSES)
