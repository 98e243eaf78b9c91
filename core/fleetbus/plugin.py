"""Everything a transport plugin author uses, in one import.

::

    from fleetbus.plugin import Capabilities, Session, Transport, hookimpl

A plugin that imports only from here (and, in its tests, from :mod:`fleetbus.testing`)
keeps working across fleetbus releases: these names are the public plugin surface, and
``tests/test_plugin_surface.py`` pins the list, so a change to it is a deliberate one.
The rest of ``fleetbus`` is the product's inside and may change without notice.

- The interface to implement: :class:`Transport` (declares ``Settings``, ``Options``,
  ``capabilities``), :class:`Session`, and the data they take and return.
- What the host gives a transport: :class:`TransportContext`, :class:`Credential`, and
  ``ctx.services``, the core's domain operations (:class:`Services`, with the records its
  gateway methods take and yield: :class:`GatewayIdentity`, :class:`GatewayRecord`,
  :class:`LinkClaim`).
- The errors to raise, each one bus error code (docs/bus-api.md), and the one mapping of
  OS errors onto them (:func:`mapped_errors` with :data:`REACHING` while connecting,
  :data:`RUNNING` once a command runs), as httpx's ``map_exceptions`` does.
- The hooks: :data:`hookimpl` (and :func:`require_installed` for a transport that
  imports its client library at first use) on ``fleetbus_transports`` and ``fleetbus_cli``, with the
  CLI's :class:`CliRegistry` and :class:`ServerDraft` (fleetbus.hookspecs has the specs),
  and :func:`fail`, the CLI's one-line error and exit, for a plugin's own commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cli.extend import CliRegistry, ServerDraft, Undo
from .errors import (
    REACHING,
    RUNNING,
    AuthFailed,
    Busy,
    Cancelled,
    FleetbusError,
    InternalError,
    InvalidRequest,
    NotFound,
    ServerOffline,
    Timeout,
    TooLarge,
    TransportError,
    error_for_code,
    mapped_errors,
)
from .hookspecs import hookimpl, require_installed
from .records import Server
from .services import GatewayIdentity, GatewayRecord, LinkClaim, Services
from .transport import (
    Capabilities,
    Credential,
    ExecResult,
    ExecSpec,
    FileStat,
    OutputSink,
    PutSpec,
    RemoteFile,
    ServerFacts,
    ServerOptions,
    Session,
    StreamName,
    Transport,
    TransportContext,
    TransportSettings,
)

if TYPE_CHECKING:
    from .cli.context import fail


def __getattr__(name: str) -> Any:
    # The CLI's context pulls in the NATS client: loaded only by a plugin that fails a
    # command, so a worker importing this module pays nothing for it.
    if name == "fail":
        from .cli.context import fail

        return fail
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REACHING",
    "RUNNING",
    "AuthFailed",
    "Busy",
    "Cancelled",
    "Capabilities",
    "CliRegistry",
    "Credential",
    "ExecResult",
    "ExecSpec",
    "FileStat",
    "FleetbusError",
    "GatewayIdentity",
    "GatewayRecord",
    "InternalError",
    "InvalidRequest",
    "LinkClaim",
    "NotFound",
    "OutputSink",
    "PutSpec",
    "RemoteFile",
    "Server",
    "ServerDraft",
    "ServerFacts",
    "ServerOffline",
    "ServerOptions",
    "Services",
    "Session",
    "StreamName",
    "Timeout",
    "TooLarge",
    "Transport",
    "TransportContext",
    "TransportError",
    "TransportSettings",
    "Undo",
    "error_for_code",
    "fail",
    "hookimpl",
    "mapped_errors",
    "require_installed",
]
