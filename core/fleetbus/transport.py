"""The transport interface: everything a transport plugin author implements.

A transport knows how to talk to one kind of server (this host, sshd, WinRM, a fleetbus
agent) and nothing about NATS. The plugin host (``fleetbus.host``) subscribes to the bus
subjects, validates requests, enforces timeouts, cancellation and concurrency limits,
writes the audit trail and replies; it calls a transport only through the methods below.

The shape is: a :class:`Transport` is created once per process and opens one
:class:`Session` per server, which the host keeps and reuses across commands (so an SSH
connection or an agent link is shared by concurrent commands) and closes when idle or
after it reports itself dead.

Cancellation: when a command times out or is cancelled, the host cancels the coroutine
running :meth:`Session.exec` (or ``put``/``get``). The transport must then stop the
remote work (kill the process group, close the channel) before letting
``asyncio.CancelledError`` propagate.

Blocking client libraries (paramiko, pywinrm) must run through
:meth:`TransportContext.run_blocking`, never on the event loop.

Declarations: a transport says what it accepts and what it is, on the class, so the
core never needs to know it by name:

- :attr:`Transport.Settings`: a pydantic model of its per-worker settings
  (``--transport-setting NAME.KEY=VALUE``), validated once by the host at start; a bad
  value stops the worker with one line naming the setting.
- :attr:`Transport.Options`: a pydantic model of its per-server options
  (``server.options``), validated by the admin service at ``servers add``; a typo is
  ``invalid_request`` naming the option, at registration, not at first use.
- :attr:`Transport.capabilities`: a :class:`Capabilities` (needs a host, default port,
  issues agent keys, ...) the admin service and the CLI read instead of the name.

Both models forbid unknown keys by default, so a misspelt key is caught. Its own CLI
flags and commands a transport adds through the ``fleetbus_cli`` hook
(:mod:`fleetbus.hookspecs`).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from fleetbus_base.ops.specs import ExecResult, ExecSpec, FileStat, PutSpec, RemoteFile, ServerFacts
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InvalidRequest
from .records import Server
from .services import Services

T = TypeVar("T")

StreamName = Literal["stdout", "stderr"]


class OutputSink(Protocol):
    """Where a transport sends process output as it arrives.

    ``write`` may wait when the consumer is slow (back-pressure); transports should
    read the next chunk only after it returns.
    """

    async def write(self, stream: StreamName, data: bytes) -> None: ...


@dataclass(frozen=True)
class Credential:
    """A decrypted credential, handed to :meth:`Transport.open` and nowhere else."""

    name: str
    type: str
    user: str | None
    secret: bytes = field(repr=False)
    passphrase: bytes | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return f"Credential(name={self.name!r}, type={self.type!r}, user={self.user!r})"


class TransportSettings(BaseModel):
    """Base of a transport's per-worker settings: subclass it and add typed fields with
    defaults. Unknown keys are refused, so ``--transport-setting NAME.keepalive=5`` (for
    ``keepalive_s``) stops the worker instead of being ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerOptions(BaseModel):
    """Base of a transport's per-server options (``server.options``): subclass it and add
    typed fields with defaults. Unknown keys are refused at ``servers add``. The registry
    keeps the options as they were given (the transport reads ``server.options``); the
    model is the check, and :meth:`Transport.options_of` the typed view.
    """

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Capabilities:
    """What a transport is, declared, for the admin service and the CLI.

    - ``needs_host``: a server must be registered with ``host`` (refused otherwise).
    - ``default_port``: the port used when a server gives none (shown in messages).
    - ``issues_agent_key``: the admin service issues a secret key at ``servers add``,
      keeps only its hash, and answers ``rotate-key``/``revoke-key`` for the server.
    - ``supports_via``: a server may be reached through another registered server of
      the same transport (``options.via``, a jump host).
    """

    needs_host: bool = False
    default_port: int | None = None
    issues_agent_key: bool = False
    supports_via: bool = False


def _first_error(exc: ValidationError) -> tuple[str, str]:
    """The dotted field name and message of a validation error's first problem."""
    err = exc.errors()[0]
    # The field's own name: deeper parts of a location name union members ("float").
    loc = err.get("loc", ())
    where = str(loc[0]) if loc else "(together)"
    if err.get("type") == "extra_forbidden":
        return where, "unknown"
    return where, str(err.get("msg", "invalid")).removeprefix("Value error, ")


class TransportContext(Protocol):
    """What the plugin host gives a transport."""

    transport_name: str
    logger: logging.Logger
    #: This transport's settings: validated (an instance of its ``Settings``) when the
    #: host made the context; a plain mapping from a test's fake context is validated
    #: by :class:`Transport` on construction.
    settings: TransportSettings | Mapping[str, Any]
    #: The core's domain operations (status, auth-failure counts, agent keys, gateway
    #: records, ...): :class:`fleetbus.services.Services`. Most transports need none of it.
    services: Services

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the host's bounded thread pool."""
        ...

    async def serve(self, server: Server, status: Mapping[str, Any] | None = None) -> None:
        """Start answering the bus subjects of ``server`` (dynamic transports only) and
        record it online. ``status`` adds fields to that status record (what the
        transport knows of the connection, e.g. ``agent_version`` and
        ``remote_address``), written with it in one write; given for a server already
        served, the record is written again with them."""
        ...

    async def unserve(self, name: str) -> None:
        """Stop answering the bus subjects of the server ``name``."""
        ...

    async def lookup_server(self, name: str) -> Server | None:
        """The registry record of ``name``, or None."""
        ...

    async def credential(self, name: str) -> Credential:
        """The decrypted credential ``name`` (e.g. a jump host's), or NotFound."""
        ...


class Session(abc.ABC):
    """An open line to one server, shared by concurrent commands."""

    @abc.abstractmethod
    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        """Run a process, send its output to ``output`` as it arrives, return how it ended."""

    @abc.abstractmethod
    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        """Write the bytes from ``source`` to ``spec.path`` atomically."""

    @abc.abstractmethod
    async def get(self, path: str) -> RemoteFile:
        """Open ``path`` for reading; raise :class:`fleetbus.errors.NotFound` if absent."""

    @abc.abstractmethod
    async def info(self) -> ServerFacts:
        """Facts about the server."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """The cheapest round trip that proves the server itself answers."""

    async def close(self) -> None:
        """Release the connection. Called when idle, on shutdown, or after a failure."""

    @property
    def alive(self) -> bool:
        """False once the session knows its connection is gone; the host reopens it."""
        return True


class Transport(abc.ABC):
    """A kind of connection to servers. One instance per process.

    Class attributes describe it to ``fleetbus plugins list`` and to the host:

    - ``name``: the value of ``Server.transport`` this transport serves.
    - ``serves_registered``: when True (the default) the host answers the subjects of
      every registered server with this transport and :meth:`accepts` returns True,
      sharing the work with other processes through a NATS queue group. When False the
      transport calls ``ctx.serve``/``ctx.unserve`` itself (an agent gateway serves a
      server only while that server's agent is connected to it).
    - ``idle_timeout_s``: how long an unused session stays open.
    - ``Settings``, ``Options``, ``capabilities``: the declarations described in the
      module docstring. The defaults accept no setting and no option.

    ``self.settings`` is the validated ``Settings`` instance.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0"
    description: ClassVar[str] = ""
    serves_registered: ClassVar[bool] = True
    idle_timeout_s: ClassVar[float] = 300.0
    Settings: ClassVar[type[TransportSettings]] = TransportSettings
    Options: ClassVar[type[ServerOptions]] = ServerOptions
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self.settings: Any = self.load_settings(ctx.settings)

    @classmethod
    def load_settings(cls, raw: TransportSettings | Mapping[str, Any] | None) -> TransportSettings:
        """``raw`` validated as this transport's ``Settings`` (an instance passes through).

        Raises :class:`fleetbus.errors.InvalidRequest` with one line naming the setting.
        """
        if isinstance(raw, cls.Settings):
            return raw
        try:
            return cls.Settings.model_validate(dict(raw or {}))
        except ValidationError as exc:
            where, why = _first_error(exc)
            known = ", ".join(sorted(cls.Settings.model_fields)) or "none"
            hint = f" (known: {known})" if why == "unknown" else ""
            raise InvalidRequest(f"{cls.name} transport setting {where!r}: {why}{hint}") from None

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> ServerOptions:
        """``options`` validated as this transport's ``Options``; the admin service calls
        it at ``servers add``. Raises InvalidRequest naming the option."""
        try:
            return cls.Options.model_validate(dict(options))
        except ValidationError as exc:
            where, why = _first_error(exc)
            known = ", ".join(sorted(cls.Options.model_fields)) or "none"
            hint = f" (known: {known})" if why == "unknown" else ""
            raise InvalidRequest(f"{cls.name} server option {where!r}: {why}{hint}") from None

    @classmethod
    def options_of(cls, server: Server) -> Any:
        """The typed options of ``server`` (registered before they were checked, they may
        still fail: InvalidRequest naming the option)."""
        return cls.check_options(server.options)

    async def start(self) -> None:
        """Called once when the host starts (open listeners, thread pools)."""

    async def stop(self) -> None:
        """Called once when the host stops."""

    def describe(self) -> list[tuple[str, str]]:
        """Lines for ``fleetbus up``'s start-up summary, as (label, text): where a
        listener is, who commands run as. None by default."""
        return []

    def accepts(self, server: Server) -> bool:
        """Whether this process should serve ``server`` (e.g. only its own host)."""
        return True

    @abc.abstractmethod
    async def open(self, server: Server, credential: Credential | None) -> Session:
        """Open a session to ``server``. Raise ServerOffline/AuthFailed on failure."""


TransportFactory = Callable[[TransportContext], Transport]
AsyncChunkSource = Callable[[], Awaitable[bytes]]
