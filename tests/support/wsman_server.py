"""A WS-Management (WinRM) server for tests: the real protocol, to the unmodified pywinrm.

It speaks SOAP 1.2 over HTTP and HTTPS on 127.0.0.1, parses the envelopes pywinrm sends
with ``xml.etree`` and answers them the way Windows does:

- Identify; WinRS shells: Create (``rsp:Environment``, ``rsp:WorkingDirectory``,
  ``IdleTimeOut``, ``WINRS_CODEPAGE``), Command (``WINRS_SKIP_CMD_SHELL``,
  ``WINRS_CONSOLEMODE_STDIN``), Send (stdin, ``End``), Receive (base64 ``rsp:Stream``
  parts as output arrives, so output spreads over several Receives; ``CommandState``
  Running/Done with ``ExitCode``; the Receive fault 2150858793 after OperationTimeout
  with no output), Signal (``terminate`` kills the process group, ``ctrl_c`` sends
  SIGINT) and Delete (kills what still runs in the shell).
- Faults as Windows sends them (HTTP 500, SOAP Fault, ``wsmanfault:WSManFault`` with
  its Code): the shell quota (2150859173, "This user is allowed a maximum number of N
  concurrent shells ..."; ``max_shells_per_user``), the per-shell operations quota
  (2150859174; ``max_commands_per_shell`` emulates pre-2012 Windows), shell not found
  (2150858843), access denied (5; ``denied_users``), bad working directory (267), a
  request above ``max_envelope_kb`` (``w:EncodingLimit``).
- Authentication: HTTP 401 for missing or bad credentials; Basic; NTLM (Negotiate or
  NTLM header, connection-based like HTTP.sys) with pyspnego as the NTLM acceptor,
  checking the channel binding token over HTTPS, and, over plain HTTP, WinRM's NTLM
  message encryption (``multipart/encrypted``, ``application/HTTP-SPNEGO-session-encrypted``).
- TLS with a throwaway CA and server certificate made with ``cryptography``
  (``ca_path`` is the CA bundle a client can verify with).

Commands: cmd.exe is emulated minimally on the local POSIX system. With
``WINRS_SKIP_CMD_SHELL`` the line is split with ``CommandLineToArgvW`` rules and the
program started directly. Otherwise it goes through a stand-in for ``cmd /c``: cmd's
``/c`` quote-stripping rule, ``%VAR%`` expansion (undefined names left as they are),
``^`` escapes and the quote flag; a line with an unescaped, unquoted ``& | < >`` or
starting with a cmd built-in (``echo``, ``exit``, ``set``, ``type``, ``cd``, ...) is run
by ``/bin/sh -c`` as is (so use command text both shells understand); any other line is
split with ``CommandLineToArgvW`` rules and executed directly (exit code 9009 and
cmd's message when the program does not exist). Processes run in their own process
group with the shell's environment variables and working directory. Windows paths
``X:\\a\\b`` map to ``<root>/X/a/b``.

PowerShell is not run: ``powershell.exe ... -EncodedCommand`` is decoded and, if it is
one of the fleetbus-wmi scripts (``# fleetbus-wmi put|get|remove|info v1`` with its
``# params`` block), emulated in Python on the mapped disk (put reads base64 stdin
lines into the temporary file, checks the size, renames; get prints the JSON header,
base64 lines and ``.``; info prints ``facts``). Any other script exits 1 with a message
on stderr; the script text is kept in ``commands`` for the test to inspect.

Everything received is recorded in ``events`` (action, shell id, command id, detail) so
tests can assert which Signals and Deletes arrived and that no shell is left open.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from xml.sax.saxutils import escape

from .ports import free_port

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "wsmid": "http://schemas.dmtf.org/wbem/wsman/identity/1/wsmanidentity.xsd",
}
ACTION_CREATE = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create"
ACTION_DELETE = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete"
SHELL_NS = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
ACTION_COMMAND = SHELL_NS + "/Command"
ACTION_RECEIVE = SHELL_NS + "/Receive"
ACTION_SEND = SHELL_NS + "/Send"
ACTION_SIGNAL = SHELL_NS + "/Signal"
SIGNAL_TERMINATE = SHELL_NS + "/signal/terminate"
SIGNAL_CTRL_C = SHELL_NS + "/signal/ctrl_c"
STATE_RUNNING = SHELL_NS + "/CommandState/Running"
STATE_DONE = SHELL_NS + "/CommandState/Done"
RESOURCE_CMD = SHELL_NS + "/cmd"

FAULT_MAX_SHELLS = 2150859173
FAULT_MAX_OPERATIONS = 2150859174
FAULT_SHELL_NOT_FOUND = 2150858843
FAULT_RECEIVE_TIMEOUT = 2150858793
BOUNDARY = b"--Encrypted Boundary"
ENCRYPTED_PROTOCOL = "application/HTTP-SPNEGO-session-encrypted"
CMD_BUILTINS = frozenset({"echo", "exit", "set", "type", "cd", "chdir", "dir", "ver", "rem", "pause",
                          "copy", "del", "erase", "md", "mkdir", "rd", "rmdir", "move", "ren", "cls"})
OUTPUT_BUFFER_CAP = 1 << 20


# --------------------------------------------------------------------------- certificates

def make_certs(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A throwaway CA and a server certificate for ``hosts``, written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetbus wsman test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


# --------------------------------------------------------------------------- cmd emulation

def split_command_line(line: str) -> list[str]:
    """``CommandLineToArgvW`` / MSVC runtime rules (including ``""`` inside quotes)."""
    args: list[str] = []
    n = len(line)
    i = 0
    while i < n and line[i] in " \t":
        i += 1
    if i >= n:
        return args
    if line[i] == '"':  # the program name: no backslash processing
        j = line.find('"', i + 1)
        j = n if j < 0 else j
        args.append(line[i + 1: j])
        i = j + 1
    else:
        j = i
        while j < n and line[j] not in " \t":
            j += 1
        args.append(line[i:j])
        i = j
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            return args
        arg: list[str] = []
        quoted = False
        while i < n:
            c = line[i]
            if c == "\\":
                count = 0
                while i < n and line[i] == "\\":
                    count += 1
                    i += 1
                if i < n and line[i] == '"':
                    arg.append("\\" * (count // 2))
                    if count % 2:
                        arg.append('"')
                        i += 1
                else:
                    arg.append("\\" * count)
                continue
            if c == '"':
                if quoted and i + 1 < n and line[i + 1] == '"':
                    arg.append('"')
                    i += 2
                    continue
                quoted = not quoted
                i += 1
                continue
            if c in " \t" and not quoted:
                break
            arg.append(c)
            i += 1
        args.append("".join(arg))


def expand_percent(line: str, env: dict[str, str]) -> str:
    """cmd's phase 1 on a command line: ``%NAME%`` of a defined variable expands."""
    lookup = {k.upper(): v for k, v in env.items()}
    out: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == "%":
            j = line.find("%", i + 1)
            if j > i + 1 and line[i + 1: j].upper() in lookup:
                out.append(lookup[line[i + 1: j].upper()])
                i = j + 1
                continue
        out.append(line[i])
        i += 1
    return "".join(out)


def cmd_c(line: str, env: dict[str, str]) -> tuple[str, Any]:
    """What ``cmd /c line`` would run: ("argv", list) or ("sh", text) for the stand-in."""
    if line.startswith('"'):
        quotes = line.count('"')
        inner = line[1: line.find('"', 1)] if quotes == 2 else ""
        keep = (quotes == 2 and not any(c in inner for c in "&<>()@^|")
                and any(c.isspace() for c in inner) and os.path.isfile(inner))
        if not keep:
            last = line.rfind('"')
            line = line[1:last] + line[last + 1:]
    line = expand_percent(line, env)
    out: list[str] = []
    quoted = False
    special = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == '"':
            quoted = not quoted
            out.append(c)
        elif c == "^" and not quoted:
            i += 1
            if i < len(line):
                out.append(line[i])
        else:
            if c in "&|<>" and not quoted:
                special = True
            out.append(c)
        i += 1
    text = "".join(out)
    if special:
        return "sh", line
    argv = split_command_line(text)
    if not argv:
        return "sh", ""
    if argv[0].lower() in CMD_BUILTINS:
        return "sh", text
    return "argv", argv


def powershell_script(argv: list[str]) -> str | None:
    """The script of ``powershell.exe ... -EncodedCommand B64``, or None."""
    if not argv or os.path.basename(argv[0].replace("\\", "/")).lower() not in (
            "powershell", "powershell.exe", "pwsh", "pwsh.exe"):
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg.lower() in ("-encodedcommand", "-enc", "-e", "-ec"):
            return base64.b64decode(argv[i + 1]).decode("utf-16-le")
    return None


def parse_script_params(script: str) -> tuple[str, dict[str, Any]] | None:
    kind = None
    for line in script.splitlines():
        match = re.match(r"^# fleetbus-wmi (\w+) v1$", line.strip())
        if match:
            kind = match.group(1)
            break
    if kind is None:
        return None
    params: dict[str, Any] = {}
    inside = False
    for raw in script.splitlines():
        line = raw.strip()
        if line == "# params":
            inside = True
        elif line == "# end params":
            break
        elif inside:
            name, _, text = line.partition(" = ")
            name = name.lstrip("$")
            if text in ("$true", "$false"):
                params[name] = text == "$true"
            elif re.fullmatch(r"-?\d+", text):
                params[name] = int(text)
            elif len(text) >= 2 and text[0] == text[-1] == "'":
                params[name] = re.sub("(['\u2018\u2019\u201a\u201b])\\1", r"\1", text[1:-1])
            else:
                raise ValueError(f"unparsable parameter line {line!r}")
    return kind, params


# --------------------------------------------------------------------------- commands

class Killed(Exception):
    pass


class Command:
    """A WinRS command: a real process or an emulated one, with buffered output."""

    def __init__(self, shell: Shell, command_id: str, line: str, skip_cmd: bool) -> None:
        self.shell = shell
        self.id = command_id
        self.line = line
        self.skip_cmd = skip_cmd
        self.cond = threading.Condition()
        self.output: deque[tuple[str, bytes]] = deque()
        self.buffered = 0
        self.open_streams = 2
        self.exit_code: int | None = None
        self.killed = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdin_queue: deque[bytes] = deque()
        self.stdin_closed = False
        self.receives_with_data = 0
        self.powershell: str | None = None
        self.started = time.monotonic()

    # output side
    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        with self.cond:
            while self.buffered > OUTPUT_BUFFER_CAP and not self.killed:
                self.cond.wait(0.5)
            if self.killed:
                raise Killed()
            self.output.append((stream, data))
            self.buffered += len(data)
            self.cond.notify_all()

    def close_stream(self) -> None:
        with self.cond:
            self.open_streams -= 1
            self.cond.notify_all()

    def set_exit(self, code: int) -> None:
        with self.cond:
            self.exit_code = code
            self.cond.notify_all()

    @property
    def done(self) -> bool:
        return self.exit_code is not None and self.open_streams <= 0

    def take(self, budget: int, wait_s: float, stopping: threading.Event) -> tuple[list[tuple[str, bytes]], bool] | None:
        """Output up to ``budget`` bytes; None if nothing arrived within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            while not self.output and not self.done:
                left = deadline - time.monotonic()
                if left <= 0 or stopping.is_set():
                    return None
                self.cond.wait(min(left, 0.25))
            parts: list[tuple[str, bytes]] = []
            used = 0
            while self.output and used < budget:
                stream, data = self.output.popleft()
                room = budget - used
                if len(data) > room:
                    self.output.appendleft((stream, data[room:]))
                    data = data[:room]
                parts.append((stream, data))
                used += len(data)
                self.buffered -= len(data)
            self.cond.notify_all()
            return parts, self.done and not self.output

    # input side
    def send(self, data: bytes, end: bool) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            if self.exit_code is not None or self.killed:
                raise BrokenPipeError()
            if data:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            if end:
                self.proc.stdin.close()
            return
        with self.cond:
            if self.exit_code is not None or self.killed:
                raise BrokenPipeError()
            if data:
                self.stdin_queue.append(data)
            if end:
                self.stdin_closed = True
            self.cond.notify_all()

    def stdin_lines(self) -> Any:
        """Lines of stdin for an emulated process (without line ends)."""
        pending = b""
        while True:
            with self.cond:
                while not self.stdin_queue and not self.stdin_closed and not self.killed:
                    self.cond.wait(0.25)
                if self.killed:
                    raise Killed()
                chunk = self.stdin_queue.popleft() if self.stdin_queue else None
            if chunk is None:
                if pending:
                    yield pending.rstrip(b"\r")
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with self.cond:
            if sig == signal.SIGKILL:
                self.killed = True
            self.cond.notify_all()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- server state

@dataclass
class Shell:
    id: str
    user: str
    env: dict[str, str]
    cwd: str | None
    codepage: str | None
    idle_timeout: str | None
    commands: dict[str, Command] = field(default_factory=dict)
    commands_run: int = 0
    created: float = field(default_factory=time.monotonic)


@dataclass
class Event:
    action: str
    shell_id: str | None = None
    command_id: str | None = None
    detail: Any = None
    at: float = field(default_factory=time.monotonic)


class Fault(Exception):
    def __init__(self, reason: str, code: int | None = None, subcode: str = "w:InternalError",
                 value: str = "s:Receiver", http: int = 500) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.subcode = subcode
        self.value = value
        self.http = http


class WsmanServer:
    """The server; ``start()`` it, use ``url``/``port``/``ca_path``, ``stop()`` it."""

    def __init__(self, root: Path, *, tls: bool = True, users: dict[str, str] | None = None,
                 auth: tuple[str, ...] = ("basic", "ntlm"), max_shells_per_user: int = 30,
                 max_commands_per_shell: int | None = None, max_envelope_kb: int = 500,
                 denied_users: tuple[str, ...] = (), facts: dict[str, Any] | None = None,
                 certs: dict[str, Path] | None = None, create_delay_s: float = 0.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.users = dict(users or {"DOMAIN\\ops": "s3cret"})
        self.auth = tuple(auth)
        self.max_shells_per_user = max_shells_per_user
        self.max_commands_per_shell = max_commands_per_shell
        self.max_envelope_kb = max_envelope_kb
        self.denied_users = {u.lower() for u in denied_users}
        self.facts = facts or {
            "Name": "WIN-TEST01", "Domain": "example.test", "Caption": "Microsoft Windows Server 2022 Standard",
            "Version": "10.0.20348", "BuildNumber": "20348", "OSArchitecture": "64-bit",
            "ProcessorArchitecture": "AMD64", "LastBootUpTime": "2024-01-01T00:00:00.0000000Z",
            "UptimeSeconds": 12345.5, "PSVersion": "5.1.20348.2227",
        }
        self.certs = certs
        #: How long Create takes (a slow Windows host), to test cancellation meanwhile.
        self.create_delay_s = create_delay_s
        self.shells: dict[str, Shell] = {}
        self.events: list[Event] = []
        self.max_open_shells = 0
        self.auth_failures = 0
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._ssl: ssl.SSLContext | None = None
        self._cbt: bytes | None = None
        self._ntlm_file: Path | None = None
        self._old_ntlm_env: str | None = None
        self._finished: deque[Command] = deque(maxlen=500)

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> WsmanServer:
        if self.tls:
            if self.certs is None:
                self.certs = make_certs(self.root / "_certs")
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(str(self.certs["cert"]), str(self.certs["key"]))
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            der = x509.load_pem_x509_certificate(self.certs["cert"].read_bytes()).public_bytes(Encoding.DER)
            self._cbt = b"tls-server-end-point:" + hashlib.sha256(der).digest()
        if "ntlm" in self.auth:
            self._ntlm_file = self.root / "_ntlm_users"
            lines = []
            for user, password in self.users.items():
                domain, _, name = user.rpartition("\\")
                lines.append(f"{domain}:{name}:{password}")
            self._ntlm_file.write_text("\n".join(lines) + "\n")
            self._old_ntlm_env = os.environ.get("NTLM_USER_FILE")
            os.environ["NTLM_USER_FILE"] = str(self._ntlm_file)
        server = self

        class Handler(_Handler):
            wsman = server

        class HTTPServer(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up, failed TLS handshakes: part of the tests

        self._httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="wsman-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self.lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for shell in self.shells.values():
                for cmd in shell.commands.values():
                    cmd.kill()
            self.shells.clear()
        if self._thread is not None:
            self._thread.join(5)
        if self._ntlm_file is not None:
            if self._old_ntlm_env is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = self._old_ntlm_env

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/wsman"

    @property
    def ca_path(self) -> Path:
        assert self.certs is not None
        return self.certs["ca"]

    # inspection ---------------------------------------------------------------------
    def record(self, action: str, shell_id: str | None = None, command_id: str | None = None,
               detail: Any = None) -> None:
        with self.lock:
            self.events.append(Event(action, shell_id, command_id, detail))

    def count(self, action: str, **match: Any) -> int:
        with self.lock:
            return sum(1 for e in self.events if e.action == action
                       and all(getattr(e, k) == v for k, v in match.items()))

    def open_shells(self) -> int:
        with self.lock:
            return len(self.shells)

    def commands(self) -> list[Command]:
        with self.lock:
            return [c for s in self.shells.values() for c in s.commands.values()] + list(self._finished)

    def drop_shells(self) -> None:
        """Forget every shell, as a WinRM service restart would."""
        with self.lock:
            for shell in self.shells.values():
                for cmd in shell.commands.values():
                    cmd.kill()
            self.shells.clear()

    def local_path(self, path: str) -> Path:
        """The local file behind a Windows path ``X:\\a\\b`` (``<root>/X/a/b``)."""
        match = re.match(r"^([A-Za-z]):[\\/]*(.*)$", path)
        if not match:
            if path.startswith("/"):
                return Path(path)
            raise OSError(f"unsupported path {path!r}")
        parts = [p for p in re.split(r"[\\/]+", match.group(2)) if p]
        return self.root.joinpath(match.group(1).upper(), *parts)

    # SOAP -----------------------------------------------------------------------------
    def handle_soap(self, body: bytes, user: str) -> tuple[int, bytes]:
        if len(body) > self.max_envelope_kb * 1024:
            self.record("TooLarge", detail=len(body))
            return self._fault(None, Fault(
                f"The WS-Management service cannot process the request because the request size "
                f"{len(body)} exceeds the MaxEnvelopeSizekb of {self.max_envelope_kb}.",
                None, "w:EncodingLimit", "s:Sender", 400))
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            return self._fault(None, Fault(f"The request is not valid XML: {exc}", None,
                                           "w:SchemaValidationError", "s:Sender", 400))
        header = root.find("s:Header", NS)
        message_id = _text(header, "a:MessageID") if header is not None else None
        action = _text(header, "a:Action") if header is not None else None
        try:
            if user.lower() in self.denied_users:
                raise Fault("Access is denied.", 5, "w:AccessDenied", "s:Sender")
            if root.find("s:Body/wsmid:Identify", NS) is not None:
                self.record("Identify")
                return 200, _identify_response()
            shell_id = None
            if header is not None:
                for sel in header.findall("w:SelectorSet/w:Selector", NS):
                    if sel.get("Name") == "ShellId":
                        shell_id = (sel.text or "").strip()
            options = {}
            if header is not None:
                for opt in header.findall("w:OptionSet/w:Option", NS):
                    options[opt.get("Name", "")] = (opt.text or "").strip()
            timeout_s = _duration(_text(header, "w:OperationTimeout") if header is not None else None, 60.0)
            maxenv = int(_text(header, "w:MaxEnvelopeSize") or 153600) if header is not None else 153600
            if action == ACTION_CREATE:
                return 200, self._create(root, user, options, message_id)
            if action == ACTION_DELETE:
                return 200, self._delete(shell_id, message_id)
            if action == ACTION_COMMAND:
                return 200, self._command(root, shell_id, options, message_id)
            if action == ACTION_RECEIVE:
                return 200, self._receive(root, shell_id, message_id, timeout_s, maxenv)
            if action == ACTION_SEND:
                return 200, self._send(root, shell_id, message_id)
            if action == ACTION_SIGNAL:
                return 200, self._signal(root, shell_id, message_id)
            raise Fault(f"The action {action} is not supported by the service.", 2150858771,
                        "a:ActionNotSupported", "s:Sender")
        except Fault as fault:
            return self._fault(message_id, fault)

    def _shell(self, shell_id: str | None) -> Shell:
        with self.lock:
            shell = self.shells.get(shell_id or "")
        if shell is None:
            raise Fault(
                f"The request for the Windows Remote Shell with ShellId {shell_id} failed because the shell "
                "was not found on the server. Possible causes are: the specified ShellId is incorrect or the "
                "shell no longer exists on the server. Provide the correct ShellId or create a new shell and "
                "retry the operation.", FAULT_SHELL_NOT_FOUND, "w:InvalidSelectors", "s:Sender")
        return shell

    def _create(self, root: ET.Element, user: str, options: dict[str, str], message_id: str | None) -> bytes:
        body = root.find("s:Body/rsp:Shell", NS)
        if body is None:
            raise Fault("The Create request has no rsp:Shell.", None, "w:SchemaValidationError", "s:Sender")
        self.record("CreateBegin")
        if self.create_delay_s:
            self.stopping.wait(self.create_delay_s)
        env = {v.get("Name", ""): v.text or "" for v in body.findall("rsp:Environment/rsp:Variable", NS)}
        cwd = _text(body, "rsp:WorkingDirectory")
        with self.lock:
            mine = sum(1 for s in self.shells.values() if s.user.lower() == user.lower())
            if mine >= self.max_shells_per_user:
                self.record("QuotaFault", detail=user)
                raise Fault(
                    "The WS-Management service cannot process the request. This user is allowed a maximum "
                    f"number of {self.max_shells_per_user} concurrent shells, which has been exceeded. Close "
                    "existing shells or raise the quota for this user. ", FAULT_MAX_SHELLS)
            shell = Shell(id=str(uuid.uuid4()).upper(), user=user, env=env, cwd=cwd,
                          codepage=options.get("WINRS_CODEPAGE"), idle_timeout=_text(body, "rsp:IdleTimeOut"))
            self.shells[shell.id] = shell
            self.max_open_shells = max(self.max_open_shells, len(self.shells))
        self.record("Create", shell.id, detail={"env": env, "cwd": cwd, "codepage": shell.codepage,
                                               "idle_timeout": shell.idle_timeout})
        return _envelope(
            "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse", message_id,
            "<x:ResourceCreated><a:Address>http://127.0.0.1/wsman</a:Address><a:ReferenceParameters>"
            f"<w:ResourceURI>{RESOURCE_CMD}</w:ResourceURI><w:SelectorSet>"
            f'<w:Selector Name="ShellId">{shell.id}</w:Selector></w:SelectorSet></a:ReferenceParameters>'
            f"</x:ResourceCreated><rsp:Shell><rsp:ShellId>{shell.id}</rsp:ShellId>"
            f"<rsp:ResourceUri>{RESOURCE_CMD}</rsp:ResourceUri><rsp:Owner>{escape(user)}</rsp:Owner>"
            "<rsp:ClientIP>127.0.0.1</rsp:ClientIP><rsp:InputStreams>stdin</rsp:InputStreams>"
            "<rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>")

    def _delete(self, shell_id: str | None, message_id: str | None) -> bytes:
        shell = self._shell(shell_id)
        with self.lock:
            self.shells.pop(shell.id, None)
            commands = list(shell.commands.values())
        for cmd in commands:
            cmd.kill()
            self._finished.append(cmd)
        self.record("Delete", shell.id)
        return _envelope("http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse", message_id, "")

    def _command(self, root: ET.Element, shell_id: str | None, options: dict[str, str],
                 message_id: str | None) -> bytes:
        shell = self._shell(shell_id)
        line_el = root.find("s:Body/rsp:CommandLine", NS)
        if line_el is None:
            raise Fault("The Command request has no rsp:CommandLine.", None, "w:SchemaValidationError", "s:Sender")
        line = (_text(line_el, "rsp:Command") or "").strip()
        arguments = _text(line_el, "rsp:Arguments")
        if arguments:
            line = f"{line} {arguments}"
        skip_cmd = options.get("WINRS_SKIP_CMD_SHELL", "FALSE").upper() == "TRUE"
        if self.max_commands_per_shell is not None and shell.commands_run >= self.max_commands_per_shell:
            self.record("OperationsFault", shell.id)
            raise Fault(
                "The WS-Management service cannot process the request. This user is allowed a maximum number "
                f"of {self.max_commands_per_shell} concurrent operations, which has been exceeded. Close "
                "existing operations for this user, or raise the quota for this user. ", FAULT_MAX_OPERATIONS)
        cwd: Path | None = None
        if shell.cwd:
            try:
                cwd = self.local_path(shell.cwd)
            except OSError:
                cwd = None
            if cwd is None or not cwd.is_dir():
                raise Fault("The directory name is invalid. ", 267)
        cmd = Command(shell, str(uuid.uuid4()).upper(), line, skip_cmd)
        env = dict(os.environ)
        env.update(shell.env)
        self._launch(cmd, env, cwd)
        with self.lock:
            shell.commands[cmd.id] = cmd
            shell.commands_run += 1
        self.record("Command", shell.id, cmd.id, {"line": line, "skip_cmd_shell": skip_cmd,
                                                  "console_mode_stdin": options.get("WINRS_CONSOLEMODE_STDIN"),
                                                  "powershell": cmd.powershell})
        return _envelope(SHELL_NS + "/CommandResponse", message_id,
                         f"<rsp:CommandResponse><rsp:CommandId>{cmd.id}</rsp:CommandId></rsp:CommandResponse>")

    def _launch(self, cmd: Command, env: dict[str, str], cwd: Path | None) -> None:
        if cmd.skip_cmd:
            kind, what = "argv", split_command_line(cmd.line)
        else:
            kind, what = cmd_c(cmd.line, env)
        if kind == "argv":
            script = powershell_script(what)
            if script is not None:
                cmd.powershell = script
                self._start_virtual(cmd, lambda: self._powershell(cmd, script))
                return
            argv = what
        else:
            argv = ["/bin/sh", "-c", what]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=env, start_new_session=True)
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            if cmd.skip_cmd:
                raise Fault("The system cannot find the file specified. ", 2) from None
            name = argv[0]
            self._start_virtual(cmd, lambda: self._not_found(cmd, name))
            return
        cmd.proc = proc

        def pump(stream: Any, name: str) -> None:
            try:
                while True:
                    data = os.read(stream.fileno(), 65536)
                    if not data:
                        break
                    cmd.write(name, data)
            except (Killed, OSError):
                pass
            finally:
                stream.close()
                cmd.close_stream()

        def waiter() -> None:
            code = proc.wait()
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            cmd.set_exit(code if code >= 0 else 0xC000013A)  # STATUS_CONTROL_C_EXIT for signals

        for target, args in ((pump, (proc.stdout, "stdout")), (pump, (proc.stderr, "stderr")), (waiter, ())):
            threading.Thread(target=target, args=args, daemon=True).start()

    def _start_virtual(self, cmd: Command, body: Callable[[], int]) -> None:
        def run() -> None:
            code = 1
            try:
                code = body()
            except Killed:
                code = 0xC000013A
            except Exception as exc:  # an emulation bug shows up as the command's error
                try:
                    cmd.write("stderr", f"emulation failed: {exc!r}\r\n".encode())
                except Killed:
                    pass
            finally:
                cmd.close_stream()
                cmd.close_stream()
                cmd.set_exit(code)

        threading.Thread(target=run, daemon=True).start()

    @staticmethod
    def _not_found(cmd: Command, name: str) -> int:
        cmd.write("stderr", f"'{name}' is not recognized as an internal or external command,\r\n"
                            "operable program or batch file.\r\n".encode())
        return 9009

    # PowerShell emulation -----------------------------------------------------------------
    def _powershell(self, cmd: Command, script: str) -> int:
        parsed = parse_script_params(script)
        if parsed is None:
            cmd.write("stderr", b"this test server does not run PowerShell; only the fleetbus-wmi "
                                b"put/get/remove/info scripts are emulated\r\n")
            return 1
        kind, params = parsed

        def out(obj: Any) -> None:
            cmd.write("stdout", (json.dumps(obj) + "\r\n").encode())

        if kind == "info":
            out(self.facts)
            return 0
        if kind == "remove":
            try:
                self.local_path(params["Path"]).unlink()
            except OSError:
                pass
            return 0
        if kind == "get":
            return self._ps_get(cmd, params, out)
        if kind == "put":
            return self._ps_put(cmd, params, out)
        cmd.write("stderr", f"unknown fleetbus-wmi script {kind}\r\n".encode())
        return 1

    def _ps_get(self, cmd: Command, params: dict[str, Any], out: Callable[[Any], None]) -> int:
        path = self.local_path(params["Path"])
        if path.is_dir():
            out({"ok": False, "code": "invalid_request", "message": f"is a directory: {params['Path']}"})
            return 1
        if not path.is_file():
            out({"ok": False, "code": "not_found", "message": f"no such file: {params['Path']}"})
            return 1
        chunk = int(params["Chunk"])
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            out({"ok": True, "size": size})
            f.seek(int(params["Offset"]))
            remaining = size - int(params["Offset"])
            while remaining > 0:
                data = f.read(min(chunk, remaining))
                if not data:
                    break
                cmd.write("stdout", base64.b64encode(data) + b"\r\n")
                remaining -= len(data)
        cmd.write("stdout", b".\r\n")
        return 0

    def _ps_put(self, cmd: Command, params: dict[str, Any], out: Callable[[Any], None]) -> int:
        path = self.local_path(params["Path"])
        temp = self.local_path(params["Temp"])
        if path.is_dir():
            out({"ok": False, "code": "invalid_request", "message": f"is a directory: {params['Path']}"})
            return 1
        if not path.parent.is_dir():
            if not params["MakeParents"]:
                out({"ok": False, "code": "not_found", "message": f"no such directory: {path.parent}"})
                return 1
            path.parent.mkdir(parents=True)
        sha = hashlib.sha256()
        written = 0
        with open(temp, "xb") as f:
            try:
                for line in cmd.stdin_lines():
                    if not line:
                        continue
                    data = base64.b64decode(line, validate=True)
                    f.write(data)
                    sha.update(data)
                    written += len(data)
            except ValueError as exc:
                f.close()
                temp.unlink()
                out({"ok": False, "code": "transport_error", "message": f"bad base64: {exc}"})
                return 1
        size = int(params["Size"])
        if size >= 0 and written != size:
            temp.unlink()
            out({"ok": False, "code": "transport_error",
                 "message": f"size mismatch: expected {size} bytes, received {written}"})
            return 1
        os.replace(temp, path)
        out({"ok": True, "size": written, "sha256": sha.hexdigest()})
        return 0

    # Receive / Send / Signal -------------------------------------------------------------
    def _find_command(self, shell: Shell, command_id: str | None) -> Command:
        with self.lock:
            cmd = shell.commands.get(command_id or "")
        if cmd is None:
            raise Fault(f"The command {command_id} was not found in the shell.", 2150858843,
                        "w:InvalidSelectors", "s:Sender")
        return cmd

    def _receive(self, root: ET.Element, shell_id: str | None, message_id: str | None,
                 timeout_s: float, maxenv: int) -> bytes:
        shell = self._shell(shell_id)
        desired = root.find("s:Body/rsp:Receive/rsp:DesiredStream", NS)
        cmd = self._find_command(shell, desired.get("CommandId") if desired is not None else None)
        budget = max(1024, (maxenv - 4096) * 3 // 4)
        taken = cmd.take(budget, timeout_s, self.stopping)
        if taken is None:
            self.record("ReceiveTimeout", shell.id, cmd.id)
            raise Fault("The WS-Management service cannot complete the operation within the time specified "
                        "in OperationTimeout.", FAULT_RECEIVE_TIMEOUT, "w:TimedOut")
        parts, done = taken
        if parts:
            cmd.receives_with_data += 1
        streams = "".join(
            f'<rsp:Stream Name="{name}" CommandId="{cmd.id}">{base64.b64encode(data).decode()}</rsp:Stream>'
            for name, data in parts)
        if done:
            streams += (f'<rsp:Stream Name="stdout" CommandId="{cmd.id}" End="true"></rsp:Stream>'
                        f'<rsp:Stream Name="stderr" CommandId="{cmd.id}" End="true"></rsp:Stream>')
            state = (f'<rsp:CommandState CommandId="{cmd.id}" State="{STATE_DONE}">'
                     f"<rsp:ExitCode>{cmd.exit_code}</rsp:ExitCode></rsp:CommandState>")
        else:
            state = f'<rsp:CommandState CommandId="{cmd.id}" State="{STATE_RUNNING}"/>'
        self.record("Receive", shell.id, cmd.id, {"bytes": sum(len(d) for _, d in parts), "done": done})
        return _envelope(SHELL_NS + "/ReceiveResponse", message_id,
                         f'<rsp:ReceiveResponse SequenceID="0">{streams}{state}</rsp:ReceiveResponse>')

    def _send(self, root: ET.Element, shell_id: str | None, message_id: str | None) -> bytes:
        shell = self._shell(shell_id)
        stream = root.find("s:Body/rsp:Send/rsp:Stream", NS)
        if stream is None:
            raise Fault("The Send request has no rsp:Stream.", None, "w:SchemaValidationError", "s:Sender")
        cmd = self._find_command(shell, stream.get("CommandId"))
        data = base64.b64decode((stream.text or "").strip())
        end = (stream.get("End") or "").lower() == "true"
        self.record("Send", shell.id, cmd.id, {"bytes": len(data), "end": end})
        try:
            cmd.send(data, end)
        except (BrokenPipeError, ValueError, OSError):
            raise Fault("The pipe is being closed. ", 232) from None
        return _envelope(SHELL_NS + "/SendResponse", message_id, "<rsp:SendResponse/>")

    def _signal(self, root: ET.Element, shell_id: str | None, message_id: str | None) -> bytes:
        shell = self._shell(shell_id)
        body = root.find("s:Body/rsp:Signal", NS)
        if body is None:
            raise Fault("The Signal request has no rsp:Signal.", None, "w:SchemaValidationError", "s:Sender")
        cmd = self._find_command(shell, body.get("CommandId"))
        code = (_text(body, "rsp:Code") or "").strip()
        self.record("Signal", shell.id, cmd.id, code)
        if code == SIGNAL_TERMINATE:
            cmd.kill()
            with self.lock:
                shell.commands.pop(cmd.id, None)
            self._finished.append(cmd)
        elif code == SIGNAL_CTRL_C:
            cmd.kill(signal.SIGINT)
        return _envelope(SHELL_NS + "/SignalResponse", message_id, "<rsp:SignalResponse/>")

    def _fault(self, message_id: str | None, fault: Fault) -> tuple[int, bytes]:
        self.record("Fault", detail={"code": fault.code, "reason": fault.reason})
        detail = ""
        if fault.code is not None:
            detail = (f'<s:Detail><f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" '
                      f'Code="{fault.code}" Machine="127.0.0.1"><f:Message>{escape(fault.reason)}</f:Message>'
                      "</f:WSManFault></s:Detail>")
        body = (f"<s:Fault><s:Code><s:Value>{fault.value}</s:Value><s:Subcode><s:Value>{fault.subcode}"
                f'</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">{escape(fault.reason)}'
                f"</s:Text></s:Reason>{detail}</s:Fault>")
        return fault.http, _envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", message_id, body)


# --------------------------------------------------------------------------- helpers

def _text(node: ET.Element | None, path: str) -> str | None:
    if node is None:
        return None
    found = node.find(path, NS)
    return found.text if found is not None and found.text is not None else None


def _duration(text: str | None, default: float) -> float:
    match = re.fullmatch(r"PT(\d+(?:\.\d+)?)S", (text or "").strip())
    return float(match.group(1)) if match else default


def _envelope(action: str, relates_to: str | None, body: str) -> bytes:
    relates = f"<a:RelatesTo>{escape(relates_to)}</a:RelatesTo>" if relates_to else ""
    return (
        '<s:Envelope xml:lang="en-US" xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
        'xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" '
        'xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" '
        f'xmlns:rsp="{SHELL_NS}" xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd">'
        f"<s:Header><a:Action>{action}</a:Action><a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
        "<a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>"
        f"{relates}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def _identify_response() -> bytes:
    return (
        b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        b'xmlns:wsmid="http://schemas.dmtf.org/wbem/wsman/identity/1/wsmanidentity.xsd">'
        b"<s:Header/><s:Body><wsmid:IdentifyResponse>"
        b"<wsmid:ProtocolVersion>http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd</wsmid:ProtocolVersion>"
        b"<wsmid:ProductVendor>Microsoft Corporation</wsmid:ProductVendor>"
        b"<wsmid:ProductVersion>OS: 10.0.20348 SP: 0.0 Stack: 3.0</wsmid:ProductVersion>"
        b"</wsmid:IdentifyResponse></s:Body></s:Envelope>"
    )


class _Handler(BaseHTTPRequestHandler):
    """One client connection: TLS, authentication state, message encryption."""

    protocol_version = "HTTP/1.1"
    wsman: WsmanServer

    def setup(self) -> None:
        server = self.wsman
        # Headers and body go out in separate writes: without this, Nagle's algorithm
        # and the client's delayed ACK add 40 ms to every response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server._ssl is not None:
            self.request.settimeout(10)
            self.request = server._ssl.wrap_socket(self.request, server_side=True)
            self.request.settimeout(None)
        with server.lock:
            server._connections.add(self.request)
        self.ntlm: Any = None
        self.ntlm_user: str | None = None
        self.ntlm_pending: Any = None
        super().setup()

    def finish(self) -> None:
        with self.wsman.lock:
            self.wsman._connections.discard(self.request)
        try:
            super().finish()
        except OSError:
            pass
        if self.wsman._ssl is not None:
            self.request.close()  # the TLS socket replaced the one socketserver closes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
               content_type: str = "application/soap+xml;charset=UTF-8") -> None:
        self.send_response(status)
        for name, value in headers or []:
            self.send_header(name, value)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _challenge(self, token: str | None = None, scheme: str = "Negotiate") -> None:
        server = self.wsman
        headers: list[tuple[str, str]] = []
        if token is not None:
            headers.append(("WWW-Authenticate", f"{scheme} {token}"))
        else:
            if "ntlm" in server.auth:
                headers.append(("WWW-Authenticate", "Negotiate"))
            if "basic" in server.auth:
                headers.append(("WWW-Authenticate", 'Basic realm="WSMAN"'))
        self._reply(401, headers=headers)

    def do_POST(self) -> None:
        server = self.wsman
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        authorization = self.headers.get("Authorization") or ""
        scheme, _, value = authorization.partition(" ")
        user: str | None = None
        if scheme.lower() == "basic" and "basic" in server.auth:
            try:
                name, _, password = base64.b64decode(value).decode("utf-8").partition(":")
            except ValueError:
                name, password = "", ""
            if name in server.users and server.users[name] == password:
                user = name
            else:
                server.auth_failures += 1
                server.record("AuthFailed", detail="basic")
                self._challenge()
                return
        elif scheme.lower() in ("negotiate", "ntlm") and "ntlm" in server.auth and value:
            import spnego
            from spnego.channel_bindings import GssChannelBindings

            token = base64.b64decode(value)
            try:
                if token[8:12] == b"\x01\x00\x00\x00" or self.ntlm_pending is None:
                    cbt = GssChannelBindings(application_data=server._cbt) if server._cbt else None
                    self.ntlm_pending = spnego.server(protocol="ntlm", channel_bindings=cbt)
                    self.ntlm, self.ntlm_user = None, None
                out = self.ntlm_pending.step(token)
            except Exception:  # any NTLM failure is a refused login
                self.ntlm_pending = None
                server.auth_failures += 1
                server.record("AuthFailed", detail="ntlm")
                self._challenge()
                return
            if not self.ntlm_pending.complete:
                self._challenge(base64.b64encode(out or b"").decode(), scheme)
                return
            self.ntlm, self.ntlm_pending = self.ntlm_pending, None
            self.ntlm_user = self.ntlm.client_principal or ""
            user = self.ntlm_user
        elif self.ntlm is not None:
            user = self.ntlm_user  # NTLM authenticates the connection (like HTTP.sys)
        if user is None:
            self._challenge()
            return
        if not body:
            self._reply(200)  # pywinrm's empty POST that sets up message encryption
            return
        encrypted = (self.headers.get("Content-Type") or "").startswith("multipart/encrypted")
        if encrypted:
            if self.ntlm is None:
                self._reply(400)
                return
            body = _decrypt(self.ntlm, body)
        status, reply = server.handle_soap(body, user)
        if encrypted:
            self._reply(status, _encrypt(self.ntlm, reply),
                        content_type=f'multipart/encrypted;protocol="{ENCRYPTED_PROTOCOL}";'
                                     'boundary="Encrypted Boundary"')
        else:
            self._reply(status, reply)


def _decrypt(ctx: Any, body: bytes) -> bytes:
    parts = [p for p in body.split(BOUNDARY + b"\r\n") if p]
    message = b""
    for i in range(0, len(parts) - 1, 2):
        payload = parts[i + 1]
        payload = payload.removesuffix(BOUNDARY + b"--\r\n")
        payload = payload.replace(b"\tContent-Type: application/octet-stream\r\n", b"", 1)
        sig_len = struct.unpack("<i", payload[:4])[0]
        message += ctx.unwrap(payload[4: 4 + sig_len] + payload[4 + sig_len:]).data
    return message


def _encrypt(ctx: Any, message: bytes) -> bytes:
    wrapped = ctx.wrap(message, encrypt=True).data
    signature, sealed = wrapped[:16], wrapped[16:]
    return (BOUNDARY + b"\r\n\tContent-Type: " + ENCRYPTED_PROTOCOL.encode() + b"\r\n"
            b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=" + str(len(message)).encode()
            + b"\r\n" + BOUNDARY + b"\r\n\tContent-Type: application/octet-stream\r\n"
            + struct.pack("<i", len(signature)) + signature + sealed + BOUNDARY + b"--\r\n")


__all__ = ["WsmanServer", "cmd_c", "free_port", "make_certs", "split_command_line"]
