"""The agent's inbound mode: ``--allow-path``, its TLS identity, and ``fleetbus-agent listen``
as a real separate process that a controller reaches over real TLS on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fleetbus_agent import tlsid
from fleetbus_agent.listen import ListenOptions
from fleetbus_agent.paths import PathPolicy
from fleetbus_agent.tlsid import TLSIdentityError, key_password, load_identity
from fleetbus_base import wire as protocol
from fleetbus_base.ops import OpError
from fleetbus_base.wire import AuthError, Connection, Event, HandshakeError, StreamError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the agent is POSIX only")

AGENT = Path(sys.executable).parent / "fleetbus-agent"
DEADLINE_S = 5.0
# One deadline for TLS and the proof together (from the handshake slot): short enough to
# keep the silent-peer tests quick, long enough for a TLS handshake on a busy machine.
HANDSHAKE_TIMEOUT_S = 2.0
HAVE_OPENSSL = shutil.which("openssl") is not None
HAVE_INBOUND = all(
    hasattr(protocol, name)
    for name in ("agent_accept_handshake", "controller_connect_handshake", "inbound_proof")
)

needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="the openssl command is not installed")
needs_inbound = pytest.mark.skipif(
    not HAVE_INBOUND,
    reason="fleetbus_base.wire has no inbound handshake yet "
    "(agent_accept_handshake / controller_connect_handshake)",
)


# ----------------------------------------------------------------------------- paths


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with a sibling that shares its name as a prefix, and an outside dir."""
    root = tmp_path / "srv"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file").write_text("inside")
    (tmp_path / "srv2").mkdir()
    (tmp_path / "srv2" / "file").write_text("prefix trick")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    return {"tmp": tmp_path, "root": root, "outside": outside}


def refused(excinfo: pytest.ExceptionInfo[OpError], path: str, root: Path) -> None:
    assert excinfo.value.code == "invalid_request"
    assert excinfo.value.message == (
        f"{path} is outside the allowed paths ({os.path.realpath(root)})"
    )
    assert "\n" not in excinfo.value.message


def test_path_must_be_absolute(tree: dict[str, Path]) -> None:
    policy = PathPolicy([str(tree["root"])])
    for check in (policy.check_read, policy.check_write):
        with pytest.raises(OpError) as excinfo:
            check("srv/sub/file")
        assert excinfo.value.code == "invalid_request"
        assert "absolute" in excinfo.value.message
    with pytest.raises(ValueError):
        PathPolicy(["relative/root"])


def test_prefix_of_a_root_is_not_inside_it(tree: dict[str, Path]) -> None:
    policy = PathPolicy([str(tree["root"])])
    path = str(tree["tmp"] / "srv2" / "file")
    with pytest.raises(OpError) as excinfo:
        policy.check_read(path)
    refused(excinfo, path, tree["root"])
    with pytest.raises(OpError) as excinfo:
        policy.check_write(path)
    refused(excinfo, path, tree["root"])
    inside = str(tree["root"] / "sub" / "file")
    assert policy.check_read(inside) == inside
    assert policy.check_write(inside) == inside


def test_dotdot_escapes_are_refused(tree: dict[str, Path]) -> None:
    policy = PathPolicy([str(tree["root"])])
    existing = f"{tree['root']}/sub/../../outside/secret"
    missing = f"{tree['root']}/nope/../../outside/new"
    deeper = f"{tree['root']}/new1/new2/../../../outside/new"
    for path in (existing, missing):
        with pytest.raises(OpError) as excinfo:
            policy.check_read(path)
        refused(excinfo, path, tree["root"])
    for path in (existing, missing, deeper):
        with pytest.raises(OpError) as excinfo:
            policy.check_write(path)
        refused(excinfo, path, tree["root"])
    # .. that stays inside is fine
    assert policy.check_read(f"{tree['root']}/sub/../sub/file")


def test_symlink_escape_for_read(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "link").symlink_to(tree["outside"] / "secret")
    (root / "dirlink").symlink_to(tree["outside"])
    (root / "good").symlink_to(root / "sub" / "file")
    policy = PathPolicy([str(root)])
    for path in (str(root / "link"), str(root / "dirlink" / "secret")):
        with pytest.raises(OpError) as excinfo:
            policy.check_read(path)
        refused(excinfo, path, root)
    assert policy.check_read(str(root / "good"))


def test_symlinked_parent_dir_escape_for_write(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "dirlink").symlink_to(tree["outside"])
    (root / "dangling").symlink_to(tree["outside"] / "not-yet")
    policy = PathPolicy([str(root)])
    for path in (
        str(root / "dirlink" / "new-file"),
        str(root / "dirlink" / "newdir" / "new-file"),
        str(root / "dangling" / "new-file"),
    ):
        with pytest.raises(OpError) as excinfo:
            policy.check_write(path)
        refused(excinfo, path, root)


def test_symlink_target_escape_for_write(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "link").symlink_to(tree["outside"] / "secret")
    (root / "good").symlink_to(root / "sub" / "file")
    policy = PathPolicy([str(root)])
    with pytest.raises(OpError) as excinfo:
        policy.check_write(str(root / "link"))
    refused(excinfo, str(root / "link"), root)
    assert policy.check_write(str(root / "good"))


def test_nonexistent_nested_dirs_inside_a_root_are_allowed(tree: dict[str, Path]) -> None:
    root = tree["root"]
    policy = PathPolicy([str(root)])
    path = str(root / "a" / "b" / "c" / "file.txt")
    assert policy.check_write(path) == path
    assert policy.check_read(path) == path  # get then fails with not_found, not here


def test_roots_are_resolved_and_several_are_allowed(tree: dict[str, Path]) -> None:
    alias = tree["tmp"] / "alias"
    alias.symlink_to(tree["root"])
    policy = PathPolicy([str(alias), str(tree["outside"])])
    assert policy.roots == [str(tree["root"].resolve()), str(tree["outside"].resolve())]
    assert policy.check_read(str(tree["root"] / "sub" / "file"))
    assert policy.check_write(str(tree["outside"] / "secret"))
    with pytest.raises(OpError):
        policy.check_read(str(tree["tmp"] / "srv2" / "file"))


def test_empty_policy_allows_everything(tree: dict[str, Path]) -> None:
    policy = PathPolicy([])
    assert not policy
    for path in ("/etc/passwd", str(tree["outside"] / "secret"), "/nonexistent/x"):
        assert policy.check_read(path) == path
        assert policy.check_write(path) == path


# ---------------------------------------------------------------------- TLS identity


@needs_openssl
def test_identity_is_created_once_with_an_encrypted_key(tmp_path: Path) -> None:
    key = secrets.token_urlsafe(32)
    first = load_identity(key, tls_dir=str(tmp_path / "tls"))
    assert first.created
    cert, private = Path(first.cert_file), Path(first.key_file)
    assert cert.name == "agent-tls.pem" and private.name == "agent-tls.key"
    assert "ENCRYPTED" in private.read_text()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert first.fingerprint.startswith("sha256:") and len(first.fingerprint) == 7 + 64
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert first.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert key not in repr(first) and key_password(key) not in repr(first)
    assert key not in repr(ListenOptions(key=key, tls_dir=str(tmp_path / "tls")))
    assert [p.name for p in (tmp_path / "tls").iterdir() if p.name.startswith(".")] == []

    again = load_identity(key, tls_dir=str(tmp_path / "tls"))
    assert not again.created
    assert again.fingerprint == first.fingerprint
    assert isinstance(again.server_context(), ssl.SSLContext)


@needs_openssl
def test_wrong_server_key_fails_clearly_and_new_cert_recovers(tmp_path: Path) -> None:
    tls_dir = str(tmp_path)
    old = load_identity("old key", tls_dir=tls_dir)
    with pytest.raises(TLSIdentityError) as excinfo:
        load_identity("new key", tls_dir=tls_dir)
    message = str(excinfo.value)
    assert "--new-cert" in message and "\n" not in message
    assert "new key" not in message and key_password("new key") not in message

    fresh = load_identity("new key", tls_dir=tls_dir, new_cert=True)
    assert fresh.created and fresh.fingerprint != old.fingerprint
    assert load_identity("new key", tls_dir=tls_dir).fingerprint == fresh.fingerprint


@needs_openssl
def test_password_goes_to_openssl_through_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "the server key " + secrets.token_hex(8)
    password = key_password(key)
    monkeypatch.setenv("FLEETBUS_AGENT_KEY", key)
    calls: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def recording_run(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        env = kwargs.get("env")
        assert env is not None, "openssl must get an explicit environment"
        calls.append((list(argv), dict(env)))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(tlsid.subprocess, "run", recording_run)
    load_identity(key, tls_dir=str(tmp_path), new_cert=True)
    assert len(calls) == 2
    for argv, env in calls:
        assert Path(argv[0]).name == "openssl"
        joined = " ".join(argv)
        assert password not in joined and key not in joined
        assert any(arg.startswith("env:") for arg in argv)
        assert password in env.values()
        assert "FLEETBUS_AGENT_KEY" not in env  # the agent's own key never reaches openssl
    assert password not in os.environ.values()


def test_missing_openssl_is_named_with_the_alternative(tmp_path: Path) -> None:
    with pytest.raises(TLSIdentityError) as excinfo:
        load_identity("k", tls_dir=str(tmp_path), openssl=str(tmp_path / "no-openssl"))
    message = str(excinfo.value)
    assert "openssl" in message and "--cert FILE --key FILE" in message


@needs_openssl
def test_operator_provided_certificate(tmp_path: Path) -> None:
    key = "server key"
    plain = tmp_path / "plain.key"
    cert = tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(plain), "-out", str(cert), "-days", "1", "-subj", "/CN=ops"],
        check=True, capture_output=True,
    )
    identity = load_identity(key, cert_file=str(cert), key_file=str(plain))
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert identity.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert identity.provided and not identity.created

    # Encrypted with the derived password (as docs/agents.md shows): accepted.
    encrypted = tmp_path / "enc.key"
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", str(plain),
         "-out", str(encrypted), "-passout", "env:PASS"],
        check=True, capture_output=True, env=dict(os.environ, PASS=key_password(key)),
    )
    assert load_identity(key, cert_file=str(cert), key_file=str(encrypted)).fingerprint == (
        identity.fingerprint
    )
    with pytest.raises(TLSIdentityError) as excinfo:
        load_identity("another key", cert_file=str(cert), key_file=str(encrypted))
    assert "password derived from the server key" in str(excinfo.value)


# ------------------------------------------------------------- the listening process


def write_key(path: Path, key: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, key.encode() + b"\n")
    os.close(fd)
    os.chmod(path, mode)
    return path


def agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}


@dataclass
class ListeningAgent:
    """`fleetbus-agent listen` as a separate process, its stdout read by a thread."""

    workdir: Path
    key: str
    allow: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    fingerprint: str = ""
    port: int = 0
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start(self) -> ListeningAgent:
        key_file = write_key(self.workdir / "etc" / "key", self.key)
        args = [str(AGENT), "listen", "--bind", "127.0.0.1", "--port", "0",
                "--key-file", str(key_file), "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S)]
        for path in self.allow:
            args += ["--allow-path", str(path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, env=agent_env())
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 15
        while not (self.fingerprint and self.port):
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise AssertionError(f"the agent did not start:\n{self.log()}")
            if line.startswith("fingerprint "):
                self.fingerprint = line.split(" ", 1)[1]
            elif line.startswith("listening on "):
                self.port = int(line.rpartition(":")[2])
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=DEADLINE_S + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    (root / "existing.txt").write_bytes(b"already here\n")
    return root


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, files_root: Path) -> Iterator[ListeningAgent]:
    if not HAVE_OPENSSL:
        pytest.skip("the openssl command is not installed")
    running = ListeningAgent(tmp_path_factory.mktemp("agent"), secrets.token_urlsafe(32),
                             allow=[files_root]).start()
    yield running
    code = running.stop()
    assert code == 0, running.log()
    assert "Traceback" not in running.log()
    assert running.key not in running.log()


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below instead
    return ctx


async def open_tls(port: int, fingerprint: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                server_hostname="localhost"),
        DEADLINE_S,
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert "sha256:" + hashlib.sha256(der).hexdigest() == fingerprint
    return reader, writer


async def connect(agent: ListeningAgent, key: str | None = None) -> Connection:
    reader, writer = await open_tls(agent.port, agent.fingerprint)
    accepted = await protocol.controller_connect_handshake(
        reader, writer, key=key or agent.key, agent_fingerprint=agent.fingerprint,
        server="db1", heartbeat_s=5.0,
    )
    conn = Connection.from_accepted(reader, writer, accepted)
    conn.start()
    return conn


@contextlib.asynccontextmanager
async def controller(agent: ListeningAgent) -> AsyncIterator[Connection]:
    conn = await connect(agent)
    try:
        yield conn
    finally:
        await conn.close("test done")


async def collect(stream: Any) -> list[Event]:
    async def run() -> list[Event]:
        return [event async for event in stream.events()]

    return await asyncio.wait_for(run(), DEADLINE_S)


def final(events: list[Event]) -> Event:
    assert events and events[-1].kind in ("done", "fail"), events
    return events[-1]


@needs_inbound
async def test_ping_and_exec_over_the_wire(agent: ListeningAgent) -> None:
    async with controller(agent) as conn:
        assert final(await collect(conn.open_stream("ping"))).kind == "done"
        events = await collect(conn.open_stream("exec", {"argv": ["sh", "-c", "echo hi; echo err >&2"]}))
        assert final(events).kind == "done", events
        assert final(events).result["exit_code"] == 0
        out = b"".join(e.body for e in events if e.kind == "out" and e.stream == "stdout")
        err = b"".join(e.body for e in events if e.kind == "out" and e.stream == "stderr")
        assert (out, err) == (b"hi\n", b"err\n")
        info = final(await collect(conn.open_stream("info")))
        assert info.kind == "done" and info.result["hostname"]


@needs_inbound
async def test_several_controllers_at_once(agent: ListeningAgent) -> None:
    async with controller(agent) as one, controller(agent) as two:
        first, second = await asyncio.gather(
            collect(one.open_stream("exec", {"argv": ["echo", "one"]})),
            collect(two.open_stream("exec", {"argv": ["echo", "two"]})),
        )
        assert final(first).kind == final(second).kind == "done"
        assert b"".join(e.body for e in first if e.kind == "out") == b"one\n"
        assert b"".join(e.body for e in second if e.kind == "out") == b"two\n"


@needs_inbound
async def test_wrong_key_is_refused(agent: ListeningAgent) -> None:
    with pytest.raises(AuthError):
        await asyncio.wait_for(connect(agent, key="not the key"), DEADLINE_S)
    # One failure is no lockout: the right key still gets in.
    async with controller(agent) as conn:
        assert final(await collect(conn.open_stream("ping"))).kind == "done"
    deadline = time.monotonic() + DEADLINE_S
    while "controller authentication from 127.0.0.1 failed (wrong_proof)" not in agent.log():
        assert time.monotonic() < deadline, agent.log()
        await asyncio.sleep(0.02)
    assert "not the key" not in agent.log()


@needs_inbound
async def test_silent_controller_is_dropped(agent: ListeningAgent) -> None:
    started = time.monotonic()
    reader, writer = await open_tls(agent.port, agent.fingerprint)
    try:
        async def until_eof() -> None:
            while await reader.read(65536):
                pass  # the challenge; we never answer it

        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(until_eof(), HANDSHAKE_TIMEOUT_S + 3)
    finally:
        writer.transport.abort()
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 3


async def test_silent_tcp_client_is_dropped(agent: ListeningAgent) -> None:
    # Not even a TLS hello: dropped by the TLS handshake timeout.
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(1), HANDSHAKE_TIMEOUT_S + 3) == b""
    finally:
        writer.close()
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 3


async def put(conn: Connection, path: str, data: bytes) -> Event:
    stream = conn.open_stream("put", {"path": path, "mode": 0o640, "size": len(data)})
    with contextlib.suppress(StreamError):  # a refused put may end before we finish sending
        await stream.send(data)
        await stream.send_eof()
    return final(await collect(stream))


async def get(conn: Connection, path: str) -> tuple[Event, bytes]:
    events = await collect(conn.open_stream("get", {"path": path}))
    return final(events), b"".join(e.body for e in events if e.kind == "data")


@needs_inbound
async def test_put_and_get_respect_allow_path(
    agent: ListeningAgent, files_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (files_root / "escape").symlink_to(outside)
    root = os.path.realpath(files_root)
    async with controller(agent) as conn:
        for path in (str(outside / "new.txt"), str(files_root / "escape" / "new.txt"),
                     f"{files_root}/../{outside.name}/new.txt"):
            event = await put(conn, path, b"nope")
            assert event.kind == "fail", event
            assert event.error == {
                "code": "invalid_request",
                "message": f"{path} is outside the allowed paths ({root})",
            }
        assert sorted(os.listdir(outside)) == ["secret"]
        for path in (str(outside / "secret"), str(files_root / "escape" / "secret"), "/etc/hostname"):
            event, data = await get(conn, path)
            assert event.kind == "fail" and event.error["code"] == "invalid_request", event
            assert "outside the allowed paths" in event.error["message"] and data == b""

        target = files_root / "app" / "conf" / "new.txt"
        event = await put(conn, str(target), b"hello inbound\n")
        assert event.kind == "done", event
        assert target.read_bytes() == b"hello inbound\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        event, data = await get(conn, str(target))
        assert event.kind == "done" and data == b"hello inbound\n"
        event, data = await get(conn, str(files_root / "existing.txt"))
        assert event.kind == "done" and data == b"already here\n"
        # exec is not restricted by --allow-path
        events = await collect(conn.open_stream("exec", {"argv": ["cat", str(outside / "secret")]}))
        assert final(events).kind == "done"


@needs_inbound
async def test_lockout_then_stop_cancels_what_runs(tmp_path: Path) -> None:
    running = ListeningAgent(tmp_path, secrets.token_urlsafe(32)).start()
    try:
        for _ in range(5):  # FailureThrottle's default limit
            with pytest.raises(AuthError):
                await asyncio.wait_for(connect(running, key="wrong"), DEADLINE_S)
        # Locked out: even the right key is dropped before any handshake.
        with pytest.raises((HandshakeError, ConnectionError, ssl.SSLError, OSError)):
            await asyncio.wait_for(connect(running), DEADLINE_S)
        assert "locked out" in running.log()
    finally:
        code = running.stop()
    assert code == 0, running.log()


@needs_inbound
async def test_stop_tells_controllers_and_cancels_operations(tmp_path: Path) -> None:
    running = ListeningAgent(tmp_path, secrets.token_urlsafe(32)).start()
    try:
        conn = await connect(running)
        marker = tmp_path / "still-running"
        stream = conn.open_stream("exec", {"argv": ["sh", "-c", f"echo started; sleep 30; touch {marker}"]})
        events = stream.events()
        first = await asyncio.wait_for(events.__anext__(), DEADLINE_S)
        assert first.kind == "out" and first.body == b"started\n"
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        rest = await asyncio.wait_for(_rest(events), DEADLINE_S)
        assert rest[-1].kind == "fail" and rest[-1].error["code"] == "server_offline", rest
        assert "stopping" in rest[-1].error["message"]
        await asyncio.wait_for(conn.wait_closed(), DEADLINE_S)
        assert running.proc.wait(timeout=DEADLINE_S) == 0  # type: ignore[union-attr]
        assert time.monotonic() - started < DEADLINE_S
        assert not marker.exists()
    finally:
        running.stop(signal.SIGKILL)
    assert "Traceback" not in running.log()


async def _rest(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


# ---------------------------------------------------------------- CLI refusals


def run_cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGENT), *args], capture_output=True, text=True, timeout=timeout,
                          env=agent_env(), stdin=subprocess.DEVNULL, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("fleetbus-agent: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key", "k" * 32, mode=0o644)
    proc = run_cli("listen", "--bind", "127.0.0.1", "--port", "0", "--key-file", str(key_file))
    assert_one_line_error(proc, "readable by other users", "chmod 600")
    assert not (tmp_path / "agent-tls.key").exists()


@needs_openssl
def test_changed_server_key_asks_for_new_cert(tmp_path: Path) -> None:
    load_identity("the old key", tls_dir=str(tmp_path))
    key_file = write_key(tmp_path / "key", "the new key")
    proc = run_cli("listen", "--bind", "127.0.0.1", "--port", "0", "--key-file", str(key_file))
    assert_one_line_error(proc, "--new-cert")
    assert "the new key" not in proc.stderr


def test_listen_usage_errors(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key", "k" * 32)
    proc = run_cli("listen", "--key-file", str(key_file), "--allow-path", "relative/dir")
    assert_one_line_error(proc, "--allow-path", "absolute")
    proc = run_cli("listen", "--key-file", str(key_file), "--cert", str(tmp_path / "c.pem"))
    assert_one_line_error(proc, "--cert", "--key")
    proc = run_cli("listen", "--port", "0")
    assert_one_line_error(proc, "FLEETBUS_AGENT_KEY")


@needs_openssl
def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        key_file = write_key(tmp_path / "key", "k" * 32)
        proc = run_cli("listen", "--bind", "127.0.0.1", "--port", str(busy.getsockname()[1]),
                       "--key-file", str(key_file))
    assert_one_line_error(proc, "cannot listen on 127.0.0.1:")
