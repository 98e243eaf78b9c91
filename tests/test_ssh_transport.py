"""The ``ssh`` transport against a real OpenSSH sshd on a loopback port.

SshTransport and its sessions are driven directly, with a small fake TransportContext
(a thread pool for run_blocking, dicts for servers and credentials). Every test that
needs sshd skips when it is not installed, and fails instead under CI.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import platform
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fleetbus import testing
from fleetbus.errors import (
    AuthFailed,
    InvalidRequest,
    NotFound,
    ServerOffline,
    Timeout,
    TransportError,
)
from fleetbus.records import Server
from fleetbus.sessions import SessionPool
from fleetbus.transport import Credential, ExecResult, ExecSpec, PutSpec, Session
from fleetbus_base.ops import GET_CHUNK
from fleetbus_ssh.fastpath import BatchPacketizer
from fleetbus_ssh.hostkeys import HostKeyPin, fingerprint
from fleetbus_ssh.remote_exec import PreambleFilter, build_command
from fleetbus_ssh.transport import SshTransport
from support.sshd import (
    KeyPair,
    Sshd,
    ensure_password_user,
    established_connections,
    free_port,
    generate_key,
    keygen_fingerprint_line,
    require_sshd,
)

T = TypeVar("T")
DEADLINE_S = 10.0
PASSPHRASE = b"correct horse battery staple"

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------- helpers


class FakeContext(testing.FakeContext):
    """fleetbus.testing's context with the ssh tests' servers, credentials and settings."""

    def __init__(self, servers: dict[str, Server], credentials: dict[str, Credential],
                 settings: dict[str, Any] | None = None) -> None:
        super().__init__("ssh", settings, servers=servers, credentials=credentials)


@dataclass
class Sink:
    """An OutputSink that records chunks and notes when the first one arrived."""

    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)

    async def write(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data))
        self.first.set()

    def text(self, stream: str) -> str:
        return b"".join(d for s, d in self.chunks if s == stream).decode()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


async def wait_until(predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.02)


def argv(*args: str, **kw: Any) -> ExecSpec:
    return ExecSpec(argv=list(args), shell=None, **kw)


def shell(text: str, **kw: Any) -> ExecSpec:
    return ExecSpec(argv=None, shell=text, **kw)


async def run(session: Session, spec: ExecSpec) -> tuple[ExecResult, Sink]:
    sink = Sink()
    result = await session.exec(spec, sink)
    return result, sink


async def chunks_of(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".fleetbus-")]


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Lab:
    """Two sshds (a target and a jump host) and the keys that log in to them."""

    dir: Path
    target: Sshd
    bastion: Sshd
    keys: dict[str, KeyPair]
    stranger: KeyPair  # never authorized anywhere

    def credential(self, key: str = "ed25519", name: str | None = None, user: str = "root") -> Credential:
        pair = self.keys[key]
        return Credential(name=name or f"key-{key}", type="ssh-key", user=user, secret=pair.private,
                          passphrase=pair.passphrase)

    def server(self, name: str = "web1", sshd: Sshd | None = None, credential: str | None = "key-ed25519",
               **options: Any) -> Server:
        sshd = sshd or self.target
        options.setdefault("host_key", sshd.host_key_line)
        options = {k: v for k, v in options.items() if v is not None}
        return Server(name=name, transport="ssh", host=sshd.host, port=sshd.port, credential=credential,
                      options=options)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_sshd()
    base = tmp_path_factory.mktemp("ssh")
    keys = {
        "ed25519": generate_key(base, "id_ed25519"),
        "passphrase": generate_key(base, "id_passphrase", passphrase=PASSPHRASE),
        "ecdsa": generate_key(base, "id_ecdsa", "ecdsa"),
        "rsa": generate_key(base, "id_rsa", "rsa", bits=2048),
    }
    stranger = generate_key(base, "id_stranger")
    target = Sshd(base / "target")
    bastion = Sshd(base / "bastion")
    for pair in keys.values():
        target.authorize(pair.public)
        bastion.authorize(pair.public)
    target.start()
    bastion.start()
    yield Lab(base, target, bastion, keys, stranger)
    target.stop()
    bastion.stop()


@pytest.fixture
async def opened(lab: Lab) -> AsyncIterator[Callable[..., Any]]:
    """open(server, credential, ctx=None) -> Session, closed at teardown."""
    sessions: list[Session] = []

    async def open_session(server: Server, credential: Credential | None,
                           ctx: FakeContext | None = None) -> Session:
        ctx = ctx or FakeContext({server.name: server}, {} if credential is None else
                                 {credential.name: credential})
        session = await SshTransport(ctx).open(server, credential)
        sessions.append(session)
        return session

    yield open_session
    for session in sessions:
        await session.close()


@pytest.fixture
async def session(lab: Lab, opened: Callable[..., Any]) -> Session:
    return await opened(lab.server(), lab.credential())


# ---------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("key", ["ed25519", "passphrase", "ecdsa", "rsa"])
async def test_key_authentication(lab: Lab, opened: Callable[..., Any], key: str) -> None:
    session = await opened(lab.server(credential=f"key-{key}"), lab.credential(key))
    result, sink = await run(session, argv("id", "-un"))
    assert result == ExecResult(exit_code=0)
    assert sink.text("stdout") == "root\n"
    assert session.alive


async def test_password_authentication(lab: Lab, opened: Callable[..., Any]) -> None:
    user, password = ensure_password_user()
    credential = Credential(name="pw", type="password", user=user, secret=password)
    session = await opened(lab.server(credential="pw"), credential)
    result, sink = await run(session, argv("id", "-un"))
    assert (result.exit_code, sink.text("stdout")) == (0, f"{user}\n")
    # fbtest's login shell is /bin/sh (dash), root's is bash: the wrapper works in both.
    result, sink = await run(session, argv("sh", "-c", 'printf "%s %s " "$V" "$(pwd)"; cat', env={"V": "$x y"},
                                           cwd="/tmp", stdin=b"in"))
    assert (result.exit_code, sink.text("stdout"), sink.text("stderr")) == (0, "$x y /tmp in", "")


async def test_wrong_password_is_auth_failed(lab: Lab, opened: Callable[..., Any]) -> None:
    user, password = ensure_password_user()
    wrong = Credential(name="pw", type="password", user=user, secret=password + b"x")
    with pytest.raises(AuthFailed) as caught:
        await opened(lab.server(credential="pw"), wrong)
    assert caught.value.message == f"ssh authentication failed for {user}@web1"
    assert password.decode() not in repr(caught.value.to_wire())


async def test_unauthorized_key_is_auth_failed(lab: Lab, opened: Callable[..., Any]) -> None:
    stranger = Credential(name="k", type="ssh-key", user="root", secret=lab.stranger.private)
    with pytest.raises(AuthFailed, match=r"^ssh authentication failed for root@web1$"):
        await opened(lab.server(credential="k"), stranger)


async def test_credential_problems_are_auth_failed(lab: Lab, opened: Callable[..., Any]) -> None:
    with pytest.raises(AuthFailed, match="web1 has no credential"):
        await opened(lab.server(credential=None), None)
    locked = Credential(name="locked", type="ssh-key", user="root",
                        secret=lab.keys["passphrase"].private)
    with pytest.raises(AuthFailed, match="encrypted and the credential has no passphrase"):
        await opened(lab.server(credential="locked"), locked)
    wrong = Credential(name="wrongpass", type="ssh-key", user="root",
                       secret=lab.keys["passphrase"].private, passphrase=b"nope")
    with pytest.raises(AuthFailed, match="wrong passphrase") as caught:
        await opened(lab.server(credential="wrongpass"), wrong)
    assert "nope" not in str(caught.value.to_wire())
    token = Credential(name="tok", type="token", user="root", secret=b"t0k3n")
    with pytest.raises(AuthFailed, match="needs an 'ssh-key' or 'password'"):
        await opened(lab.server(credential="tok"), token)


# ---------------------------------------------------------------------------- host keys


async def test_host_key_pinned_by_fingerprint(lab: Lab, opened: Callable[..., Any]) -> None:
    fp = lab.target.host_fingerprint
    assert fp == fingerprint(base64.b64decode(lab.target.host_key_line.split()[1]))
    for pin in (fp, f"ssh-ed25519 {fp}", f"256 {fp} test-host (ED25519)"):
        session = await opened(lab.server(host_key=pin), lab.credential())
        assert (await run(session, argv("true")))[0].exit_code == 0


async def test_host_key_mismatch_is_refused(lab: Lab, opened: Callable[..., Any]) -> None:
    other = lab.bastion.host_key_line  # a real key, just not this server's
    for pin in (other, lab.bastion.host_fingerprint, [other]):
        with pytest.raises(AuthFailed) as caught:
            await opened(lab.server(host_key=pin), lab.credential())
        err = caught.value
        assert err.message == (
            f"host key mismatch for web1: offered {lab.target.host_fingerprint}, pinned "
            f"{lab.bastion.host_fingerprint} — possible man in the middle; refusing")
        assert err.details["host_key"] == lab.target.host_key_line
        assert err.details["host_key_fingerprint"] == lab.target.host_fingerprint


async def test_unpinned_host_key_is_refused_with_the_offered_key(lab: Lab, opened: Callable[..., Any]) -> None:
    server = lab.server()
    server.options.pop("host_key")
    with pytest.raises(AuthFailed) as caught:
        await opened(server, lab.credential())
    err = caught.value
    assert err.message == (f"host key of web1 is not trusted yet: ssh-ed25519 {lab.target.host_fingerprint}; "
                           "run `fleetbus servers trust web1`")
    assert err.details["host_key"] == lab.target.host_key_line
    assert err.details["host_key_fingerprint"] == lab.target.host_fingerprint
    # The key is reported before any credential is needed, so a server can be trusted first.
    with pytest.raises(AuthFailed, match="not trusted yet"):
        await opened(server.model_copy(update={"credential": None}), None)


async def test_pin_chooses_among_several_host_keys(lab: Lab, tmp_path: Path, opened: Callable[..., Any]) -> None:
    # A server with an Ed25519 and an RSA host key: an RSA pin must make it present RSA.
    rsa = generate_key(tmp_path, "ssh_host_rsa_key", "rsa", bits=2048)
    with Sshd(tmp_path / "sshd", extra_config=[f"HostKey {tmp_path / 'ssh_host_rsa_key'}"]) as sshd:
        sshd.authorize(lab.keys["ed25519"].public)
        keygen_line = keygen_fingerprint_line(Path(f"{tmp_path / 'ssh_host_rsa_key'}.pub"))
        assert keygen_line.endswith("(RSA)")
        for pin in (rsa.public, keygen_line, sshd.host_key_line):
            session = await opened(lab.server(sshd=sshd, host_key=pin), lab.credential())
            assert (await run(session, argv("true")))[0].exit_code == 0
        server = lab.server(sshd=sshd)
        server.options.pop("host_key")
        with pytest.raises(AuthFailed) as caught:
            await opened(server, lab.credential())
        assert caught.value.details["host_key"] == sshd.host_key_line  # Ed25519 is preferred


def test_malformed_pin_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="host_key of web1"):
        HostKeyPin.parse("SHA256:tooshort", "web1")
    with pytest.raises(InvalidRequest):
        HostKeyPin.parse("ssh-ed25519 AAAAB3NzaC1yc2E=", "web1")  # an RSA blob labelled ed25519


# ---------------------------------------------------------------------------- jump hosts


async def test_jump_host(lab: Lab, opened: Callable[..., Any]) -> None:
    bastion = lab.server("bastion1", lab.bastion)
    target = lab.server("web1", via="bastion1")
    cred = lab.credential()
    ctx = FakeContext({"bastion1": bastion, "web1": target}, {cred.name: cred})
    before = lab.target.log().count("Accepted publickey")
    session = await opened(target, cred, ctx)
    result, sink = await run(session, argv("echo", "via"))
    assert (result.exit_code, sink.text("stdout")) == (0, "via\n")
    # The target saw a new login, and the bastion a login that asked to forward to it.
    assert lab.target.log().count("Accepted publickey") == before + 1
    assert lab.bastion.log().count("Accepted publickey") >= 1
    # Put/get and info run over the same tunnelled connection.
    path = lab.dir / "via.txt"
    await session.put(PutSpec(path=str(path)), chunks_of(b"tunnelled"))
    assert path.read_bytes() == b"tunnelled"
    assert (await session.info()).hostname == socket.gethostname()


async def test_jump_host_problems_name_the_jump_host(lab: Lab, opened: Callable[..., Any]) -> None:
    cred = lab.credential()
    target = lab.server("web1", via="bastion1")
    wrong_pin = lab.server("bastion1", lab.bastion, host_key=lab.target.host_key_line)
    ctx = FakeContext({"bastion1": wrong_pin, "web1": target}, {cred.name: cred})
    with pytest.raises(AuthFailed) as caught:
        await opened(target, cred, ctx)
    assert caught.value.message.startswith("host key mismatch for bastion1 (jump host for web1)")
    assert caught.value.details["server"] == "bastion1"
    assert caught.value.details["host_key"] == lab.bastion.host_key_line

    down = lab.server("bastion1", lab.bastion).model_copy(update={"port": free_port()})
    ctx = FakeContext({"bastion1": down, "web1": target}, {cred.name: cred})
    with pytest.raises(ServerOffline, match=r"cannot reach bastion1 at 127\.0\.0\.1:\d+ \(jump host for web1\)"):
        await opened(target, cred, ctx)

    ctx = FakeContext({"web1": target}, {cred.name: cred})
    with pytest.raises(NotFound, match="jump host bastion1 of web1 is not a registered server"):
        await opened(target, cred, ctx)

    # The target behind a working jump host, but nothing listens at its address.
    gone = target.model_copy(update={"port": free_port()})
    ctx = FakeContext({"bastion1": lab.server("bastion1", lab.bastion), "web1": gone}, {cred.name: cred})
    with pytest.raises(ServerOffline, match="cannot reach web1 .* through jump host bastion1"):
        await opened(gone, cred, ctx)


# ---------------------------------------------------------------------------- exec


async def test_one_connection_for_concurrent_commands(lab: Lab, tmp_path: Path, opened: Callable[..., Any]) -> None:
    with Sshd(tmp_path / "sshd") as sshd:  # its own sshd, so other tests' connections do not count
        sshd.authorize(lab.keys["ed25519"].public)
        session = await opened(lab.server(sshd=sshd), lab.credential())
        gate = tmp_path / "gate"
        specs = [shell(f"while [ ! -e {gate} ]; do sleep 0.02; done; echo {i}") for i in range(10)]
        tasks = [asyncio.create_task(run(session, spec)) for spec in specs]
        # All ten are in flight (nine on channels, one waiting for a channel slot).
        await asyncio.sleep(0.5)
        assert established_connections(sshd.port) == 1
        gate.touch()
        results = await asyncio.gather(*tasks)
        assert [sink.text("stdout") for _, sink in results] == [f"{i}\n" for i in range(10)]
        assert established_connections(sshd.port) == 1


async def test_output_is_streamed_live(session: Session, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    sink = Sink()
    task = asyncio.create_task(session.exec(
        shell(f"echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo second"), sink))
    await asyncio.wait_for(sink.first.wait(), DEADLINE_S)
    assert sink.chunks == [("stdout", b"first\n")]
    assert not task.done()
    gate.touch()
    assert await task == ExecResult(exit_code=0)
    assert sink.text("stdout") == "first\nsecond\n"


async def test_stdout_and_stderr_are_separate(session: Session) -> None:
    result, sink = await run(session, shell("echo out; echo err >&2; echo out2; exit 3"))
    assert result == ExecResult(exit_code=3)
    assert sink.text("stdout") == "out\nout2\n"
    assert sink.text("stderr") == "err\n"  # and no trace of the wrapper's report line


async def test_env_cwd_and_stdin(session: Session, tmp_path: Path) -> None:
    workdir = tmp_path / "a dir with 'quotes' and $dollars"
    workdir.mkdir()
    value = "spaces  $HOME `id` $(id) 'single' \"double\" \\ ; | & \n newline"
    result, sink = await run(session, argv(
        "sh", "-c", 'printf "%s|%s|" "$FLEET_VALUE" "$(pwd)"; cat',
        env={"FLEET_VALUE": value, "OTHER": ""}, cwd=str(workdir), stdin=b"in\x00put\xff"))
    assert result.exit_code == 0
    out = b"".join(d for s, d in sink.chunks if s == "stdout")
    assert out == f"{value}|{workdir}|".encode() + b"in\x00put\xff"


async def test_large_stdin_and_output(session: Session) -> None:
    data = random.Random(7).randbytes(3 * 1024 * 1024)
    result, sink = await run(session, argv("cat", stdin=data))
    assert result.exit_code == 0
    out = b"".join(d for s, d in sink.chunks if s == "stdout")
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    assert max(len(d) for _, d in sink.chunks) <= 65536


async def test_no_stdin_means_eof(session: Session) -> None:
    result, sink = await run(session, argv("cat"))
    assert (result.exit_code, sink.chunks) == (0, [])


async def test_argv_is_never_interpreted_by_a_shell(session: Session, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    args = ["$(touch " + str(pwned) + ")", ";", "rm", "-rf", "`touch " + str(pwned) + "`", "&&", "|",
            ">" + str(pwned), "'", '"', "\\", "*", "$HOME", "a\nb"]
    result, sink = await run(session, argv("printf", "%s\\n", *args))
    assert result.exit_code == 0
    assert sink.text("stdout") == "".join(a + "\n" for a in args)
    assert not pwned.exists()


def test_preamble_filter_strips_only_its_report_line() -> None:
    tag = "fleetbus-0123456789abcdef"
    fil = PreambleFilter(tag)
    assert fil.feed(b"rc noise\nfleetbus-0123") == b""
    assert fil.feed(b"456789abcdef ok 4242\nreal stderr") == b"rc noise\nreal stderr"
    assert (fil.status, fil.pid) == ("ok", 4242)
    assert fil.feed(b"fleetbus-0123456789abcdef ok 1\n") == b"fleetbus-0123456789abcdef ok 1\n"
    assert "exec echo '$(x)'" in build_command(argv("echo", "$(x)"), tag)


async def test_exit_codes_signals_and_refusals(session: Session, tmp_path: Path) -> None:
    assert (await run(session, argv("sh", "-c", "exit 7")))[0] == ExecResult(exit_code=7)
    assert (await run(session, argv("sh", "-c", "kill -KILL $$")))[0] == ExecResult(None, signal.SIGKILL)
    assert (await run(session, argv("sh", "-c", "kill -TERM $$")))[0] == ExecResult(None, signal.SIGTERM)
    with pytest.raises(NotFound, match="command not found"):
        await run(session, argv("no-such-command-fleetbus"))
    with pytest.raises(NotFound, match="no such working directory"):
        await run(session, argv("true", cwd=str(tmp_path / "missing")))
    (tmp_path / "file").touch()
    with pytest.raises(InvalidRequest, match="not a directory"):
        await run(session, argv("true", cwd=str(tmp_path / "file")))
    with pytest.raises(InvalidRequest, match="variable name"):
        await run(session, argv("true", env={"BAD-NAME": "x"}))
    assert session.alive


async def _start_group(session: Session, tmp_path: Path, spec_timeout: float | None = None
                       ) -> tuple[asyncio.Task[ExecResult], int, int]:
    """A command whose shell leaves a grandchild; returns the task and both pids."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    task = asyncio.create_task(session.exec(shell(script, timeout_s=spec_timeout), Sink()))
    await wait_until(pids.exists, what="the command started")
    leader, grandchild = map(int, pids.read_text().split())
    assert alive(leader) and alive(grandchild)
    return task, leader, grandchild


async def test_cancel_kills_the_remote_process_group(session: Session, tmp_path: Path) -> None:
    task, leader, grandchild = await _start_group(session, tmp_path)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Gone by the time exec returned (give /proc a moment to show the zombie state).
    await wait_until(lambda: not alive(leader) and not alive(grandchild), timeout=2,
                     what="the process group gone")
    assert (await run(session, argv("echo", "still usable")))[1].text("stdout") == "still usable\n"


async def test_host_timeout_kills_the_remote_process_group(session: Session, tmp_path: Path) -> None:
    # The host enforces timeout_s with asyncio.timeout, which cancels exec.
    task, leader, grandchild = await _start_group(session, tmp_path)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await task
    await wait_until(lambda: not alive(leader) and not alive(grandchild), timeout=2,
                     what="the process group gone")


async def test_timeout_backstop(lab: Lab, opened: Callable[..., Any], tmp_path: Path) -> None:
    # If the host never cancels, exec stops itself shortly after timeout_s.
    server, cred = lab.server(), lab.credential()
    ctx = FakeContext({server.name: server}, {cred.name: cred}, {"timeout_backstop_s": 0.2})
    session = await opened(server, cred, ctx)
    task, leader, grandchild = await _start_group(session, tmp_path, spec_timeout=0.2)
    with pytest.raises(Timeout, match="ran past its 0.2 s limit"):
        await asyncio.wait_for(task, DEADLINE_S)
    await wait_until(lambda: not alive(leader) and not alive(grandchild), timeout=2,
                     what="the process group gone")


async def test_channel_limit_keeps_room_to_stop_commands(lab: Lab, tmp_path: Path,
                                                          opened: Callable[..., Any]) -> None:
    # sshd's default MaxSessions (10): more commands than channels wait, none is refused,
    # and a command can still be stopped while every command slot is busy.
    with Sshd(tmp_path / "sshd", extra_config=["MaxSessions 10"]) as sshd:
        sshd.authorize(lab.keys["ed25519"].public)
        session = await opened(lab.server(sshd=sshd), lab.credential())
        gate = tmp_path / "gate"
        waiting = [asyncio.create_task(run(session, shell(f"while [ ! -e {gate} ]; do sleep 0.02; done; echo ok")))
                   for _ in range(12)]
        await asyncio.sleep(0.5)
        victim = waiting.pop(0)  # the first one surely holds a channel
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        gate.touch()
        # (sshd may still refuse a channel opened right after another closed, before it
        # freed that session: such refusals are retried, so every command gets to run.)
        results = await asyncio.gather(*waiting)
        assert all(sink.text("stdout") == "ok\n" for _, sink in results)


# ---------------------------------------------------------------------------- put / get


async def test_put_and_get_100_mib(session: Session, tmp_path: Path) -> None:
    data = random.Random(1).randbytes(100 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / "big.bin"
    stat = await session.put(PutSpec(path=str(path), size=len(data)), chunks_of(data))
    assert stat.size == len(data)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    remote = await session.get(str(path))
    assert remote.size == len(data)
    got = hashlib.sha256()
    sizes = []
    async for chunk in remote.chunks:
        sizes.append(len(chunk))
        got.update(chunk)
    assert got.hexdigest() == digest
    # Bounded like every get's chunks, yet several of the server's 255 KiB reads each:
    # one thread hop and one NATS message per MiB, not four.
    assert max(sizes) <= GET_CHUNK and sorted(sizes)[len(sizes) // 2] > 512 * 1024
    assert temp_files(tmp_path) == []


async def _round_trip(session: Session, path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    stat = await session.put(PutSpec(path=str(path), size=len(data)), chunks_of(data, 300_000))
    assert stat.size == len(data)
    assert path.read_bytes() == data
    remote = await session.get(str(path))
    got = b"".join([chunk async for chunk in remote.chunks])
    assert got == data


async def test_put_batches_packets_under_aes_gcm(session: Session, tmp_path: Path) -> None:
    transport = session.conn.transport  # type: ignore[attr-defined]
    assert transport.local_cipher == "aes128-gcm@openssh.com"
    assert isinstance(transport.packetizer, BatchPacketizer) and transport.packetizer.batch_ready()
    await _round_trip(session, tmp_path / "gcm.bin", 5 * 1024 * 1024 + 17)


async def test_put_survives_rekeys_mid_transfer(session: Session, tmp_path: Path) -> None:
    # A key exchange every 256 KiB sent or received: many of them during one transfer,
    # with batches of packets waiting at the gate while each one runs.
    packetizer = session.conn.transport.packetizer  # type: ignore[attr-defined]
    packetizer.REKEY_BYTES = 256 * 1024
    await _round_trip(session, tmp_path / "rekeyed.bin", 4 * 1024 * 1024 + 5)
    assert session.alive


async def test_put_without_an_aead_cipher(lab: Lab, opened: Callable[..., Any], tmp_path: Path) -> None:
    # Another cipher takes paramiko's own per-packet path.
    with Sshd(tmp_path / "sshd", extra_config=["Ciphers aes128-ctr"]) as sshd:
        sshd.authorize(lab.keys["ed25519"].public)
        session = await opened(lab.server(sshd=sshd), lab.credential())
        transport = session.conn.transport
        assert transport.local_cipher == "aes128-ctr"
        assert not transport.packetizer.batch_ready()
        await _round_trip(session, tmp_path / "ctr.bin", 3 * 1024 * 1024 + 3)
        await session.close()


async def test_put_is_atomic_when_the_source_fails(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_bytes(b"old content")

    async def failing() -> AsyncIterator[bytes]:
        yield b"new " * 300_000
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        await session.put(PutSpec(path=str(path)), failing())
    assert path.read_bytes() == b"old content"
    assert temp_files(tmp_path) == []

    with pytest.raises(TransportError, match="size mismatch"):
        await session.put(PutSpec(path=str(path), size=100), chunks_of(b"short"))
    assert path.read_bytes() == b"old content"
    assert temp_files(tmp_path) == []


async def test_put_cancelled_leaves_no_temp_file(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "slow"
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * (2 * 1024 * 1024)
        started.set()
        await asyncio.sleep(60)
        yield b"never"

    task = asyncio.create_task(session.put(PutSpec(path=str(path)), slow()))
    await asyncio.wait_for(started.wait(), DEADLINE_S)
    await wait_until(lambda: temp_files(tmp_path), what="the temporary file exists")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temp_files(tmp_path) == [] and not path.exists()


async def test_put_modes(session: Session, tmp_path: Path) -> None:
    new = tmp_path / "new"
    assert (await session.put(PutSpec(path=str(new)), chunks_of(b"a"))).mode == 0o644
    assert new.stat().st_mode & 0o7777 == 0o644
    secret = tmp_path / "secret"
    secret.write_bytes(b"old")
    secret.chmod(0o600)
    assert (await session.put(PutSpec(path=str(secret)), chunks_of(b"b"))).mode == 0o600
    assert (secret.stat().st_mode & 0o7777, secret.read_bytes()) == (0o600, b"b")
    script = tmp_path / "script"
    await session.put(PutSpec(path=str(script), mode=0o750), chunks_of(b"#!/bin/sh\n"))
    assert script.stat().st_mode & 0o7777 == 0o750
    await session.put(PutSpec(path=str(tmp_path / "empty")), chunks_of(b""))
    assert (tmp_path / "empty").read_bytes() == b""


async def test_put_parents(session: Session, tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c" / "file"
    await session.put(PutSpec(path=str(deep), make_parents=True), chunks_of(b"deep"))
    assert deep.read_bytes() == b"deep"
    with pytest.raises(NotFound, match="no such directory"):
        await session.put(PutSpec(path=str(tmp_path / "x" / "y"), make_parents=False), chunks_of(b"z"))
    with pytest.raises(InvalidRequest, match="is a directory"):
        await session.put(PutSpec(path=str(tmp_path / "a")), chunks_of(b"z"))
    with pytest.raises(InvalidRequest, match="absolute"):
        await session.put(PutSpec(path="relative/file"), chunks_of(b"z"))


async def test_get_errors(session: Session, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await session.get(str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest, match="is a directory"):
        await session.get(str(tmp_path))
    (tmp_path / "small").write_bytes(b"small file")
    remote = await session.get(str(tmp_path / "small"))
    assert (remote.size, remote.mode) == (10, (tmp_path / "small").stat().st_mode & 0o7777)
    assert [c async for c in remote.chunks] == [b"small file"]


async def test_transfers_run_concurrently_on_one_session(session: Session, tmp_path: Path) -> None:
    files = {tmp_path / f"f{i}": random.Random(i).randbytes(3 * 1024 * 1024 + i) for i in range(4)}
    await asyncio.gather(*(session.put(PutSpec(path=str(p)), chunks_of(d, 100_000)) for p, d in files.items()))

    async def fetch(path: Path) -> bytes:
        remote = await session.get(str(path))
        return b"".join([c async for c in remote.chunks])

    abandoned = await session.get(str(tmp_path / "f0"))
    await abandoned.chunks.__anext__()
    await abandoned.aclose()  # mid-transfer: its SFTP client must not be reused
    got = await asyncio.gather(*(fetch(p) for p in files), run(session, argv("echo", "exec too")))
    assert got[:4] == list(files.values())
    assert got[4][1].text("stdout") == "exec too\n"


async def test_idle_sftp_client_gives_its_channel_to_commands(lab: Lab, tmp_path: Path,
                                                             opened: Callable[..., Any]) -> None:
    # One command channel in all: the SFTP client kept after a put must make way.
    server, cred = lab.server(), lab.credential()
    session = await opened(server, cred, FakeContext({server.name: server}, {cred.name: cred},
                                                     {"max_sessions": 2}))
    path = tmp_path / "kept"
    await session.put(PutSpec(path=str(path)), chunks_of(b"one"))
    _, sink = await asyncio.wait_for(run(session, argv("cat", str(path))), DEADLINE_S)
    assert sink.text("stdout") == "one"
    remote = await asyncio.wait_for(session.get(str(path)), DEADLINE_S)
    assert [c async for c in remote.chunks] == [b"one"]


# ---------------------------------------------------------------------------- info / ping


async def test_info(session: Session) -> None:
    facts = await session.info()
    assert facts.hostname == socket.gethostname()
    assert facts.os == platform.system()
    assert facts.kernel == platform.release()
    assert facts.arch == platform.machine()
    pretty = next((line.split("=", 1)[1].strip().strip('"') for line in
                   Path("/etc/os-release").read_text().splitlines() if line.startswith("PRETTY_NAME=")), None)
    assert facts.os_version == pretty
    assert facts.uptime_s is not None and facts.uptime_s > 0
    assert facts.extra["user"] == "root"
    assert facts.extra["ssh_server"].startswith("SSH-2.0-OpenSSH")


async def test_ping(session: Session) -> None:
    started = time.monotonic()
    await session.ping()
    assert time.monotonic() - started < 1
    await session.close()
    assert not session.alive
    with pytest.raises(ServerOffline):
        await session.ping()


# ---------------------------------------------------------------------------- failures


async def test_sshd_restart_mid_use(lab: Lab, tmp_path: Path) -> None:
    with Sshd(tmp_path / "sshd") as sshd:
        sshd.authorize(lab.keys["ed25519"].public)
        server, cred = lab.server(sshd=sshd), lab.credential()
        transport = SshTransport(FakeContext({server.name: server}, {cred.name: cred}))

        async def credentials(name: str) -> Credential:
            return cred

        pool = SessionPool(transport, credentials)  # the host's own session keeping
        try:
            async with pool.use(server) as first:
                pids = tmp_path / "inflight"
                inflight = asyncio.create_task(first.exec(shell(f"echo $$ > {pids}; sleep 300"), Sink()))
                await wait_until(pids.exists, what="the in-flight command started")
                sshd.restart()
                with pytest.raises((ServerOffline, TransportError)):
                    await asyncio.wait_for(inflight, DEADLINE_S)
                await wait_until(lambda: not first.alive, what="the session noticing")
            async with pool.use(server) as second:
                assert second is not first
                result, sink = await run(second, argv("echo", "fresh"))
                assert (result.exit_code, sink.text("stdout")) == (0, "fresh\n")
        finally:
            await pool.close_all()


async def test_unreachable_port_is_server_offline_quickly(lab: Lab, opened: Callable[..., Any]) -> None:
    server = lab.server().model_copy(update={"port": free_port()})
    started = time.monotonic()
    with pytest.raises(ServerOffline, match=r"cannot reach web1 at 127\.0\.0\.1:\d+: "):
        await opened(server, lab.credential())
    assert time.monotonic() - started < 2


async def test_not_ssh_is_server_offline(lab: Lab, opened: Callable[..., Any]) -> None:
    # Something listens but never speaks SSH: the banner wait is bounded by connect_timeout_s.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        server = lab.server().model_copy(update={"port": listener.getsockname()[1]})
        cred = lab.credential()
        ctx = FakeContext({server.name: server}, {cred.name: cred}, {"connect_timeout_s": 0.5})
        with pytest.raises(ServerOffline, match="ssh handshake failed"):
            await opened(server, cred, ctx)
    finally:
        listener.close()
