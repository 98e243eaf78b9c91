"""Bodies of the job service's requests (``jobs.start``, ``get``, ``rerun``, ``list``),
validated at the boundary; docs/bus-api.md, "Jobs", documents each field.
"""

from __future__ import annotations

import base64
import json
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

from .jobplan import Amount, PlanOptions
from .limits import DEFAULT_EXEC_TIMEOUT_S, MAX_EXEC_TIMEOUT_S
from .messages import ExecRequest, GetRequest, ObjectName, PutRequest, RemotePath, describe_validation_error
from .selection import Selection

DEFAULT_MAX_CONCURRENCY = 10
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
JOB_ID_RE = r"^[0-9a-f]{16}$"
#: ``client_notes``, as JSON: room for a path or two, not a place to keep data.
MAX_CLIENT_NOTES_BYTES = 4096
#: What a job's records keep instead of an environment value (it may be a secret).
REDACTED = "(not kept)"

CountOrPercent = int | str


def _notes(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value)) > MAX_CLIENT_NOTES_BYTES:
        raise ValueError(f"client_notes may take at most {MAX_CLIENT_NOTES_BYTES} bytes of JSON")
    return value


#: What the requester wants to remember about a job (``fleetbus get``: its destination
#: folder): fleetbus keeps it in the definition and copies it into a rerun, never reads
#: it. A flat object of short names and plain values.
ClientNotes = Annotated[dict[Annotated[str, Field(min_length=1, max_length=64)], str | int | float | bool | None]
                        | None, AfterValidator(_notes)]


class JobExec(BaseModel):
    """An ``exec`` for every target: the fields of a server ``exec`` except ``id`` (the
    job derives one per server) and ``timeout_s`` (the job's). Every server's command
    publishes its live output on the one ``output_subject``, each chunk tagged with its
    command id."""

    model_config = ConfigDict(extra="forbid")
    argv: list[str] | None = None
    shell: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    stdin: str | None = None
    stdin_b64: str | None = None
    output_subject: str | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _as_exec(self, info: ValidationInfo) -> JobExec:
        # The one set of exec rules, reply namespace included: a job's command is
        # checked as a server's would be.
        try:
            ExecRequest.model_validate(self.model_dump(exclude_none=True), context=info.context)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        return self


def job_object(job: str, server: str) -> str:
    """The object a ``get`` job's ``server`` stores its file as."""
    return f"job/{job}/{server}"


class JobPut(BaseModel):
    """A ``put`` for every target, of one object the requester stored once in the file
    bucket: each server's command is an ordinary ``put`` with ``object`` and
    ``sha256``, so the worker checks the digest before it renames the file into place.
    ``size`` is what the requester stored, kept for the records (the worker checks the
    object's own)."""

    model_config = ConfigDict(extra="forbid")
    path: RemotePath
    mode: str | int | None = None
    make_parents: bool = True
    object: ObjectName
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @model_validator(mode="after")
    def _as_put(self) -> JobPut:
        # The one set of put rules (path, mode): checked as a server's put would be.
        try:
            PutRequest.model_validate(self.server_body())
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        return self

    def server_body(self) -> dict[str, Any]:
        return self.model_dump(exclude={"size"}, exclude_none=True)


class JobGet(BaseModel):
    """A ``get`` of one path on every target. Each server's command stores the file as
    the object ``job/<job>/<server>`` (:func:`job_object`); its
    result's ``data`` names it, with its size and sha256, for the requester to fetch
    and delete."""

    model_config = ConfigDict(extra="forbid")
    path: RemotePath

    @model_validator(mode="after")
    def _as_get(self) -> JobGet:
        try:
            GetRequest.model_validate(self.model_dump())
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        return self


class JobRequest(BaseModel):
    """The body of ``jobs.start``."""

    model_config = ConfigDict(extra="forbid")
    selection: Selection
    op: Literal["exec", "ping", "info", "put", "get"] = "exec"
    exec: JobExec | None = None
    put: JobPut | None = None
    get: JobGet | None = None
    timeout_s: float = Field(default=DEFAULT_EXEC_TIMEOUT_S, gt=0, le=MAX_EXEC_TIMEOUT_S,
                             description="Per server: its command is stopped after this.")
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_EXEC_TIMEOUT_S,
                                     description="For the whole job: then nothing new starts and running commands are cancelled.")
    wait_online_s: float | None = Field(
        default=None, gt=0, le=MAX_EXEC_TIMEOUT_S,
        description="An offline server waits this long to come online before it is a server_offline error.")
    max_concurrency: CountOrPercent = DEFAULT_MAX_CONCURRENCY
    max_errors: CountOrPercent | None = None
    batch: CountOrPercent | None = None
    canary: int = Field(default=0, ge=0, le=100_000)
    dry_run: bool = False
    client_notes: ClientNotes = None

    @field_validator("max_concurrency")
    @classmethod
    def _concurrency(cls, v: CountOrPercent) -> CountOrPercent:
        Amount.parse(v, "max_concurrency", 1)
        return v

    @field_validator("max_errors")
    @classmethod
    def _errors(cls, v: CountOrPercent | None) -> CountOrPercent | None:
        if v is not None:
            Amount.parse(v, "max_errors", 0)
        return v

    @field_validator("batch")
    @classmethod
    def _batch(cls, v: CountOrPercent | None) -> CountOrPercent | None:
        if v is not None:
            Amount.parse(v, "batch", 1)
        return v

    @model_validator(mode="after")
    def _operation(self) -> JobRequest:
        if (self.op == "exec") != (self.exec is not None):
            raise ValueError("give exec (the command) exactly when op is exec")
        if (self.op == "put") != (self.put is not None):
            raise ValueError("give put (path, object, sha256, size) exactly when op is put")
        if (self.op == "get") != (self.get is not None):
            raise ValueError("give get (path) exactly when op is get")
        return self

    def plan_options(self) -> PlanOptions:
        def opt(v: CountOrPercent | None, what: str, minimum: int) -> Amount | None:
            return None if v is None else Amount.parse(v, what, minimum)

        return PlanOptions(max_concurrency=Amount.parse(self.max_concurrency, "max_concurrency", 1),
                           max_errors=opt(self.max_errors, "max_errors", 0),
                           batch=opt(self.batch, "batch", 1), canary=self.canary)

    def kept(self) -> dict[str, Any]:
        """The request as the job's records keep it (30 days, readable by whoever may read
        jobs): environment values and standard input may be secrets, so only the
        variables' names and the input's length are kept."""
        out = self.model_dump(mode="json", exclude={"dry_run"})
        command = out.get("exec")
        if command is not None:
            command["env"] = dict.fromkeys(command.get("env") or {}, REDACTED)
            stdin = self.exec.stdin.encode() if self.exec and self.exec.stdin is not None else None
            if self.exec and self.exec.stdin_b64 is not None:
                stdin = base64.b64decode(self.exec.stdin_b64)
            command.pop("stdin", None)
            command.pop("stdin_b64", None)
            if stdin is not None:
                command["stdin_bytes"] = len(stdin)
        return out

    def server_body(self) -> dict[str, Any]:
        """The per-server request body (the job adds the command id)."""
        if self.put is not None:
            return self.put.server_body()
        if self.get is not None:
            return self.get.model_dump()  # the job adds each server's object
        if self.exec is None:
            return {}
        return {**self.exec.model_dump(exclude_none=True), "timeout_s": self.timeout_s}


class JobId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=JOB_ID_RE)


class JobRerun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=JOB_ID_RE)
    failed: bool = False
    dry_run: bool = False
    client_notes: ClientNotes = Field(default=None, description="Replace the job's client_notes.")
    put_object: ObjectName | None = Field(
        default=None, description="A put job: its content stored again under this name (same sha256).")


class JobList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT)
    before: str | None = Field(default=None, pattern=JOB_ID_RE,
                               description="Only jobs started before this one: the next page.")
