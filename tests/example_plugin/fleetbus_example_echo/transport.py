"""The ``echo`` transport: every server is an in-memory fake machine.

It is small on purpose, to show the shape of a transport without a real network
library in the way. What its fake machines do:

``exec``
    ``argv`` (or ``shell``, split like a POSIX shell would) names a program and its
    arguments. There are four programs; any other name behaves like ``echo``:

    - ``<anything> WORDS...``: writes the words and a newline to stdout
      (``["say", "hi"]`` writes ``hi\\n``) and exits with the configured exit code;
    - ``warn WORDS...``: the same on stderr;
    - ``cat``: copies stdin to stdout;
    - ``exit N``: exits with ``N`` and writes nothing;
    - ``sleep SECONDS``: waits, so timeouts and cancel have something to stop.

    ``env`` is ignored; ``cwd``, when given, must be a folder on the fake machine.
``put`` / ``get``
    Files live in a dict per server (absolute paths, folders created as needed), kept
    by the transport so they outlive sessions. They vanish when the worker stops and
    are not shared between workers: this is a fake.
``info`` / ``ping``
    Trivial; ``info`` reports counters a test can use (``execs``, ``running``,
    ``killed``, ``files``).

Server fields: ``host`` (reported as the hostname), ``credential`` (optional; a
``password`` or ``token``, whose user ``info`` reports), and the options of
:class:`EchoOptions`: ``exit_code`` (the exit code of echoing programs; ``servers add
--exit-code N``, a flag the plugin adds in ``cli.py``), ``offline`` (true: opening a
session fails with ``server_offline``).

Settings (:class:`EchoSettings`; ``fleetbus up --transport-setting echo.KEY=VALUE``):
``exit_code`` (default for the option, 0), ``max_file_bytes`` (16 MiB: larger puts are
``too_large``), ``os_name`` (what ``info`` reports as the OS; ``fleetbus up --echo-os
NAME``), ``idle_timeout_s`` (300).

Both are pydantic models declared on the transport class: fleetbus checks the settings
when the worker starts and the options when a server is registered, and refuses keys
the models do not declare.
"""

from __future__ import annotations

import asyncio
import posixpath
import shlex
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fleetbus.plugin import (
    AuthFailed,
    Capabilities,
    Credential,
    ExecResult,
    ExecSpec,
    FileStat,
    InvalidRequest,
    NotFound,
    OutputSink,
    PutSpec,
    RemoteFile,
    Server,
    ServerFacts,
    ServerOffline,
    ServerOptions,
    Session,
    TooLarge,
    Transport,
    TransportContext,
    TransportSettings,
)
from pydantic import Field, StrictInt

from . import __version__

CHUNK_BYTES = 64 * 1024
DEFAULT_MODE = 0o644
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass
class FakeFile:
    data: bytes
    mode: int


@dataclass
class FakeMachine:
    """The state of one fake server. A real transport has the real machine instead."""

    files: dict[str, FakeFile] = field(default_factory=dict)
    folders: set[str] = field(default_factory=lambda: {"/"})
    execs: int = 0  # processes started
    running: int = 0  # processes running now
    killed: int = 0  # processes stopped by a timeout or cancel
    booted: float = field(default_factory=time.monotonic)


def _int(value: Any, what: str) -> int:
    """An integer setting or option, or InvalidRequest naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidRequest(f"{what} must be an integer, not {value!r}")
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{what} must be an integer, not {value!r}") from None


class EchoSession(Session):
    """An open line to one fake server.

    The host shares one session between all the commands running on that server at
    once (up to its ``max_concurrency``), so nothing here may assume one command at a
    time. Everything below runs on the event loop and never blocks it: a transport
    built on a blocking library would wrap each call in ``ctx.run_blocking``.
    """

    def __init__(self, transport: EchoTransport, server: Server, machine: FakeMachine,
                 user: str | None, exit_code: int) -> None:
        self.transport = transport
        self.server = server
        self.machine = machine
        self.user = user
        self.exit_code = exit_code
        self.closed = False

    # exec -------------------------------------------------------------------------------
    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        """Run one fake program, streaming its output to ``output`` as it is produced.

        The host enforces ``spec.timeout_s`` and cancel requests by cancelling this
        coroutine: stop the remote work, then let ``CancelledError`` propagate.
        """
        argv = spec.argv if spec.argv is not None else self._split(spec.shell or "")
        if not argv:
            raise InvalidRequest("the command line is empty")
        if spec.cwd is not None and posixpath.normpath(spec.cwd) not in self.machine.folders:
            raise NotFound(f"no folder {spec.cwd} on {self.server.name}")
        program, args = argv[0], argv[1:]
        if program == "exit":
            code = _int(args[0] if args else 0, "exit's argument")
            self.machine.execs += 1
            return ExecResult(exit_code=code)
        self.machine.execs += 1
        self.machine.running += 1
        try:
            if program == "sleep":
                try:
                    seconds = float(args[0]) if args else 1.0
                except ValueError:
                    raise InvalidRequest(f"sleep takes seconds, not {args[0]!r}") from None
                await asyncio.sleep(seconds)
            elif program == "cat":
                data = spec.stdin or b""
                for start in range(0, len(data), CHUNK_BYTES):
                    # Await each write: it pushes back when the consumer is slow.
                    await output.write("stdout", data[start:start + CHUNK_BYTES])
            else:
                stream = "stderr" if program == "warn" else "stdout"
                await output.write(stream, (" ".join(args) + "\n").encode())
            return ExecResult(exit_code=self.exit_code)
        except asyncio.CancelledError:
            # A timeout or a cancel request. A real transport kills the remote process
            # (its process group, the SSH channel, ...) here, and only then re-raises;
            # swallowing CancelledError would leave the host waiting and the process running.
            self.machine.killed += 1
            self.transport.ctx.logger.info("stopped %r on %s", program, self.server.name)
            raise
        finally:
            self.machine.running -= 1

    @staticmethod
    def _split(shell: str) -> list[str]:
        try:
            return shlex.split(shell)
        except ValueError as exc:
            raise InvalidRequest(f"cannot parse the shell command: {exc}") from None

    # files ------------------------------------------------------------------------------
    def _path(self, path: str) -> str:
        if not path.startswith("/"):
            raise InvalidRequest(f"{path!r} is not an absolute path")
        return posixpath.normpath(path)

    def _parents(self, path: str) -> list[str]:
        parents = []
        parent = posixpath.dirname(path)
        while parent not in self.machine.folders:
            if parent in self.machine.files:
                raise InvalidRequest(f"{parent} is a file, not a folder")
            parents.append(parent)
            parent = posixpath.dirname(parent)
        return parents

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        """Write ``source`` to ``spec.path`` atomically: all of it, or nothing.

        Nothing is visible until the last chunk has arrived. The host checks the size
        and the sha256 in ``source`` itself and raises from it at the end, so the file
        must only be committed after the ``async for`` finished without an error
        (a real transport writes a temporary file beside the path and renames it).
        """
        path = self._path(spec.path)
        if path == "/" or path in self.machine.folders:
            raise InvalidRequest(f"{path} is a folder")
        missing = self._parents(path)
        if missing and not spec.make_parents:
            raise NotFound(f"no folder {posixpath.dirname(path)} on {self.server.name}")
        limit = self.transport.max_file_bytes
        if spec.size is not None and spec.size > limit:  # refuse before anything moves
            raise TooLarge(f"{spec.size} bytes is more than the {limit} this fake keeps")
        received = bytearray()
        async for chunk in source:
            received += chunk
            if len(received) > limit:
                raise TooLarge(f"{path} is more than the {limit} bytes this fake keeps")
        # Every byte arrived and the host's checks passed: this is the rename.
        old = self.machine.files.get(path)
        mode = spec.mode if spec.mode is not None else old.mode if old else DEFAULT_MODE
        self.machine.folders.update(missing)
        self.machine.files[path] = FakeFile(bytes(received), mode)
        return FileStat(size=len(received), mode=mode)

    async def get(self, path: str) -> RemoteFile:
        """Open ``path``: its size and mode now, its bytes in chunks as the host reads them."""
        path = self._path(path)
        if path in self.machine.folders:
            raise InvalidRequest(f"{path} is a folder")
        found = self.machine.files.get(path)
        if found is None:
            raise NotFound(f"no file {path} on {self.server.name}")
        data = found.data  # bytes never change: a put meanwhile does not tear this read

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), CHUNK_BYTES):
                yield data[start:start + CHUNK_BYTES]

        return RemoteFile(size=len(data), mode=found.mode, chunks=chunks())

    # facts ------------------------------------------------------------------------------
    async def info(self) -> ServerFacts:
        return ServerFacts(
            hostname=self.server.host or self.server.name,
            os=self.transport.settings.os_name,
            os_version=__version__,
            arch="none",
            uptime_s=round(time.monotonic() - self.machine.booted, 3),
            extra={"files": len(self.machine.files), "execs": self.machine.execs,
                   "running": self.machine.running, "killed": self.machine.killed,
                   "user": self.user},
        )

    async def ping(self) -> None:
        """The cheapest round trip to the server itself; a fake has nothing to cross."""
        if self.closed:
            raise ServerOffline(f"the session to {self.server.name} is closed")

    async def close(self) -> None:
        self.closed = True

    @property
    def alive(self) -> bool:
        # A real transport returns False once its connection dropped; the host then
        # opens a new session for the next command.
        return not self.closed


class EchoSettings(TransportSettings):
    """Per-worker settings, checked by the host when the worker starts."""

    exit_code: StrictInt = 0
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, ge=0)
    os_name: str = Field(default="EchoOS", min_length=1, max_length=64)
    idle_timeout_s: float = Field(default=300.0, gt=0)


class EchoOptions(ServerOptions):
    """Per-server options, checked by the admin service at ``servers add``."""

    exit_code: StrictInt | None = None
    offline: bool = False


class EchoTransport(Transport):
    """Servers that are in-memory fakes; see the module docstring for what they do."""

    name = "echo"
    version = __version__
    description = "Example plugin: in-memory fake servers that echo their commands"
    serves_registered = True  # the host serves every registered echo server
    Settings = EchoSettings
    Options = EchoOptions
    capabilities = Capabilities()  # no host needed, no port, no agent key
    settings: EchoSettings

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)  # validates ctx.settings into self.settings (an EchoSettings)
        self.default_exit_code = self.settings.exit_code
        self.max_file_bytes = self.settings.max_file_bytes
        self.idle_timeout_s = self.settings.idle_timeout_s
        self.machines: dict[str, FakeMachine] = {}

    async def open(self, server: Server, credential: Credential | None) -> Session:
        """Open a session to ``server``; nothing here logs or keeps the credential's secret."""
        if server.options.get("offline"):
            raise ServerOffline(f"{server.name} is switched off (option offline=true)")
        if credential is not None and credential.type not in ("password", "token"):
            raise AuthFailed(f"{server.name}: the echo transport takes a password or token "
                             f"credential, not {credential.type}")
        exit_code = _int(server.options.get("exit_code", self.default_exit_code),
                         f"{server.name}'s option exit_code")
        machine = self.machines.setdefault(server.name, FakeMachine())
        self.ctx.logger.debug("session opened to %s", server.name)
        return EchoSession(self, server, machine, credential.user if credential else None, exit_code)
