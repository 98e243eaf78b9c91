"""The wmi transport against a WS-Management server speaking the real protocol to pywinrm.

The server (tests/support/wsman_server.py) runs commands on this POSIX host through a
minimal cmd.exe stand-in and emulates only fleetbus-wmi's own PowerShell scripts; see
its docstring for exactly what is emulated.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetbus import testing
from fleetbus.errors import (
    AuthFailed,
    InvalidRequest,
    NotFound,
    ServerOffline,
    TransportError,
)
from fleetbus.records import Server
from fleetbus.transport import Credential, ExecSpec, PutSpec
from fleetbus_wmi import commands, facts, files
from fleetbus_wmi.transport import WmiSession, WmiTransport
from support.wsman_server import (
    SIGNAL_TERMINATE,
    WsmanServer,
    cmd_c,
    free_port,
    make_certs,
    split_command_line,
)
from winrm.protocol import Protocol

PY = sys.executable
USER = "DOMAIN\\ops"
PASSWORD = "s3cret"
DEADLINE_S = 10.0

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- fixtures

class FakeContext(testing.FakeContext):
    """fleetbus.testing's context for the wmi transport."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__("wmi", settings)


class Sink:
    """An OutputSink that records each chunk and when it arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes, float]] = []
        self.event = asyncio.Event()

    async def write(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data, time.monotonic()))
        self.event.set()

    def text(self, stream: str) -> str:
        return b"".join(d for s, d, _ in self.chunks if s == stream).decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("wsman-certs"))


@pytest.fixture(scope="module")
def wsman(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[WsmanServer]:
    server = WsmanServer(tmp_path_factory.mktemp("wsman"), certs=certs).start()
    yield server
    server.stop()


def record(server: WsmanServer, auth: str = "basic", **options: Any) -> Server:
    opts: dict[str, Any] = {"auth": auth}
    if server.tls:
        opts.setdefault("ca", str(server.ca_path))
    else:
        opts["scheme"] = "http"
    opts.update(options)
    opts = {k: v for k, v in opts.items() if v is not None}
    return Server(name="win1", transport="wmi", host="127.0.0.1", port=server.port,
                  credential="win-admin", options=opts)


def credential(user: str = USER, password: str = PASSWORD) -> Credential:
    return Credential(name="win-admin", type="password", user=user, secret=password.encode())


async def open_session(server: WsmanServer, auth: str = "basic", settings: dict[str, Any] | None = None,
                       password: str = PASSWORD, **options: Any) -> WmiSession:
    transport = WmiTransport(FakeContext(settings))
    session = await transport.open(record(server, auth, **options), credential(password=password))
    assert isinstance(session, WmiSession)
    return session


@pytest.fixture
async def session(wsman: WsmanServer) -> AsyncIterator[WmiSession]:
    s = await open_session(wsman)
    yield s
    await s.close()


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# --------------------------------------------------------------------------- exec

async def test_output_streams_over_several_receives_before_the_command_ends(
        session: WmiSession, wsman: WsmanServer, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    code = (f"import os, time; print('first', flush=True); "
            f"[time.sleep(0.01) for _ in iter(lambda: os.path.exists({str(gate)!r}), True)]; print('second')")
    sink = Sink()
    task = asyncio.create_task(session.exec(ExecSpec(argv=py(code), shell=None), sink))
    await wait_until(lambda: sink.text("stdout") == "first\n" or task.done())
    assert sink.text("stdout") == "first\n"
    assert not task.done()  # the first chunk arrived while the command still ran
    gate.touch()
    result = await asyncio.wait_for(task, DEADLINE_S)
    assert result.exit_code == 0
    assert sink.text("stdout") == "first\nsecond\n"
    [cmd] = [c for c in wsman.commands() if "first" in c.line]
    assert cmd.receives_with_data >= 2


async def test_exit_code_and_stderr_are_separate(session: WmiSession) -> None:
    sink = Sink()
    result = await session.exec(ExecSpec(argv=py(
        "import sys; sys.stdout.write('out'); sys.stdout.flush(); sys.stderr.write('err'); sys.exit(3)"),
        shell=None), sink)
    assert result.exit_code == 3
    assert sink.text("stdout") == "out"
    assert sink.text("stderr") == "err"


async def test_shell_string_runs_through_cmd(session: WmiSession, wsman: WsmanServer) -> None:
    sink = Sink()
    result = await session.exec(ExecSpec(argv=None, shell="echo one && echo two 1>&2 && exit 4"), sink)
    assert (result.exit_code, sink.text("stdout"), sink.text("stderr")) == (4, "one\n", "two\n")
    [event] = [e for e in wsman.events if e.action == "Command" and "echo one" in e.detail["line"]]
    assert event.detail["line"] == "echo one && echo two 1>&2 && exit 4"
    assert event.detail["skip_cmd_shell"] is False


TRICKY = ["a b", 'say "hi"', "100%", "%PATH%", "a&b|c<d>e^f", "(x)", "trail\\", 'back\\"slash',
          "", "!bang!", "tab\there", "ünïcode"]


async def test_argv_reaches_the_program_exactly(session: WmiSession, wsman: WsmanServer) -> None:
    sink = Sink()
    argv = py("import json, sys; print(json.dumps(sys.argv[1:]))") + TRICKY
    result = await session.exec(ExecSpec(argv=argv, shell=None), sink)
    assert result.exit_code == 0, sink.text("stderr")
    assert json.loads(sink.text("stdout")) == TRICKY


async def test_env_and_cwd_are_given_to_the_shell(session: WmiSession, wsman: WsmanServer) -> None:
    (wsman.root / "C" / "work dir").mkdir(parents=True, exist_ok=True)
    sink = Sink()
    env = {"FLEETBUS_A": "x & y % z \"q\"", "FLEETBUS_B": "2"}
    result = await session.exec(ExecSpec(
        argv=py("import os; print(os.environ['FLEETBUS_A']); print(os.environ['FLEETBUS_B']); print(os.getcwd())"),
        shell=None, env=env, cwd="C:\\work dir"), sink)
    assert result.exit_code == 0, sink.text("stderr")
    a, b, cwd = sink.text("stdout").splitlines()
    assert (a, b) == (env["FLEETBUS_A"], "2")
    assert cwd == str(wsman.root / "C" / "work dir")
    [create] = [e for e in wsman.events if e.action == "Create" and e.detail["env"] == env]
    assert create.detail["cwd"] == "C:\\work dir"
    # A shell of its own, deleted when the command ended.
    assert wsman.count("Delete", shell_id=create.shell_id) == 1


async def test_missing_working_directory_is_a_clear_error(session: WmiSession) -> None:
    with pytest.raises(TransportError, match="directory name is invalid"):
        await session.exec(ExecSpec(argv=py("pass"), shell=None, cwd="C:\\no\\such\\dir"), Sink())


async def test_stdin_is_sent_in_several_messages(session: WmiSession, wsman: WsmanServer) -> None:
    data = os.urandom(300_000)
    sink = Sink()
    result = await session.exec(ExecSpec(
        argv=py("import sys, hashlib; d = sys.stdin.buffer.read(); print(len(d), hashlib.sha256(d).hexdigest())"),
        shell=None, stdin=data), sink)
    assert result.exit_code == 0, sink.text("stderr")
    assert sink.text("stdout").split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
    [command] = [e for e in wsman.events if e.action == "Command" and "stdin.buffer" in e.detail["line"]]
    assert command.detail["console_mode_stdin"] == "FALSE"
    sends = [e for e in wsman.events if e.action == "Send" and e.command_id == command.command_id]
    assert len(sends) >= 3 and sends[-1].detail["end"] and not sends[0].detail["end"]


SLEEPER = py("import os, time; print(os.getpid(), flush=True); time.sleep(60)")


async def test_timeout_signals_terminate_and_deletes_the_shell(session: WmiSession, wsman: WsmanServer) -> None:
    # The transport has no time limit of its own: the host's cancels the exec as this
    # does (operations.py), and that must stop the remote process.
    sink = Sink()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1):
            await session.exec(ExecSpec(argv=SLEEPER + ["timeout-test"], shell=None, timeout_s=1), sink)
    assert time.monotonic() - started < 5
    pid = int(sink.text("stdout"))
    [cmd] = [e for e in wsman.events if e.action == "Command" and "timeout-test" in e.detail["line"]]
    assert wsman.count("Signal", command_id=cmd.command_id, detail=SIGNAL_TERMINATE) == 1
    assert wsman.count("Delete", shell_id=cmd.shell_id) == 1
    assert cmd.shell_id not in wsman.shells
    await wait_until(lambda: not pid_alive(pid))


async def test_cancel_signals_terminate_and_deletes_the_shell(session: WmiSession, wsman: WsmanServer) -> None:
    sink = Sink()
    task = asyncio.create_task(session.exec(ExecSpec(argv=SLEEPER + ["cancel-test"], shell=None), sink))
    await asyncio.wait_for(sink.event.wait(), DEADLINE_S)
    pid = int(sink.text("stdout"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [cmd] = [e for e in wsman.events if e.action == "Command" and "cancel-test" in e.detail["line"]]
    assert wsman.count("Signal", command_id=cmd.command_id, detail=SIGNAL_TERMINATE) == 1
    assert wsman.count("Delete", shell_id=cmd.shell_id) == 1
    assert cmd.shell_id not in wsman.shells
    await wait_until(lambda: not pid_alive(pid))


async def test_cancel_while_the_shell_is_being_created_leaks_no_shell(
        tmp_path: Path, certs: dict[str, Path]) -> None:
    with WsmanServer(tmp_path, certs=certs, create_delay_s=0.5) as server:
        s = await open_session(server)
        try:
            task = asyncio.create_task(s.exec(ExecSpec(argv=None, shell="exit 0"), Sink()))
            await wait_until(lambda: server.count("CreateBegin") == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: server.count("Create") == 1 and server.open_shells() == 0)
            assert server.count("Command") == 0
        finally:
            await s.close()


async def test_many_commands_leak_no_shells(tmp_path: Path, certs: dict[str, Path]) -> None:
    with WsmanServer(tmp_path, certs=certs, max_shells_per_user=10) as server:
        s = await open_session(server, settings={"max_shells": 4, "max_idle_shells": 2})
        try:
            for i in range(20):
                assert (await s.exec(ExecSpec(argv=None, shell=f"exit {i % 3}"), Sink())).exit_code == i % 3
            assert server.open_shells() == 1  # one reused shell for sequential commands
            results = await asyncio.gather(*(
                s.exec(ExecSpec(argv=py("import time; time.sleep(0.2)"), shell=None), Sink()) for _ in range(12)))
            assert all(r.exit_code == 0 for r in results)
            assert server.max_open_shells <= 4
            assert server.open_shells() <= 2
            await s.exec(ExecSpec(argv=None, shell="exit 0", env={"A": "1"}), Sink())
            assert server.open_shells() <= 2
        finally:
            await s.close()
        assert server.open_shells() == 0
        assert server.count("Create") == server.count("Delete")


async def test_closing_a_session_lets_running_commands_finish(tmp_path: Path, certs: dict[str, Path]) -> None:
    with WsmanServer(tmp_path, certs=certs) as server:
        s = await open_session(server)
        sink = Sink()
        task = asyncio.create_task(s.exec(ExecSpec(
            argv=py("import time; print('begun', flush=True); time.sleep(0.3); print('done')"), shell=None), sink))
        await asyncio.wait_for(sink.event.wait(), DEADLINE_S)
        await s.close()  # as the host does with a stale session still in use
        result = await asyncio.wait_for(task, DEADLINE_S)
        assert (result.exit_code, sink.text("stdout")) == (0, "begun\ndone\n")
        await wait_until(lambda: server.open_shells() == 0)


async def test_a_shell_per_command_when_reuse_is_off(tmp_path: Path, certs: dict[str, Path]) -> None:
    with WsmanServer(tmp_path, certs=certs) as server:
        s = await open_session(server, settings={"reuse_shells": False})
        try:
            for _ in range(3):
                assert (await s.exec(ExecSpec(argv=None, shell="exit 0"), Sink())).exit_code == 0
                assert server.open_shells() == 0
        finally:
            await s.close()
        assert server.count("Create") == server.count("Delete") == 3
        assert server.count("Signal") == 0  # Delete ends the command, no Signal needed


async def test_a_dropped_shell_is_replaced_and_the_command_retried(session: WmiSession, wsman: WsmanServer) -> None:
    assert (await session.exec(ExecSpec(argv=None, shell="exit 0"), Sink())).exit_code == 0
    wsman.drop_shells()  # as a WinRM restart or the shell's idle timeout would
    sink = Sink()
    assert (await session.exec(ExecSpec(argv=None, shell="echo again"), sink)).exit_code == 0
    assert sink.text("stdout") == "again\n"


async def test_operations_quota_on_a_long_lived_shell_opens_a_new_one(
        tmp_path: Path, certs: dict[str, Path]) -> None:
    with WsmanServer(tmp_path, certs=certs, max_commands_per_shell=3) as server:
        s = await open_session(server)
        try:
            for _ in range(7):
                assert (await s.exec(ExecSpec(argv=None, shell="exit 0"), Sink())).exit_code == 0
            assert server.count("OperationsFault") >= 1
        finally:
            await s.close()
        assert server.open_shells() == 0


async def test_shell_quota_fault_is_a_clear_error(tmp_path: Path, certs: dict[str, Path]) -> None:
    with WsmanServer(tmp_path, certs=certs, max_shells_per_user=1) as server:
        other = Protocol(server.url, transport="basic", username=USER, password=PASSWORD,
                         ca_trust_path=str(server.ca_path), proxy=None)
        other.open_shell()  # another tool of the same user holds the only shell
        s = await open_session(server)
        try:
            with pytest.raises(TransportError, match="MaxShellsPerUser") as info:
                await s.exec(ExecSpec(argv=None, shell="exit 0"), Sink())
            assert "2150859173" in info.value.message
            assert "maximum number of 1 concurrent shells" in info.value.message
            assert "\n" not in info.value.message
        finally:
            await s.close()
        assert server.count("QuotaFault") == 1


async def test_powershell_argv_is_sent_encoded(session: WmiSession, wsman: WsmanServer) -> None:
    script = "Get-ChildItem 'C:\\a b' | Where-Object { $_.Length -gt 0 } # \"quotes\" & 100%"
    sink = Sink()
    result = await session.exec(ExecSpec(argv=["powershell", script], shell=None), sink)
    assert result.exit_code == 1  # the test server does not run PowerShell
    [event] = [e for e in wsman.events if e.action == "Command" and e.detail["powershell"]
               and "Get-ChildItem" in e.detail["powershell"]]
    assert event.detail["skip_cmd_shell"] is True
    assert "-EncodedCommand " in event.detail["line"]
    assert event.detail["powershell"] == script  # as is: nothing prepended
    assert "does not run PowerShell" in sink.text("stderr")


# --------------------------------------------------------------------------- authentication, TLS, reachability

async def test_basic_auth_with_a_wrong_password_is_auth_failed(wsman: WsmanServer) -> None:
    with pytest.raises(AuthFailed, match="refused the credentials") as info:
        await open_session(wsman, password="wrong")
    assert "wrong" not in info.value.message


async def test_ntlm_over_https(wsman: WsmanServer) -> None:
    s = await open_session(wsman, auth="ntlm")
    try:
        sink = Sink()
        assert (await s.exec(ExecSpec(argv=None, shell="echo ntlm"), sink)).exit_code == 0
        assert sink.text("stdout") == "ntlm\n"
        await s.ping()
    finally:
        await s.close()


async def test_ntlm_with_a_wrong_password_is_auth_failed(wsman: WsmanServer) -> None:
    with pytest.raises(AuthFailed, match="HTTP 401"):
        await open_session(wsman, auth="ntlm", password="nope")


async def test_ntlm_over_http_encrypts_messages(tmp_path: Path) -> None:
    with WsmanServer(tmp_path, tls=False, auth=("ntlm",)) as server:
        s = await open_session(server, auth="ntlm")
        try:
            sink = Sink()
            data = b"through NTLM sealing\n" * 1000
            result = await s.exec(ExecSpec(argv=py("import sys; sys.stdout.write(sys.stdin.read())"),
                                           shell=None, stdin=data), sink)
            assert result.exit_code == 0
            assert sink.text("stdout").encode() == data
        finally:
            await s.close()


async def test_basic_over_plain_http_is_refused(tmp_path: Path) -> None:
    with WsmanServer(tmp_path, tls=False) as server, pytest.raises(InvalidRequest, match="in clear"):
        await open_session(server, auth="basic")


async def test_tls_is_verified_with_the_given_ca(wsman: WsmanServer) -> None:
    s = await open_session(wsman)  # ca=<the test CA>
    await s.ping()
    await s.close()


async def test_tls_without_the_ca_fails_verification(wsman: WsmanServer) -> None:
    with pytest.raises(AuthFailed, match="certificate") as info:
        await open_session(wsman, ca=None)
    assert "insecure_skip_verify" in info.value.message


async def test_tls_with_insecure_skip_verify(wsman: WsmanServer) -> None:
    s = await open_session(wsman, ca=None, insecure_skip_verify="true")
    await s.ping()
    await s.close()


async def test_unreachable_is_server_offline() -> None:
    port = free_port()
    server = Server(name="win1", transport="wmi", host="127.0.0.1", port=port, credential="win-admin",
                    options={"insecure_skip_verify": True})
    with pytest.raises(ServerOffline, match="connection refused"):
        await WmiTransport(FakeContext()).open(server, credential())


async def test_https_against_an_http_listener_is_server_offline(tmp_path: Path) -> None:
    with WsmanServer(tmp_path, tls=False) as server:
        record_ = Server(name="win1", transport="wmi", host="127.0.0.1", port=server.port,
                         credential="win-admin", options={"insecure_skip_verify": True})
        with pytest.raises(ServerOffline, match="TLS"):
            await WmiTransport(FakeContext()).open(record_, credential())


async def test_access_denied_is_auth_failed(tmp_path: Path, certs: dict[str, Path]) -> None:
    with (WsmanServer(tmp_path, certs=certs, denied_users=(USER,)) as server,
          pytest.raises(AuthFailed, match="denied access")):
        await open_session(server)


def test_bad_options_are_refused(wsman: WsmanServer) -> None:
    from fleetbus_wmi.transport import WmiConfig, WmiSettings

    settings = WmiSettings()
    for options, message in (({"scheme": "ftp"}, "scheme"), ({"auth": "digest"}, "auth"),
                             ({"colour": "blue"}, "unknown wmi option"),
                             ({"ca": "/nonexistent.pem"}, "does not exist"),
                             ({"ca": str(wsman.ca_path), "insecure_skip_verify": True}, "not both")):
        server = Server(name="win1", transport="wmi", host="h", credential="c", options=options)
        with pytest.raises(InvalidRequest, match=message):
            WmiConfig(server, credential(), settings)
    config = WmiConfig(Server(name="win1", transport="wmi", host="h", credential="c"), credential(), settings)
    assert (config.endpoint, config.auth) == ("https://h:5986/wsman", "ntlm")
    config = WmiConfig(Server(name="win1", transport="wmi", host="h", credential="c",
                              options={"scheme": "http"}), credential(), settings)
    assert config.endpoint == "http://h:5985/wsman"
    assert PASSWORD not in repr(credential())


async def test_ping_is_one_identify(session: WmiSession, wsman: WsmanServer) -> None:
    before = wsman.count("Identify")
    await session.ping()
    assert wsman.count("Identify") == before + 1


# --------------------------------------------------------------------------- files

async def test_put_and_get_round_trip(wsman: WsmanServer) -> None:
    s = await open_session(wsman, settings={"put_chunk_bytes": 64 * 1024, "get_chunk_bytes": 50_000})
    try:
        data = os.urandom(700_001)
        stat = await s.put(PutSpec(path="C:\\deploy\\new dir\\app.bin", size=len(data)),
                           chunks(data[:1000], data[1000:300_000], data[300_000:]))
        assert stat.size == len(data)
        local = wsman.root / "C" / "deploy" / "new dir" / "app.bin"
        assert local.read_bytes() == data
        assert not [n for n in os.listdir(local.parent) if n.startswith(files.TEMP_PREFIX)]
        [put_cmd] = [e for e in wsman.events if e.action == "Command" and e.detail["powershell"]
                     and "fleetbus-wmi put" in e.detail["powershell"]]
        assert wsman.count("Send", command_id=put_cmd.command_id) == 12  # 11 chunks + end
        remote = await s.get("C:\\deploy\\new dir\\app.bin")
        assert remote.size == len(data)
        got = b"".join([c async for c in remote.chunks])
        assert got == data
        # Replacing an existing file, and an empty file.
        await s.put(PutSpec(path="C:\\deploy\\new dir\\app.bin"), chunks(b"v2"))
        assert local.read_bytes() == b"v2"
        await s.put(PutSpec(path="C:\\deploy\\empty.txt", size=0), chunks())
        remote = await s.get("C:\\deploy\\empty.txt")
        assert remote.size == 0 and [c async for c in remote.chunks] == []
        assert wsman.open_shells() <= 2
    finally:
        await s.close()
    assert wsman.open_shells() == 0


async def test_get_errors(session: WmiSession, wsman: WsmanServer) -> None:
    with pytest.raises(NotFound, match="no such file"):
        await session.get("C:\\missing.txt")
    (wsman.root / "C" / "adir").mkdir(parents=True, exist_ok=True)
    with pytest.raises(InvalidRequest, match="is a directory"):
        await session.get("C:\\adir")
    with pytest.raises(InvalidRequest, match="absolute Windows path"):
        await session.get("relative\\x.txt")


async def test_put_size_mismatch_leaves_nothing(session: WmiSession, wsman: WsmanServer) -> None:
    with pytest.raises(TransportError, match="size mismatch"):
        await session.put(PutSpec(path="C:\\sized\\f.bin", size=10), chunks(b"12345"))
    await wait_until(lambda: not (wsman.root / "C" / "sized").exists()
                     or not os.listdir(wsman.root / "C" / "sized"))
    with pytest.raises(NotFound, match="no such directory"):
        await session.put(PutSpec(path="C:\\nodir\\f.bin", make_parents=False), chunks(b"x"))


async def test_get_closed_early_stops_the_command(session: WmiSession, wsman: WsmanServer) -> None:
    big = wsman.root / "C" / "big.bin"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(os.urandom(3_000_000))
    remote = await session.get("C:\\big.bin")
    first = await remote.chunks.__anext__()
    assert first
    await remote.aclose()
    [cmd] = [e for e in wsman.events if e.action == "Command" and e.detail["powershell"]
             and "big.bin" in e.detail["powershell"]]
    assert wsman.count("Signal", command_id=cmd.command_id, detail=SIGNAL_TERMINATE) == 1
    assert cmd.shell_id not in wsman.shells


async def test_cancelled_put_stops_the_script_and_removes_its_temp_file(wsman: WsmanServer) -> None:
    s = await open_session(wsman, settings={"put_chunk_bytes": 1024})
    never = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield b"x" * 2048
        await never.wait()
        yield b"y"

    def put_command() -> Any:
        found = [e for e in wsman.events if e.action == "Command" and e.detail["powershell"]
                 and "cancelled-put" in e.detail["powershell"]]
        return found[0] if found else None

    try:
        task = asyncio.create_task(s.put(PutSpec(path="C:\\cancelled-put\\f.bin"), source()))
        await wait_until(lambda: put_command() is not None
                         and wsman.count("Send", command_id=put_command().command_id) >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cmd = put_command()
        assert wsman.count("Signal", command_id=cmd.command_id, detail=SIGNAL_TERMINATE) == 1
        assert wsman.count("Delete", shell_id=cmd.shell_id) == 1
        folder = wsman.root / "C" / "cancelled-put"
        await wait_until(lambda: os.listdir(folder) == [])  # the remove script took the temp file
    finally:
        await s.close()


def test_put_script_text_and_payloads() -> None:
    path = "C:\\Program Files\\it's\u2019 here\\app.exe"
    temp = files.temp_path(path)
    assert temp.startswith("C:\\Program Files\\it's\u2019 here\\.fleetbus-") and temp.endswith(".tmp")
    script = files.put_script(path, temp, True, 123)
    assert script.startswith("# fleetbus-wmi put v1\nbegin {\n")
    assert "$Path = 'C:\\Program Files\\it''s\u2019\u2019 here\\app.exe'" in script
    assert "$MakeParents = $true" in script and "$Size = 123" in script
    assert "Move-Item -LiteralPath $Temp -Destination $Path -Force" in script
    assert files.parse_params(script) == ("put", {"Path": path, "Temp": temp, "MakeParents": True, "Size": 123})
    assert files.parse_params(files.put_script(path, temp, False, None))[1]["Size"] == -1
    line = commands.powershell_line(script)
    assert line.skip_cmd_shell
    encoded = line.command.split("-EncodedCommand ", 1)[1]
    assert commands.decode_powershell(encoded) == script
    # Nothing may precede the begin block, or PowerShell would run "begin" as a command.
    assert script.splitlines()[1] == "begin {"
    assert all(line.startswith("#") for line in script.split("begin {")[0].splitlines())
    assert len(line.command) < commands.CREATEPROCESS_MAX_CHARS
    data = bytes(range(256)) * 10
    lines = files.put_lines(data, 1000)
    assert len(lines) == 3 and all(x.endswith(b"\r\n") for x in lines)
    assert b"".join(base64.b64decode(x.strip()) for x in lines) == data
    # The Send envelope of a default chunk stays under Windows' default MaxEnvelopeSizekb (500).
    line_len = len(files.put_lines(b"\0" * files.DEFAULT_PUT_CHUNK, files.DEFAULT_PUT_CHUNK)[0])
    assert (line_len + 2) // 3 * 4 + 2048 < 500 * 1024


def test_get_and_remove_scripts() -> None:
    script = files.get_script("D:\\logs\\a'b.log", offset=10, chunk=4096)
    assert files.parse_params(script) == ("get", {"Path": "D:\\logs\\a'b.log", "Offset": 10, "Chunk": 4096})
    assert "[void]$fs.Seek($Offset, [IO.SeekOrigin]::Begin)" in script
    assert "[Convert]::ToBase64String($buffer, 0, $n)" in script
    assert files.parse_params(files.remove_script("C:\\x\\.fleetbus-1.tmp")) == (
        "remove", {"Path": "C:\\x\\.fleetbus-1.tmp"})
    for bad in ("", "x.txt", "\\no-drive", "C:rel", "C:\\a\0b", "C:\\a\fb", "C:\\a\nb"):
        with pytest.raises(InvalidRequest):
            files.check_windows_path(bad)
    for good in ("C:\\a", "c:/a/b", "\\\\fs01\\share\\x"):
        assert files.check_windows_path(good) == good


# --------------------------------------------------------------------------- info

CANNED_FACTS = (
    "\ufeff{\"Name\":\"WEB01\",\"Domain\":\"corp.example\",\"Caption\":\"Microsoft Windows Server 2019 "
    "Datacenter\",\"Version\":\"10.0.17763\",\"BuildNumber\":\"17763\",\"OSArchitecture\":\"64-bit\","
    "\"ProcessorArchitecture\":\"AMD64\",\"LastBootUpTime\":\"2024-05-01T10:00:00.0000000Z\","
    "\"UptimeSeconds\":86400.25,\"PSVersion\":\"5.1.17763.1\"}\r\n"
)


def test_info_parses_canned_json() -> None:
    result = facts.parse_facts(CANNED_FACTS.encode(), user=USER,
                               wsman={"ProductVersion": "OS: 10.0.17763 SP: 0.0 Stack: 3.0"})
    assert (result.hostname, result.os, result.os_version, result.kernel, result.arch, result.uptime_s) == (
        "WEB01", "Windows", "Microsoft Windows Server 2019 Datacenter", "10.0.17763", "AMD64", 86400.25)
    assert result.extra["domain"] == "corp.example" and result.extra["user"] == USER
    assert result.extra["wsman_product_version"].startswith("OS: 10.0.17763")
    assert "Get-CimInstance -ClassName Win32_OperatingSystem" in facts.INFO_SCRIPT
    assert "Win32_ComputerSystem" in facts.INFO_SCRIPT and "ConvertTo-Json" in facts.INFO_SCRIPT
    with pytest.raises(TransportError, match="no JSON"):
        facts.parse_facts(b"oops")


async def test_info_round_trip(session: WmiSession) -> None:
    result = await session.info()
    assert (result.hostname, result.os, result.kernel, result.arch) == ("WIN-TEST01", "Windows", "10.0.20348",
                                                                       "AMD64")
    assert result.extra["wsman_vendor"] == "Microsoft Corporation"


# --------------------------------------------------------------------------- quoting (pure)

@pytest.mark.parametrize("args", [
    ["plain"], ["a b"], [""], ['"'], ["\\"], ["a\\\\b"], ["x\\"], ['x\\"y'], ["a\"b c"], ["%OS%", "^", "&&"],
    TRICKY,
])
def test_quote_arg_round_trips_through_command_line_to_argv(args: list[str]) -> None:
    line = "prog " + " ".join(commands.quote_arg(a) for a in args)
    assert split_command_line(line)[1:] == args
    kind, argv = cmd_c(commands.argv_to_cmd_line(["prog", *args]), {"OS": "Windows_NT", "PATH": "C:\\"})
    assert (kind, argv) == ("argv", ["prog", *args])


def test_program_with_spaces_survives_cmd_quote_stripping(tmp_path: Path) -> None:
    line = commands.argv_to_cmd_line(["C:\\Program Files\\tool.exe", "a b", "c"])
    assert line == '""C:\\Program Files\\tool.exe" ^"a b^" c"'
    assert cmd_c(line, {}) == ("argv", ["C:\\Program Files\\tool.exe", "a b", "c"])


def test_command_line_choices() -> None:
    assert commands.command_line(None, "dir /b") == commands.CommandLine("dir /b")
    ps = commands.command_line(["pwsh", "Get-Date"], None)
    assert ps.skip_cmd_shell and ps.command.startswith("pwsh.exe -NoLogo")
    plain = commands.command_line(["powershell", "-File", "C:\\x.ps1"], None)
    assert not plain.skip_cmd_shell and plain.command == "powershell -File C:\\x.ps1"
    for argv, shell in ((None, None), (["a"], "b"), (["x", "line\nbreak"], None), ([], None)):
        with pytest.raises(InvalidRequest):
            commands.command_line(argv, shell)
    with pytest.raises(InvalidRequest, match="too long"):
        commands.command_line(["powershell", "x" * 20000], None)
    assert commands.ps_quote("it's \u2018q\u2019") == "'it''s \u2018\u2018q\u2019\u2019'"


def test_clixml_error_stream_becomes_text() -> None:
    clixml = (b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
              b'<Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCustomObject</T>'
              b'</TN><MS><I64 N="SourceId">1</I64></MS></Obj>'
              b'<S S="Error">Get-Item : Cannot find path_x000D__x000A_</S><S S="Error">second line_x000D__x000A_</S>'
              b"</Objs>")
    f = commands.ClixmlFilter()
    out = b"".join(f.feed(clixml[i: i + 7]) for i in range(0, len(clixml), 7)) + f.flush()
    assert out == b"Get-Item : Cannot find path\r\nsecond line\r\n"
    f = commands.ClixmlFilter()
    assert f.feed(b"plain error\n") + f.flush() == b"plain error\n"
