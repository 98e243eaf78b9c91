"""The ``wmi`` transport: Windows servers managed agentlessly over WinRM (WS-Management).

pywinrm is the client, used through its low-level ``winrm.protocol.Protocol`` so that
output streams (one WS-Management Receive after another, each chunk handed on as it
arrives) and so that timeouts and cancellation can stop the remote process. Every
pywinrm call is blocking and runs through ``ctx.run_blocking``.

Server fields
    ``host``; ``port`` (default 5986 for https, 5985 for http); ``credential`` of type
    ``password`` (user like ``DOMAIN\\ops`` or ``ops@domain``, secret the password);
    ``options``:

    - ``scheme``: ``https`` (default) or ``http``. HTTPS validates the server's
      certificate; plain HTTP is used only when asked for. With ``ntlm``, ``kerberos``
      or ``credssp`` over HTTP, pywinrm encrypts each message with the authentication's
      session key (WinRM's default HTTP listener refuses anything else).
    - ``auth``: ``ntlm`` (default), ``kerberos`` (needs ``pywinrm[kerberos]`` and a
      ticket), ``basic`` (local accounts; refused over HTTP, where it would send the
      password in clear, unless ``allow_basic_over_http`` is true), ``credssp`` (needs
      ``pywinrm[credssp]``).
    - ``ca``: a PEM CA bundle to verify the server's certificate with (default: the
      certifi bundle requests uses).
    - ``insecure_skip_verify``: true to accept any certificate; only when the operator
      asks for it, and never together with ``ca``.

Transport settings (``ctx.settings``)
    ``operation_timeout_s`` (20: how long one Receive waits on the server for output),
    ``connect_timeout_s`` (10), ``max_shells`` (8), ``max_idle_shells`` (2),
    ``max_commands_per_shell`` (100), ``reuse_shells`` (true), ``codepage`` (65001,
    UTF-8), ``shell_idle_timeout_s`` (600), ``put_chunk_bytes`` (196608),
    ``get_chunk_bytes`` (196608), ``idle_timeout_s`` (300: how long the host keeps an
    unused session). See :mod:`fleetbus_wmi.shell` for the shell lifecycle and
    :mod:`fleetbus_wmi.files` for file transfer.

The password is handed to pywinrm and nowhere else: it is not logged, not in any error
message, and the Credential's repr hides it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import fleetbus
from fleetbus.errors import AuthFailed, InvalidRequest, TransportError
from fleetbus.records import Server
from fleetbus.transport import (
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
from fleetbus_base.text import one_line, shorten
from pydantic import Field, model_validator

from . import facts, files
from .commands import ClixmlFilter, command_line, powershell_line

if TYPE_CHECKING:
    # pywinrm (with requests and spnego) is imported when a session first opens, not
    # when the plugin loads: ~60-130 ms of every `fleetbus up` and worker start that a
    # fleet without Windows servers never needs. WmiTransport checks it is installed.
    from winrm.protocol import Protocol

    from .shell import Connection, ShellSettings

DEFAULT_PORTS = {"https": 5986, "http": 5985}
AUTH_METHODS = ("ntlm", "kerberos", "basic", "credssp")
KNOWN_OPTIONS = frozenset({"scheme", "auth", "ca", "insecure_skip_verify", "allow_basic_over_http"})


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0", ""):
        return False
    raise InvalidRequest(f"option {name} must be true or false, not {value!r}")


def _ints(low: int, high: int) -> Any:
    return Annotated[int, Field(ge=low, le=high, strict=True)]


class WmiOptions(ServerOptions):
    """Per-server options of a ``wmi`` server (see the module docstring); checked at
    ``servers add``. :class:`WmiConfig` checks the rest (files, credential) at open."""

    scheme: Literal["https", "http"] | None = None
    auth: Literal["ntlm", "kerberos", "basic", "credssp"] | None = None
    ca: str | None = None
    insecure_skip_verify: bool = False
    allow_basic_over_http: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> WmiOptions:
        if self.ca and self.insecure_skip_verify:
            raise ValueError("give either ca or insecure_skip_verify, not both")
        return self


class WmiSettings(TransportSettings):
    """The transport settings (see the module docstring), checked once when the host starts."""

    operation_timeout_s: _ints(1, 3600) = 20
    connect_timeout_s: _ints(1, 600) = 10
    reuse_shells: bool = True
    max_shells: _ints(1, 1000) = 8
    max_idle_shells: _ints(0, 1000) = 2
    max_commands_per_shell: _ints(1, 100000) = 100
    codepage: _ints(1, 65535) = 65001
    shell_idle_timeout_s: _ints(1, 86400) = 600
    put_chunk_bytes: _ints(1024, files.MAX_PUT_CHUNK) = files.DEFAULT_PUT_CHUNK
    get_chunk_bytes: _ints(1024, 16 * 1024 * 1024) = files.DEFAULT_GET_CHUNK
    idle_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 300.0

    @property
    def shells(self) -> ShellSettings:
        from .shell import ShellSettings

        return ShellSettings(
            max_shells=self.max_shells, max_idle_shells=self.max_idle_shells,
            max_commands_per_shell=self.max_commands_per_shell, reuse_shells=self.reuse_shells,
            codepage=self.codepage, shell_idle_timeout_s=self.shell_idle_timeout_s)

    @property
    def put_chunk(self) -> int:
        return self.put_chunk_bytes

    @property
    def get_chunk(self) -> int:
        return self.get_chunk_bytes


class WmiConfig:
    """Everything needed to talk to one server, checked; built from its registry record."""

    def __init__(self, server: Server, credential: Credential | None, settings: WmiSettings) -> None:
        options = dict(server.options or {})
        unknown = sorted(set(options) - KNOWN_OPTIONS)
        if unknown:
            raise InvalidRequest(f"{server.name}: unknown wmi option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(KNOWN_OPTIONS))}")
        if not server.host:
            raise InvalidRequest(f"{server.name} has no host: register it with --host")
        self.server = server.name
        self.scheme = str(options.get("scheme", "https")).strip().lower()
        if self.scheme not in DEFAULT_PORTS:
            raise InvalidRequest(f"{server.name}: option scheme must be https or http, not {self.scheme!r}")
        self.auth = str(options.get("auth", "ntlm")).strip().lower()
        if self.auth not in AUTH_METHODS:
            raise InvalidRequest(f"{server.name}: option auth must be one of {', '.join(AUTH_METHODS)}, "
                                 f"not {self.auth!r}")
        self.insecure = _bool(options.get("insecure_skip_verify", False), "insecure_skip_verify")
        ca = options.get("ca")
        self.ca = str(ca) if ca not in (None, "") else None
        if self.ca and self.insecure:
            raise InvalidRequest(f"{server.name}: give either ca or insecure_skip_verify, not both")
        if self.ca and self.scheme == "https" and not os.path.isfile(self.ca):
            raise InvalidRequest(f"{server.name}: CA bundle {self.ca} does not exist on this fleetbus host")
        if (self.auth == "basic" and self.scheme == "http"
                and not _bool(options.get("allow_basic_over_http", False), "allow_basic_over_http")):
            raise InvalidRequest(
                f"{server.name}: basic authentication over plain HTTP would send the password "
                "in clear; use scheme=https (or auth=ntlm, whose messages are encrypted), or set "
                "allow_basic_over_http=true if you really mean it")
        self.host = server.host
        self.port = server.port or DEFAULT_PORTS[self.scheme]
        host_in_url = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        self.endpoint = f"{self.scheme}://{host_in_url}:{self.port}/wsman"
        self.display = f"{host_in_url}:{self.port}"
        if credential is None:
            if self.auth != "kerberos":
                raise AuthFailed(f"{server.name} has no credential: register one with "
                                 "--credential (type password, user DOMAIN\\name)")
            self.user: str | None = None
            self._password: str | None = None
        else:
            if credential.type not in ("password", "windows"):
                raise InvalidRequest(f"{server.name}: the wmi transport needs a password credential, "
                                     f"{credential.name} is of type {credential.type}")
            if not credential.user and self.auth != "kerberos":
                raise InvalidRequest(f"{server.name}: credential {credential.name} has no user")
            self.user = credential.user
            try:
                self._password = credential.secret.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"credential {credential.name} is not UTF-8 text") from None
        self._check_auth_support()
        self.settings = settings
        self.shells = settings.shells
        self.operation_timeout_s = settings.operation_timeout_s
        self.connect_timeout_s = float(settings.connect_timeout_s)
        self.put_chunk = settings.put_chunk
        self.get_chunk = settings.get_chunk

    def _check_auth_support(self) -> None:
        import winrm.transport as wt

        missing = {"kerberos": (wt.HAVE_KERBEROS, "pywinrm[kerberos]"),
                   "credssp": (wt.HAVE_CREDSSP, "pywinrm[credssp]")}.get(self.auth)
        if missing is not None and not missing[0]:
            raise TransportError(f"{self.server}: auth={self.auth} needs {missing[1]} installed "
                                 "on the fleetbus host")

    @property
    def where(self) -> dict[str, Any]:
        return {"server": self.server, "endpoint": self.display, "user": self.user,
                "auth": self.auth, "scheme": self.scheme}

    def make_protocol(self) -> Protocol:
        """A new pywinrm Protocol (no network I/O happens here)."""
        from winrm.protocol import Protocol

        protocol = Protocol(
            endpoint=self.endpoint,
            transport=self.auth,  # type: ignore[arg-type]
            username=self.user,
            password=self._password,
            server_cert_validation="ignore" if self.insecure else "validate",
            # None: exactly this CA, or requests' default bundle; never REQUESTS_CA_BUNDLE.
            ca_trust_path=self.ca if self.ca else None,  # type: ignore[arg-type]
            read_timeout_sec=self.operation_timeout_s + 10,
            operation_timeout_sec=self.operation_timeout_s,
            message_encryption="auto",
            proxy=None,
        )
        # requests takes (connect, read): an unreachable host fails in connect_timeout_s,
        # while a Receive may legitimately wait the whole operation timeout.
        protocol.transport.read_timeout_sec = (self.connect_timeout_s, self.operation_timeout_s + 10)  # type: ignore[assignment]
        return protocol


class _Collect:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()

    async def write(self, stream: StreamName, data: bytes) -> None:
        target = self.stdout if stream == "stdout" else self.stderr
        if len(target) < 1 << 20:
            target += data


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise InvalidRequest(f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidRequest(f"environment variable {name} has an invalid value")
    return env


class WmiSession(Session):
    """One server: a pool of WinRM connections and shells, shared by concurrent commands."""

    def __init__(self, config: WmiConfig, conn: Connection, identity: dict[str, str]) -> None:
        self.config = config
        self.conn = conn
        self.identity = identity

    @property
    def alive(self) -> bool:
        return self.conn.client.alive

    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        line = command_line(spec.argv, spec.shell)
        env = _check_env(dict(spec.env or {}))
        if spec.cwd is not None and (not isinstance(spec.cwd, str) or "\0" in spec.cwd):
            raise InvalidRequest("invalid working directory")
        stderr_filter = ClixmlFilter() if line.powershell_script is not None else None
        run = self.conn.run(line, output, cwd=spec.cwd or None, env=env or None,
                            stdin=spec.stdin, stderr_filter=stderr_filter)
        # No time limit of its own: the host's (spec.timeout_s) cancels this coroutine,
        # and a cancelled run sends WinRM's Signal terminate and deletes its shell (shell.py).
        return ExecResult(exit_code=await run)

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        return await files.put_file(self.conn, spec, source, self.config.put_chunk)

    async def get(self, path: str) -> RemoteFile:
        return await files.get_file(self.conn, path, self.config.get_chunk)

    async def info(self) -> ServerFacts:
        sink = _Collect()
        code = await self.conn.run(powershell_line(facts.INFO_SCRIPT), sink,
                                   stderr_filter=ClixmlFilter())
        if code != 0:
            detail = shorten(one_line(bytes(sink.stderr).decode("utf-8", "replace") or "no error output"), 300)
            raise TransportError(f"info: the PowerShell facts script failed (exit code {code}): {detail}")
        return facts.parse_facts(bytes(sink.stdout), user=self.config.user, wsman=self.identity,
                                 transport_version=WmiTransport.version)

    async def ping(self) -> None:
        await self.conn.client.identify()

    async def close(self) -> None:
        await self.conn.close()


class WmiTransport(Transport):
    """Windows servers over WinRM (WS-Management), agentless, through pywinrm."""

    name = "wmi"
    version = fleetbus.__version__
    description = "Windows servers over WinRM (WS-Management, pywinrm): cmd and PowerShell, files, facts"
    serves_registered = True

    Settings = WmiSettings
    Options = WmiOptions
    capabilities = Capabilities(needs_host=True, default_port=DEFAULT_PORTS["https"])
    settings: WmiSettings

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self.idle_timeout_s = self.settings.idle_timeout_s  # type: ignore[misc]

    async def open(self, server: Server, credential: Credential | None) -> Session:
        from .shell import Connection

        config = WmiConfig(server, credential, self.settings)
        conn = Connection(self.ctx, config.make_protocol, config.where, config.shells)
        try:
            identity = await conn.client.identify()
        except BaseException:
            conn.client.close()
            raise
        self.ctx.logger.info("%s: WinRM at %s answers (%s, %s auth): %s", server.name, config.display,
                             config.scheme, config.auth, identity.get("ProductVersion", "?"))
        return WmiSession(config, conn, identity)
