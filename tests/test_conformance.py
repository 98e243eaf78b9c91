"""fleetbus.testing's conformance suite run against every built-in transport and the example.

Each class below opens real sessions the way a plugin author's own tests would: the
local transport on this host, ssh against a real sshd, agent-inbound and agent-outbound
against real ``fleetbus-agent`` processes, wmi against the tests' WS-Management server,
and the example plugin's echo transport from its source folder. What a transport lacks
(``lacks``) or knowingly breaks (``known_gaps``) is declared on its class with the reason.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from fleetbus import testing
from fleetbus.errors import NotFound
from fleetbus.records import Server
from fleetbus.testing import CollectingSink, FakeContext, TransportConformance
from fleetbus.transport import Credential, Session
from fleetbus_agent.tlsid import create_identity
from fleetbus_agents.inbound.transport import InboundTransport
from fleetbus_agents.link import AgentSession
from fleetbus_base.wire import AuthError, Connection, controller_handshake
from fleetbus_local.transport import LocalTransport
from fleetbus_ssh.transport import SshTransport
from fleetbus_wmi.transport import WmiTransport
from support.agents import AGENT, Agent
from support.processes import own_user, stop_process, wait_for
from support.sshd import KeyPair, Sshd, generate_key, require_sshd
from support.wsman_server import WsmanServer, make_certs

PY = (sys.executable,)
AGENT_GAPS: dict[str, str] = {}


class TestLocal(TransportConformance):
    python = PY

    @pytest.fixture
    async def session(self) -> AsyncIterator[Session]:
        # As the tests' own user: the default (nobody) may not enter pytest's tmp folders.
        async with FakeContext("local", {"user": own_user()}) as ctx:
            session = await LocalTransport(ctx).open(Server(name="here", transport="local"), None)
            yield session
            await session.close()


# ------------------------------------------------------------------------------- ssh


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, KeyPair]]:
    require_sshd()
    base = tmp_path_factory.mktemp("conformance-ssh")
    key = generate_key(base, "id_ed25519")
    server = Sshd(base / "sshd")
    server.authorize(key.public)
    server.start()
    yield server, key
    server.stop()


class TestSsh(TransportConformance):
    python = PY

    @pytest.fixture
    async def session(self, sshd: tuple[Sshd, KeyPair]) -> AsyncIterator[Session]:
        server, key = sshd
        credential = Credential(name="key", type="ssh-key", user="root", secret=key.private)
        record = Server(name="web1", transport="ssh", host=server.host, port=server.port, credential="key",
                        options={"host_key": server.host_key_line})
        async with FakeContext("ssh", servers={"web1": record}, credentials={"key": credential}) as ctx:
            session = await SshTransport(ctx).open(record, credential)
            yield session
            await session.close()


# ------------------------------------------------------------------------------- agent-inbound


@dataclass
class Listener:
    """A real ``fleetbus-agent listen`` on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    fingerprint: str
    key: str


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    workdir = tmp_path_factory.mktemp("conformance-listen")
    key = secrets.token_urlsafe(32)
    key_file = workdir / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    out = workdir / "agent.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    with open(workdir / "agent.log", "ab") as log, open(out, "wb") as stdout:
        proc = subprocess.Popen([AGENT, "listen", "--bind", "127.0.0.1", "--port", "0", "--key-file", str(key_file)],
                                stdout=stdout, stderr=log, stdin=subprocess.DEVNULL, env=env)

    def ready() -> tuple[int, str] | None:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "agent.log").read_text())
        text = out.read_text()
        fp = re.search(r"fingerprint (sha256:[0-9a-f]{64})", text)
        port = re.search(r"listening on [^\s]*:(\d+)", text)
        return (int(port.group(1)), fp.group(1)) if fp and port else None

    try:
        port, fp = wait_for(ready, what="agent listening")
        yield Listener(proc, port, fp, key)
    finally:
        stop_process(proc)


class TestAgentInbound(TransportConformance):
    python = PY
    known_gaps = AGENT_GAPS

    @pytest.fixture
    async def session(self, listener: Listener) -> AsyncIterator[Session]:
        credential = Credential(name="db1-key", type="agent-key", user=None, secret=listener.key.encode())
        record = Server(name="db1", transport="agent-inbound", host="127.0.0.1", port=listener.port,
                        credential="db1-key", options={"fingerprint": listener.fingerprint})
        async with FakeContext("agent-inbound") as ctx:
            session = await InboundTransport(ctx).open(record, credential)
            yield session
            await session.close()


# ------------------------------------------------------------------------------- agent-outbound


@dataclass
class Gateway:
    """A minimal gateway: the TLS listener and handshake an agent dials, holding one link.

    It runs the controller's half of the real handshake (``controller_handshake``) and
    wraps the link in the same ``AgentSession`` that ``GatewayTransport.open`` returns;
    the real GatewayTransport needs the core's buckets and is driven end to end by
    tests/test_agent_outbound.py.
    """

    links: asyncio.Queue[Connection]
    server: asyncio.Server
    agent: Agent


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    workdir = tmp_path_factory.mktemp("conformance-gateway")
    key = f"fbk1_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    identity = await asyncio.to_thread(create_identity, str(workdir / "tls"), key, hostname="localhost")
    links: asyncio.Queue[Connection] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def authenticate(hello: dict[str, Any]) -> str:
            auth = hello.get("auth") or {}
            if not hmac.compare_digest(str(auth.get("key")), key):
                raise AuthError("auth_failed", "unknown or revoked key")
            return "edge1"

        accepted = await controller_handshake(reader, writer, authenticate, timeout=10)
        conn = Connection.from_accepted(reader, writer, accepted)
        conn.start()
        await links.put(conn)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=identity.server_context())
    port = server.sockets[0].getsockname()[1]
    agent = Agent(workdir / "agent", f"127.0.0.1:{port}", identity.fingerprint, key).start()
    try:
        yield Gateway(links, server, agent)
    finally:
        agent.stop()
        server.close()


class TestAgentOutbound(TransportConformance):
    # The tests share the module's event loop with the gateway and its link.
    pytestmark = [pytest.mark.asyncio(loop_scope="module")]  # noqa: RUF012
    python = PY
    known_gaps = AGENT_GAPS

    @pytest_asyncio.fixture(loop_scope="module")
    async def session(self, gateway: Gateway) -> AsyncIterator[Session]:
        # One link for the whole class, as a gateway holds one per connected agent; a
        # test that lost it (none should) makes the agent dial again.
        conn = await asyncio.wait_for(gateway.links.get(), 20)
        session = AgentSession(conn)
        yield session
        await session.close()
        if not conn.closed:
            gateway.links.put_nowait(conn)


# ------------------------------------------------------------------------------- wmi


@pytest.fixture(scope="module")
def wsman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsmanServer]:
    server = WsmanServer(tmp_path_factory.mktemp("conformance-wsman"),
                         certs=make_certs(tmp_path_factory.mktemp("conformance-wsman-certs"))).start()
    yield server
    server.stop()


class TestWmi(TransportConformance):
    """Windows semantics: paths are ``C:\\...`` (the test server maps them to a folder here)."""

    python = PY
    path_separator = "\\"
    lacks = {  # noqa: RUF012 - read only, as in the base class
        "signals": "Windows has no signals; WinRM reports an exit code",
        "file_modes": "Windows has no POSIX file modes; FileStat.mode is None",
        "empty_default_stdin": "without stdin a WinRS command gets console-mode stdin, as pywinrm and Ansible "
                               "run it (docs/wmi.md); a program reading it waits",
    }
    known_gaps = {  # noqa: RUF012
        "test_exec_missing_program_is_not_found": "cmd.exe runs the line: a missing program is exit code 9009 "
                                                  "with cmd's message, not not_found",
        "test_exec_missing_cwd_is_not_found": "WinRM's fault 267 (the directory name is invalid) is mapped to "
                                              "transport_error, as docs/wmi.md says, not not_found",
    }

    @pytest.fixture
    def scratch(self, wsman: WsmanServer) -> str:
        name = f"conformance-{secrets.token_hex(4)}"
        (wsman.root / "C" / name).mkdir(parents=True)
        return f"C:\\{name}"

    @pytest.fixture
    async def session(self, wsman: WsmanServer) -> AsyncIterator[Session]:
        credential = Credential(name="win-admin", type="password", user="DOMAIN\\ops", secret=b"s3cret")
        record = Server(name="win1", transport="wmi", host="127.0.0.1", port=wsman.port, credential="win-admin",
                        options={"auth": "basic", "ca": str(wsman.ca_path)})
        async with FakeContext("wmi") as ctx:
            session = await WmiTransport(ctx).open(record, credential)
            yield session
            await session.close()


# The example plugin runs the suite in tests/test_plugin_ecosystem.py, installed with pip
# into a fresh virtual environment as a third party's transport would be.


# ------------------------------------------------------------------------------- the helpers themselves


def test_public_surface() -> None:
    assert sorted(testing.__all__) == ["CollectingSink", "FakeContext", "FakeServices", "SlowSink",
                                       "TransportConformance", "chunks_of"]


async def test_fake_context_answers_from_its_dicts_and_records_serving() -> None:
    record = Server(name="s1", transport="t")
    credential = Credential(name="c1", type="password", user="u", secret=b"pw")
    async with FakeContext("t", {"a": 1}, servers={"s1": record}, credentials={"c1": credential},
                           max_threads=2) as ctx:
        assert (await ctx.lookup_server("s1"), await ctx.lookup_server("nope")) == (record, None)
        assert await ctx.credential("c1") is credential
        with pytest.raises(NotFound):
            await ctx.credential("nope")
        await ctx.serve(record)
        await ctx.unserve("s1")
        assert ctx.events == [("serve", "s1"), ("unserve", "s1")] and ctx.served == {}
        # A real pool of the given size: blocking calls run off the loop, two at a time.
        names = await asyncio.gather(*(ctx.run_blocking(lambda: threading.current_thread().name)
                                       for _ in range(8)))
        assert len(set(names)) <= 2 and threading.current_thread().name not in names
        await ctx.services.report_status("s1", "online", "1.0", agent_version="x")
        assert ctx.services.statuses[0].details == {"agent_version": "x"}


async def test_collecting_sink_records_contract_breaches() -> None:
    sink = CollectingSink()
    await sink.write("stdout", b"a")
    for stream, data in (("stdin", b"x"), ("stdout", b""), ("stdout", "text")):
        with pytest.raises(AssertionError):
            await sink.write(stream, data)  # type: ignore[arg-type]
    sink.close()
    with pytest.raises(AssertionError, match="after exec returned"):
        await sink.write("stderr", b"late")
    assert sink.data("stdout") == b"a" and len(sink.violations) == 4


async def test_large_stdin_to_a_version_1_agent_is_too_large_not_internal() -> None:
    """Protocol version 1 carries stdin only inside the open frame's 64 KiB header: a
    controller that negotiated it refuses larger stdin with a clear `too_large` before
    opening a stream, instead of failing inside the frame encoder."""
    from fleetbus.errors import TooLarge
    from fleetbus.testing import CollectingSink
    from fleetbus.transport import ExecSpec
    from fleetbus_agents.link import INLINE_STDIN_BYTES, AgentSession

    class V1Link:
        version = 1
        closed = False

        def open_stream(self, op: str, args: dict[str, object]) -> object:
            raise AssertionError("no stream may be opened for stdin this version cannot carry")

    session = AgentSession(V1Link())  # type: ignore[arg-type]
    with pytest.raises(TooLarge, match="protocol version 1"):
        await session.exec(ExecSpec(argv=["cat"], shell=None, stdin=b"x" * (INLINE_STDIN_BYTES + 1)),
                           CollectingSink())
