"""Bus API v1 request and reply bodies (JSON), validated at the boundary.

Every request model forbids unknown fields: a misspelt field from another system gets
``invalid_request`` naming the field instead of being silently ignored. docs/bus-api.md
documents each field; keep the two in step.

Subjects a requester names for fleetbus to publish on (``output_subject``,
``stream.subject``) must lie in the deployment's reply namespace
(:class:`fleetbus.subjects.ReplySubjects`). The namespace reaches the validators as the
pydantic validation context (:func:`parse_request` passes it); validating without one
applies the default, ``_INBOX.`` only, so no caller can forget the rule by omission.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import InvalidRequest, TooLarge
from .limits import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_STREAM_IDLE_S,
    DEFAULT_STREAM_WINDOW,
    DEFAULT_TAIL_BYTES,
    MAX_EXEC_TIMEOUT_S,
    MAX_INLINE_BYTES,
    MAX_REQUEST_BYTES,
    MAX_STREAM_IDLE_S,
    MAX_STREAM_WINDOW,
    MIN_STREAM_WINDOW,
)
from .names import COMMAND_ID_RE
from .subjects import ReplySubjects

__all__ = [
    "DEFAULT_TAIL_BYTES", "MAX_INLINE_BYTES", "MAX_JSON_DEPTH", "MAX_REQUEST_BYTES", "OPERATIONS",
    "REQUEST_MODELS", "parse_request", "reply_context",
]

OPERATIONS = ("exec", "put", "get", "info", "ping")
Operation = Literal["exec", "put", "get", "info", "ping"]

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A plain subject: tokens of printable non-space characters, no wildcards.
_SUBJECT_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")
_OBJECT_RE = re.compile(r"^[A-Za-z0-9_.=/-]{1,255}$")
# A mode string: 1-4 octal digits, nothing else ("0644", "755"); no sign, prefix or space.
_MODE_RE = re.compile(r"^[0-7]{1,4}$")
# Nesting no bus body needs; deeper JSON is refused before any model sees it.
MAX_JSON_DEPTH = 32
_CONTEXT_KEY = "reply_subjects"
_DEFAULT_REPLIES = ReplySubjects()


def reply_context(replies: ReplySubjects) -> dict[str, ReplySubjects]:
    """The validation context that makes the request models apply ``replies``."""
    return {_CONTEXT_KEY: replies}


def _reply_subject(v: str, info: ValidationInfo, field: str) -> str:
    if not _SUBJECT_RE.fullmatch(v):
        raise ValueError(f"{field} must be a plain NATS subject without wildcards")
    context = info.context if isinstance(info.context, dict) else {}
    replies = context.get(_CONTEXT_KEY) or _DEFAULT_REPLIES
    return replies.check(v)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_REQUEST_BYTES)

    id: str | None = Field(
        default=None,
        description="Command id. A retried exec or put with the same id is not run twice.",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not COMMAND_ID_RE.fullmatch(v):
            raise ValueError("id must be 1-64 letters, digits, '-' or '_'")
        return v


def _check_path(v: str) -> str:
    if not v or "\x00" in v:
        raise ValueError("path must be non-empty and contain no NUL byte")
    if len(v) > 4096:
        raise ValueError("path is longer than 4096 characters")
    return v


def _decode_b64(v: str, field: str) -> bytes:
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64") from None


class ExecRequest(Request):
    argv: list[str] | None = Field(default=None, min_length=1, max_length=4096)
    shell: str | None = Field(default=None, min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    stdin: str | None = None
    stdin_b64: str | None = None
    timeout_s: float = Field(default=DEFAULT_EXEC_TIMEOUT_S, gt=0, le=MAX_EXEC_TIMEOUT_S)
    output_subject: str | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _one_command(self) -> ExecRequest:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("give exactly one of argv (a list) or shell (a string)")
        if self.stdin is not None and self.stdin_b64 is not None:
            raise ValueError("give at most one of stdin or stdin_b64")
        if self.stdin_b64 is not None:
            _decode_b64(self.stdin_b64, "stdin_b64")
        return self

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any("\x00" in a for a in v):
            raise ValueError("argv items must not contain NUL bytes")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"invalid environment variable name {key[:64]!r}")
            if "\x00" in value:
                raise ValueError(f"environment variable {key} contains a NUL byte")
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str | None) -> str | None:
        return None if v is None else _check_path(v)

    @field_validator("output_subject")
    @classmethod
    def _subject(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _reply_subject(v, info, "output_subject")

    def stdin_bytes(self) -> bytes | None:
        if self.stdin_b64 is not None:
            return base64.b64decode(self.stdin_b64)
        if self.stdin is not None:
            return self.stdin.encode()
        return None


def _check_object(v: str) -> str:
    if not _OBJECT_RE.fullmatch(v):
        raise ValueError("object must be 1-255 characters of A-Z a-z 0-9 _ . = / -")
    return v


RemotePath = Annotated[str, AfterValidator(_check_path)]
ObjectName = Annotated[str, AfterValidator(_check_object)]


def _parse_mode(v: Any) -> int | None:
    """A string of 1-4 octal digits, or an integer 0-0o7777 (the mode's value).

    Strict on purpose: ``int(v, 8)`` alone also takes "-0", "0o777", " 0644" and "+644",
    which another system's bug (or a hostile caller) should not turn into a mode.
    """
    if v is None:
        return None
    if isinstance(v, str):
        if not _MODE_RE.fullmatch(v):
            raise ValueError("mode must be an octal string of 1-4 digits 0-7, like '0644'")
        return int(v, 8)
    # bool is an int to Python, never a mode. pydantic turns ValueError (not TypeError)
    # into a validation error.
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError("mode must be an octal string like '0644' or an integer")  # noqa: TRY004
    if not 0 <= v <= 0o7777:
        raise ValueError("mode must be between 0 and 07777")
    return v


def _check_subject(v: str, info: ValidationInfo) -> str:
    return _reply_subject(v, info, "subject")


Subject = Annotated[str, Field(max_length=255), AfterValidator(_check_subject)]


class PutStream(BaseModel):
    """Content streamed by the requester (docs/bus-api.md, "Streamed transfers")."""

    model_config = ConfigDict(extra="forbid")
    subject: Subject
    size: int | None = Field(default=None, ge=0)
    idle_s: float = Field(default=DEFAULT_STREAM_IDLE_S, ge=1, le=MAX_STREAM_IDLE_S)


class GetStream(BaseModel):
    """Where to stream a file to, and how much the requester takes before granting more."""

    model_config = ConfigDict(extra="forbid")
    subject: Subject
    window: int = Field(default=DEFAULT_STREAM_WINDOW, ge=MIN_STREAM_WINDOW, le=MAX_STREAM_WINDOW)
    idle_s: float = Field(default=DEFAULT_STREAM_IDLE_S, ge=1, le=MAX_STREAM_IDLE_S)


class PutRequest(Request):
    path: RemotePath
    mode: int | None = None
    content_b64: str | None = None
    object: ObjectName | None = None
    stream: PutStream | None = None
    make_parents: bool = True
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    _content: bytes | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> int | None:
        return _parse_mode(v)

    @model_validator(mode="after")
    def _one_source(self) -> PutRequest:
        if sum(v is not None for v in (self.content_b64, self.object, self.stream)) != 1:
            raise ValueError("give exactly one of content_b64 (inline), object (object store) "
                             "or stream (streamed)")
        if self.content_b64 is not None:
            self._content = _decode_b64(self.content_b64, "content_b64")
        return self

    def content(self) -> bytes | None:
        return self._content


class GetRequest(Request):
    path: RemotePath
    object: ObjectName | None = None
    stream: GetStream | None = None
    max_inline: int = Field(default=MAX_INLINE_BYTES, ge=0, le=MAX_INLINE_BYTES)

    @model_validator(mode="after")
    def _one_destination(self) -> GetRequest:
        if self.object is not None and self.stream is not None:
            raise ValueError("give at most one of object (object store) or stream (streamed)")
        return self


class InfoRequest(Request):
    pass


class PingRequest(Request):
    pass


REQUEST_MODELS: dict[str, type[Request]] = {
    "exec": ExecRequest,
    "put": PutRequest,
    "get": GetRequest,
    "info": InfoRequest,
    "ping": PingRequest,
}


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not COMMAND_ID_RE.fullmatch(v):
            raise ValueError("id must be 1-64 letters, digits, '-' or '_'")
        return v


def too_large_body(size: int) -> TooLarge:
    """The error for a request body of ``size`` bytes, over :data:`MAX_REQUEST_BYTES`."""
    return TooLarge(f"request body is {size} bytes; the limit is {MAX_REQUEST_BYTES}: "
                    "send large files through the object store")


def parse_json_object(data: bytes) -> dict[str, Any]:
    """Decode a request body: an empty body is ``{}``; anything but an object is refused,
    and so is nesting deeper than :data:`MAX_JSON_DEPTH`."""
    if len(data) > MAX_REQUEST_BYTES:
        raise too_large_body(len(data))
    try:
        body = json.loads(data) if data.strip() else {}
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("request body is not valid JSON") from None
    except RecursionError:
        # json's C scanner gives up near the interpreter's recursion limit (~1,000 deep).
        raise InvalidRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    # Counting brackets is a quick pass in C; only a body with many pays for the walk.
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    # A lone surrogate comes from a \uD800-\uDFFF escape or from its raw bytes (ED A0-BF ..),
    # which json.loads lets through (it decodes with 'surrogatepass'); such a string cannot
    # be stored or sent on as UTF-8. The byte tests are quick passes in C; the walk is rare.
    if (b"\\ud" in data or b"\\uD" in data or b"\xed" in data) and _has_lone_surrogate(body):
        raise InvalidRequest("request body holds a lone surrogate, which is not text")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    """True when a key or string anywhere in ``value`` is not encodable as UTF-8."""
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (walked without recursion)."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        todo.extend((child, level + 1) for child in children)
    return deepest


def parse_request(op: str, data: bytes, replies: ReplySubjects = _DEFAULT_REPLIES) -> tuple[dict[str, Any], Request]:
    """Decode and validate one server command: its JSON body and its model.

    ``replies`` is the deployment's reply namespace, which ``output_subject`` and
    ``stream.subject`` must lie in. Raises :class:`InvalidRequest` (or ``TooLarge``).
    """
    body = parse_json_object(data)
    try:
        return body, REQUEST_MODELS[op].model_validate(body, context=reply_context(replies))
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first few bad fields, for an ``invalid_request`` reply."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        msg = "unknown field" if err.get("type") == "extra_forbidden" else str(err.get("msg", "invalid"))
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
