"""Records kept in the JetStream key-value buckets: servers, their status, credentials.

These are pydantic models because they cross process boundaries (every core, worker
and gateway reads them from NATS); unknown fields are refused so a typo in an admin
request is an error rather than silently ignored data.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidRequest
from .names import LABEL_KEY_RE, check_credential_name, check_server_name
from .printable import printable

# Longer than any version, address or check message; an escaped string grows.
MAX_STATUS_TEXT = 1024


def _field(check: Callable[[str], str], value: str) -> str:
    # pydantic reports ValueError as a field error; our checks raise InvalidRequest.
    try:
        return check(value)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


def utcnow() -> datetime:
    return datetime.now(UTC)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Server(Strict):
    """A registered server: its name and how to reach it."""

    name: str
    transport: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    host: str | None = Field(default=None, max_length=253)
    port: int | None = Field(default=None, ge=1, le=65535)
    credential: str | None = None
    roles: list[str] = Field(default_factory=list, max_length=64)
    environment: str | None = Field(default=None, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    description: str | None = Field(default=None, max_length=1024)
    created: datetime = Field(default_factory=utcnow)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _field(check_server_name, v)

    @field_validator("credential")
    @classmethod
    def _credential(cls, v: str | None) -> str | None:
        return None if v is None else _field(check_credential_name, v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 64:
            raise ValueError("at most 64 labels")
        for key, value in v.items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise ValueError(f"invalid label key {key!r}")
            if len(value) > 256:
                raise ValueError(f"label {key!r} is longer than 256 characters")
        return v

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        for role in v:
            if not LABEL_KEY_RE.fullmatch(role):
                raise ValueError(f"invalid role {role!r}")
        return v


class ServerStatus(Strict):
    """What the fleet last saw of a server; written by whoever serves it.

    Its text fields come from the server's side (an agent's hello names its version)
    and end up in tables on operators' terminals, so control characters are escaped
    and lengths bounded whenever a status is built: when it is written and when it is
    read back.
    """

    name: str
    state: Literal["online", "offline", "unknown"] = "unknown"
    served_by: str | None = None
    transport_version: str | None = None
    since: datetime | None = None
    last_seen: datetime | None = None
    detail: str | None = None
    agent_version: str | None = None
    remote_address: str | None = None
    last_check: datetime | None = None
    check_latency_s: float | None = None

    @field_validator("served_by", "transport_version", "detail", "agent_version", "remote_address")
    @classmethod
    def _shown_safely(cls, v: str | None) -> str | None:
        return None if v is None else printable(v)[:MAX_STATUS_TEXT]


CredentialType = Literal["password", "ssh-key", "token", "windows"]


class CredentialInfo(Strict):
    """What anyone may see of a credential: never its secret."""

    name: str
    type: CredentialType
    user: str | None = None
    description: str | None = None
    created: datetime = Field(default_factory=utcnow)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _field(check_credential_name, v)
