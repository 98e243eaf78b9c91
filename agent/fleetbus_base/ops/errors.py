"""The one exception the operations raise, carrying a fleetbus bus error code.

The operations run both inside fleetbus (the ``local`` transport) and inside the agent,
which cannot import fleetbus; so they report failures as :class:`OpError` with the bus
error code as a plain string, and each caller maps that to its own error type (fleetbus
raises the matching ``fleetbus.errors`` class, the agent puts the code on the wire).
"""

from __future__ import annotations

ERROR_CODES: tuple[str, ...] = (
    "invalid_request",
    "not_found",
    "timeout",
    "cancelled",
    "transport_error",
    "too_large",
    "internal",
)
"""The bus error codes an operation can fail with (a subset of fleetbus's codes:
``server_offline`` and ``auth_failed`` are about reaching a server, not about what
happens on it)."""


class OpError(Exception):
    """An operation failed. ``code`` is one of :data:`ERROR_CODES`; ``message`` is one
    line meant for the person who sent the command."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            # A typo here would otherwise surface as a confusing error far away, in
            # whichever caller maps codes to its own errors.
            raise ValueError(f"unknown operation error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"OpError({self.code!r}, {self.message!r})"

    def to_dict(self) -> dict[str, str]:
        """The error as the bus carries it: ``{"code": ..., "message": ...}``."""
        return {"code": self.code, "message": self.message}


def invalid_request(message: str) -> OpError:
    """The request cannot be carried out as given (bad path, bad spec, not a file)."""
    return OpError("invalid_request", message)


def not_found(message: str) -> OpError:
    """A file, directory or command the request names does not exist."""
    return OpError("not_found", message)


def timeout(message: str) -> OpError:
    """The operation ran past its time limit and was stopped."""
    return OpError("timeout", message)


def cancelled(message: str) -> OpError:
    """The operation was cancelled before it finished."""
    return OpError("cancelled", message)


def transport_error(message: str) -> OpError:
    """The operation failed on the server: an I/O error, permission denied."""
    return OpError("transport_error", message)


def too_large(message: str) -> OpError:
    """A payload or output exceeded a size limit."""
    return OpError("too_large", message)


def internal(message: str) -> OpError:
    """Something the operations did not expect: a bug."""
    return OpError("internal", message)
