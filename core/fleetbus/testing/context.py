"""A stand-in for the ``TransportContext`` the plugin host hands a transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from ..errors import NotFound
from ..metrics import Metrics
from ..records import Server
from ..transport import Credential

T = TypeVar("T")


@dataclass
class StatusReport:
    """One ``services.report_status`` call, as a transport made it."""

    name: str
    state: str
    transport_version: str | None
    details: dict[str, Any]


@dataclass
class FakeServices:
    """The few core services a built-in transport touches, recorded instead of published.

    The part of :class:`fleetbus.services.Services` a transport that reaches servers by
    itself uses: ``count_auth_failure`` and ``count_agent_connect`` count in ``metrics``,
    a real :class:`fleetbus.metrics.Metrics`; ``report_status`` appends to ``statuses``. A transport that needs more of
    the core (the registry, agent keys, the gateway buckets) is tested end to end
    through a real ``fleetbus up`` instead.
    """

    metrics: Metrics = field(default_factory=Metrics)
    statuses: list[StatusReport] = field(default_factory=list)

    async def report_status(self, name: str, state: str, transport_version: str | None = None,
                            **details: Any) -> None:
        self.statuses.append(StatusReport(name, state, transport_version, details))

    def count_auth_failure(self, transport: str, reason: str) -> None:
        self.metrics.auth_failures.labels(transport, reason).inc()

    def count_agent_connect(self, transport: str) -> None:
        self.metrics.agent_connects.labels(transport).inc()


class FakeContext:
    """A ``TransportContext`` for driving a transport directly, with no bus.

    ``run_blocking`` runs calls in a real thread pool of ``max_threads`` threads (the
    host's is bounded too, so a transport that starves it shows up here). ``servers``
    and ``credentials`` answer ``lookup_server`` and ``credential``; ``serve`` and
    ``unserve`` are recorded in ``served`` (name -> record) and ``events`` (in order), and
    ``serve``'s ``status`` fields in ``serve_status``.
    Call :meth:`aclose` (or use ``async with``) to shut the pool down.
    """

    def __init__(self, transport_name: str = "test", settings: dict[str, Any] | None = None, *,
                 servers: dict[str, Server] | None = None,
                 credentials: dict[str, Credential] | None = None,
                 services: Any = None, max_threads: int = 32) -> None:
        self.transport_name = transport_name
        self.logger = logging.getLogger(f"fleetbus.testing.{transport_name}")
        self.settings: dict[str, Any] = dict(settings or {})
        self.services: Any = FakeServices() if services is None else services
        self.servers: dict[str, Server] = dict(servers or {})
        self.credentials: dict[str, Credential] = dict(credentials or {})
        self.served: dict[str, Server] = {}
        self.serve_status: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str]] = []
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix=f"fake-ctx-{transport_name}")

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the context's bounded thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def serve(self, server: Server, status: Mapping[str, Any] | None = None) -> None:
        """Record that the transport asked to serve ``server`` (and its ``status`` fields, in ``serve_status``)."""
        self.served[server.name] = server
        self.serve_status[server.name] = dict(status or {})
        self.events.append(("serve", server.name))

    async def unserve(self, name: str) -> None:
        """Record that the transport stopped serving ``name``."""
        self.served.pop(name, None)
        self.events.append(("unserve", name))

    async def lookup_server(self, name: str) -> Server | None:
        """The record of ``name`` from ``servers``, or None."""
        return self.servers.get(name)

    async def credential(self, name: str) -> Credential:
        """The credential ``name`` from ``credentials``; NotFound as the host raises it."""
        try:
            return self.credentials[name]
        except KeyError:
            raise NotFound(f"no credential {name}") from None

    async def aclose(self) -> None:
        """Stop the thread pool (without waiting for calls that never return)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
