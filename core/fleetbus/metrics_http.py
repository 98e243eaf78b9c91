"""The /metrics endpoint: one thread running its own small asyncio HTTP server.

prometheus-client's ``start_http_server`` starts a thread per connection and waits for
the request without a time limit, so every silent connection holds a thread for good
(a test held 726). Here one thread serves every connection: a connection must send its
request within ``idle_timeout_s`` and take its answer within ``write_timeout_s``, and
at most ``max_connections`` are held; past that, the one that has waited longest for
its request is dropped to make room, so a crowd of silent connections cannot keep a
real scrape (which sends its request at once) out. The thread has its own event loop,
so building an exposition never holds up the process's main loop, which serves
commands. One request per connection (``Connection: close``), like prometheus-client's.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import InvalidRequest

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("fleetbus.metrics")


@dataclass(frozen=True)
class MetricsHttpSettings:
    #: A connection that has not sent its whole request by then is closed.
    idle_timeout_s: float = 5.0
    #: A scraper that has not taken the whole answer by then is closed.
    write_timeout_s: float = 10.0
    #: Connections held at once; beyond, the longest-silent one is dropped.
    max_connections: int = 64
    #: The request line and headers; a longer head is refused.
    max_head_bytes: int = 8192

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0 or self.write_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


@dataclass
class MetricsServer:
    """A running /metrics endpoint; :meth:`stop` ends it (from any thread)."""

    host: str
    port: int
    _server: _HttpServer = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def connections(self) -> int:
        """Connections held right now."""
        return len(self._server.conns)

    def stop(self) -> None:
        self._server.stop()


def parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidRequest(f"--metrics-addr must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_metrics(metrics: Metrics, addr: str, settings: MetricsHttpSettings | None = None) -> MetricsServer:
    """Serve /metrics on ``addr`` (port 0: any free port) from a daemon thread."""
    host, port = parse_addr(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InvalidRequest(f"metrics port {port} on {host} is taken: pass --metrics-addr "
                                 "with another port (0 for any)") from None
        raise InvalidRequest(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    server = _HttpServer(metrics.registry, sock, settings or MetricsHttpSettings())
    server.start()
    return MetricsServer(host=host, port=sock.getsockname()[1], _server=server)


class _HttpServer:
    def __init__(self, registry: CollectorRegistry, sock: socket.socket, settings: MetricsHttpSettings) -> None:
        self.registry = registry
        self.sock = sock
        self.settings = settings
        # writer -> whether its request has arrived; insertion order is arrival order.
        self.conns: dict[asyncio.StreamWriter, bool] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fleetbus-metrics", daemon=True)
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stopped is not None:
            self.loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
        self.sock.close()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._serve, sock=self.sock,
                                            limit=self.settings.max_head_bytes)
        self._started.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            for writer in list(self.conns):
                writer.close()
            await server.wait_closed()

    def _make_room(self) -> bool:
        """Drop the longest-silent connection if too many are held; False if none can go."""
        if len(self.conns) <= self.settings.max_connections:
            return True
        for writer, answered in self.conns.items():
            if not answered:
                del self.conns[writer]
                writer.transport.abort()
                return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns[writer] = False
        try:
            if not self._make_room():
                return  # every held connection is being answered: refuse this one
            try:
                async with asyncio.timeout(self.settings.idle_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            if writer not in self.conns:
                return  # dropped to make room as the request arrived
            self.conns[writer] = True
            try:
                status, headers, body = self._answer(head)
            except Exception:
                log.exception("building the metrics exposition failed")
                status, headers, body = "500 Internal Server Error", [], b"see the fleetbus log\n"
            writer.write(_response(status, headers, body))
            try:
                async with asyncio.timeout(self.settings.write_timeout_s):
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                return
        finally:
            self.conns.pop(writer, None)
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", [], b"bad request\n"
        method, target, _ = parts
        if method != "GET":
            return "405 Method Not Allowed", [("Allow", "GET")], b"method not allowed\n"
        path, _, query = target.partition("?")
        if path not in ("/metrics", "/"):
            return "404 Not Found", [], b"not found: the metrics are at /metrics\n"
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        registry = self.registry
        names = parse_qs(query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)  # type: ignore[assignment]
        encoder, content_type = choose_encoder(fields.get("accept", ""))
        body = encoder(registry)
        headers = [("Content-Type", content_type)]
        if "gzip" in fields.get("accept-encoding", ""):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return "200 OK", headers, body


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
