"""Tests of the built-in ``local`` transport: real processes, real files in tmp_path.

The only fake is the TransportContext the plugin host would normally provide.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fleetbus
import pytest
from fleetbus import testing
from fleetbus.errors import InvalidRequest, NotFound, Timeout, TransportError
from fleetbus.records import Server
from fleetbus.secretenv import SECRET_ENV_VARS
from fleetbus.transport import ExecResult, ExecSpec, PutSpec, Session
from fleetbus_base import tuning
from fleetbus_base.ops import environment
from fleetbus_base.ops.files import GET_CHUNK
from fleetbus_base.ops.process import ProcessTimings
from fleetbus_local import plugin
from fleetbus_local.transport import LocalSession, LocalTransport
from support.ops_helpers import RecordingSink, alive, chunks, temp_files, wait_until
from support.processes import own_user

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local transport is POSIX only")

DEADLINE_S = 5.0


class FakeContext(testing.FakeContext):
    """fleetbus.testing's context as the local transport's tests need it."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        # As the tests' own user: the tests use pytest's tmp folders, which under root
        # the default local user (nobody) may not enter.
        super().__init__("local", {"user": own_user(), **(settings or {})})


def make_server(host: str | None = None) -> Server:
    return Server(name="here", transport="local", host=host)


async def open_session(settings: dict[str, Any] | None = None) -> Session:
    transport = LocalTransport(FakeContext(settings))
    return await transport.open(make_server(), None)


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    s = await open_session()
    yield s
    await s.close()


# ---------------------------------------------------------------- exec


async def test_argv_exit_zero(session: Session) -> None:
    sink = RecordingSink()
    result = await session.exec(ExecSpec(argv=["echo", "hello world"], shell=None), sink)
    assert result == ExecResult(exit_code=0, signal=None)
    assert sink.data("stdout") == b"hello world\n"
    assert sink.data("stderr") == b""


async def test_argv_nonzero_exit_and_no_shell_interpretation(session: Session) -> None:
    sink = RecordingSink()
    result = await session.exec(ExecSpec(argv=["sh", "-c", "exit 42"], shell=None), sink)
    assert result == ExecResult(exit_code=42)

    sink = RecordingSink()
    result = await session.exec(ExecSpec(argv=["echo", "$HOME;", "*"], shell=None), sink)
    assert result.exit_code == 0
    assert sink.data("stdout") == b"$HOME; *\n"


async def test_shell(session: Session) -> None:
    sink = RecordingSink()
    result = await session.exec(ExecSpec(argv=None, shell='x=5; echo "$((x * 2))"; exit 7'), sink)
    assert result == ExecResult(exit_code=7)
    assert sink.data("stdout") == b"10\n"


async def test_env_is_merged_over_the_hosts_and_cwd_applies(
    session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETBUS_T_INHERITED", "from-host")
    monkeypatch.setenv("FLEETBUS_T_OVERRIDDEN", "from-host")
    spec = ExecSpec(
        argv=None,
        shell='echo "$FLEETBUS_T_INHERITED|$FLEETBUS_T_OVERRIDDEN|$FLEETBUS_T_NEW"; pwd -P',
        env={"FLEETBUS_T_OVERRIDDEN": "from-spec", "FLEETBUS_T_NEW": "new"},
        cwd=str(tmp_path),
    )
    sink = RecordingSink()
    assert (await session.exec(spec, sink)).exit_code == 0
    env_line, cwd_line = sink.data("stdout").decode().splitlines()
    assert env_line == "from-host|from-spec|new"
    assert cwd_line == str(tmp_path.resolve())


async def test_fleetbus_secrets_are_not_inherited(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETBUS_MASTER_KEY", "master-secret")
    monkeypatch.setenv("FLEETBUS_NATS_TOKEN", "token-secret")
    monkeypatch.setenv("FLEETBUS_AGENT_KEY", "agent-secret")
    monkeypatch.setenv("FLEETBUS_T_VISIBLE", "visible")
    sink = RecordingSink()
    assert (await session.exec(ExecSpec(argv=["env"], shell=None), sink)).exit_code == 0
    out = sink.data("stdout")
    assert b"FLEETBUS_T_VISIBLE=visible" in out
    assert b"master-secret" not in out and b"token-secret" not in out
    assert b"agent-secret" not in out

    # Asked for explicitly, a variable is passed like any other.
    sink = RecordingSink()
    spec = ExecSpec(argv=["env"], shell=None, env={"FLEETBUS_NATS_TOKEN": "given"})
    await session.exec(spec, sink)
    assert b"FLEETBUS_NATS_TOKEN=given" in sink.data("stdout")


def test_core_secret_env_vars_are_the_agents() -> None:
    # One list for fleetbus and its agent, so neither can forget the other's secrets.
    assert SECRET_ENV_VARS is environment.SECRET_ENV_VARS
    assert {"FLEETBUS_MASTER_KEY", "FLEETBUS_NATS_TOKEN", "FLEETBUS_AGENT_KEY"} <= SECRET_ENV_VARS


async def test_stdin_is_fed_while_output_is_read(session: Session) -> None:
    # Larger than any pipe buffer: feeding stdin only after reading all output (or the
    # other way round) would deadlock.
    data = os.urandom(3 * 1024 * 1024)
    sink = RecordingSink()
    result = await session.exec(ExecSpec(argv=["cat"], shell=None, stdin=data), sink)
    assert result.exit_code == 0
    assert hashlib.sha256(sink.data("stdout")).digest() == hashlib.sha256(data).digest()


async def test_empty_stdin_and_no_stdin_give_immediate_eof(session: Session) -> None:
    async with asyncio.timeout(DEADLINE_S):
        sink = RecordingSink()
        assert (
            await session.exec(ExecSpec(argv=["cat"], shell=None, stdin=b""), sink)
        ).exit_code == 0
        assert sink.data("stdout") == b""

        sink = RecordingSink()
        spec = ExecSpec(argv=None, shell="cat; readlink /proc/self/fd/0 || echo none")
        assert (await session.exec(spec, sink)).exit_code == 0
        assert sink.data("stdout") in (b"/dev/null\n", b"none\n")


async def test_stdout_and_stderr_are_kept_apart(session: Session) -> None:
    sink = RecordingSink()
    spec = ExecSpec(argv=None, shell="echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert (await session.exec(spec, sink)).exit_code == 0
    assert sink.data("stdout") == b"out1\nout2\n"
    assert sink.data("stderr") == b"err1\nerr2\n"


async def test_output_is_streamed_while_the_process_runs(session: Session, tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    spec = ExecSpec(
        argv=None,
        shell='echo first; echo early >&2; read line < "$GO"; echo "second $line"',
        env={"GO": str(fifo)},
    )
    sink = RecordingSink()
    task = asyncio.create_task(session.exec(spec, sink))
    try:
        await sink.wait_for(
            lambda: sink.data("stdout") == b"first\n" and sink.data("stderr") == b"early\n"
        )
        assert not task.done()  # the process is still blocked on the fifo

        def release() -> None:
            with open(fifo, "w") as f:  # blocks until the shell opens the fifo
                f.write("now\n")

        await asyncio.wait_for(asyncio.to_thread(release), DEADLINE_S)
        result = await asyncio.wait_for(task, DEADLINE_S)
    finally:
        task.cancel()
    assert result.exit_code == 0
    assert sink.data("stdout") == b"first\nsecond now\n"


async def test_missing_executable_is_not_found(session: Session) -> None:
    with pytest.raises(NotFound) as info:
        await session.exec(
            ExecSpec(argv=["fleetbus-no-such-command", "x"], shell=None), RecordingSink()
        )
    assert info.value.message == "no such file or directory: 'fleetbus-no-such-command'"

    with pytest.raises(NotFound, match="/nonexistent/bin/tool"):
        await session.exec(ExecSpec(argv=["/nonexistent/bin/tool"], shell=None), RecordingSink())


async def test_missing_or_bad_cwd(session: Session, tmp_path: Path) -> None:
    missing = str(tmp_path / "gone")
    with pytest.raises(NotFound) as info:
        await session.exec(ExecSpec(argv=["true"], shell=None, cwd=missing), RecordingSink())
    assert info.value.message == f"no such working directory: {missing!r}"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InvalidRequest, match="not a directory"):
        await session.exec(ExecSpec(argv=None, shell="true", cwd=str(a_file)), RecordingSink())


async def test_not_executable_is_a_clear_error(session: Session, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(TransportError) as info:
        await session.exec(ExecSpec(argv=[str(script)], shell=None), RecordingSink())
    assert info.value.message == f"permission denied: {str(script)!r}"


@pytest.mark.parametrize(
    "spec",
    [
        ExecSpec(argv=["true"], shell="true"),
        ExecSpec(argv=None, shell=None),
        ExecSpec(argv=[], shell=None),
        ExecSpec(argv=["echo", "nul\0byte"], shell=None),
        ExecSpec(argv=["true"], shell=None, env={"BAD=NAME": "x"}),
    ],
)
async def test_invalid_specs_are_refused(session: Session, spec: ExecSpec) -> None:
    with pytest.raises(InvalidRequest):
        await session.exec(spec, RecordingSink())


async def _start_group(
    session: Session, shell: str, stray_pids: list[int]
) -> tuple[asyncio.Task[ExecResult], int, int]:
    """Start ``shell`` (which must print "$$ $!"), return the task and both pids."""
    sink = RecordingSink()
    task = asyncio.create_task(session.exec(ExecSpec(argv=None, shell=shell), sink))
    await sink.wait_for(lambda: sink.data("stdout").endswith(b"\n"))
    leader, grandchild = (int(pid) for pid in sink.data("stdout").split())
    stray_pids.extend([grandchild, leader])
    assert alive(leader) and alive(grandchild)
    return task, leader, grandchild


async def test_cancel_kills_the_whole_process_group(
    session: Session, stray_pids: list[int]
) -> None:
    task, leader, grandchild = await _start_group(
        session, 'sleep 300 & echo "$$ $!"; wait', stray_pids
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    # The leader has been reaped by the time exec returns.
    assert not alive(leader)
    await wait_until(lambda: not alive(grandchild))


async def test_cancel_escalates_to_sigkill(stray_pids: list[int]) -> None:
    session = await open_session({"term_grace_s": 0.2})
    # Both the shell and its child ignore SIGTERM.
    task, leader, grandchild = await _start_group(
        session, 'trap "" TERM; sleep 300 & echo "$$ $!"; wait', stray_pids
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    assert not alive(leader)
    await wait_until(lambda: not alive(grandchild))


async def test_sink_failure_stops_the_process_group(
    session: Session, tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "pid"
    spec = ExecSpec(argv=None, shell=f'sleep 300 & echo $! > "{pidfile}"; echo out; wait')
    with pytest.raises(RuntimeError, match="sink broke"):
        await asyncio.wait_for(
            session.exec(spec, RecordingSink(fail=RuntimeError("sink broke"))), DEADLINE_S
        )
    grandchild = int(pidfile.read_text())
    stray_pids.append(grandchild)
    await wait_until(lambda: not alive(grandchild))


async def test_timeout_backstop_stops_the_process(stray_pids: list[int]) -> None:
    session = await open_session({"timeout_backstop_s": 0.1})
    sink = RecordingSink()
    spec = ExecSpec(argv=None, shell='sleep 300 & echo "$$ $!"; wait', timeout_s=0.2)
    with pytest.raises(Timeout):
        await asyncio.wait_for(session.exec(spec, sink), DEADLINE_S)
    leader, grandchild = (int(pid) for pid in sink.data("stdout").split())
    stray_pids.extend([grandchild, leader])
    assert not alive(leader)
    await wait_until(lambda: not alive(grandchild))


async def test_killed_by_signal_reports_the_signal(session: Session) -> None:
    result = await session.exec(ExecSpec(argv=None, shell="kill -TERM $$"), RecordingSink())
    assert result == ExecResult(exit_code=None, signal=signal.SIGTERM)
    result = await session.exec(
        ExecSpec(argv=["sh", "-c", "kill -KILL $$"], shell=None), RecordingSink()
    )
    assert result == ExecResult(exit_code=None, signal=signal.SIGKILL)


async def test_background_process_holding_stdout_does_not_hang_exec(stray_pids: list[int]) -> None:
    session = await open_session({"exit_grace_s": 0.3})
    sink = RecordingSink()
    started = time.monotonic()
    result = await asyncio.wait_for(
        session.exec(ExecSpec(argv=None, shell="sleep 300 & echo $!; echo done >&2"), sink),
        DEADLINE_S,
    )
    elapsed = time.monotonic() - started
    background = int(sink.data("stdout"))
    stray_pids.append(background)
    assert result.exit_code == 0
    assert sink.data("stderr") == b"done\n"
    assert elapsed < 3.0
    # A normal exit leaves what the command started in the background running.
    assert alive(background)


async def test_output_left_at_exit_is_delivered_to_a_slow_sink(stray_pids: list[int]) -> None:
    # The process exits with more output still in the pipe than a slow sink can take
    # within exit_grace_s; none of it may be lost although a background process holds
    # the pipe open.
    session = await open_session({"exit_grace_s": 0.2})
    sink = RecordingSink(delay_s=0.1)
    spec = ExecSpec(argv=None, shell="sleep 300 & echo $!; head -c 400000 /dev/zero")
    result = await asyncio.wait_for(session.exec(spec, sink), DEADLINE_S)
    out = sink.data("stdout")
    pid_line, _, zeros = out.partition(b"\n")
    stray_pids.append(int(pid_line))
    assert result.exit_code == 0
    assert zeros == b"\0" * 400000


# ---------------------------------------------------------------- put


async def test_put_writes_content_with_default_mode(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    old_umask = os.umask(0o077)  # the default mode must not depend on the umask
    try:
        result = await session.put(PutSpec(path=str(target)), chunks(b"hello ", b"", b"world\n"))
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"hello world\n"
    assert result.size == 12
    assert result.mode == 0o644
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("mode", [0o600, 0o755, 0o4750])
async def test_put_applies_mode(session: Session, tmp_path: Path, mode: int) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    target.chmod(0o644)
    result = await session.put(PutSpec(path=str(target), mode=mode), chunks(b"new"))
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert result.mode == mode
    assert target.read_bytes() == b"new"


async def test_put_keeps_the_mode_of_the_file_it_replaces(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    target.chmod(0o640)
    await session.put(PutSpec(path=str(target)), chunks(b"new"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_bytes() == b"new"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can keep another user's ownership")
async def test_put_as_root_keeps_the_owner_of_the_file_it_replaces(
    session: Session, tmp_path: Path
) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    os.chown(target, 65534, 65534)
    await session.put(PutSpec(path=str(target)), chunks(b"new"))
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert target.read_bytes() == b"new"


async def test_put_creates_parents(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c" / "f"
    await session.put(PutSpec(path=str(target)), chunks(b"deep"))
    assert target.read_bytes() == b"deep"


async def test_put_without_make_parents_needs_the_parent(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "missing" / "f"
    with pytest.raises(NotFound) as info:
        await session.put(PutSpec(path=str(target), make_parents=False), chunks(b"x"))
    assert str(tmp_path / "missing") in info.value.message
    assert not (tmp_path / "missing").exists()


async def test_put_failure_midway_leaves_the_target_intact(
    session: Session, tmp_path: Path
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old content")
    seen_during_put: list[tuple[list[int], bytes]] = []

    async def broken_source() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"n" * (1024 * 1024)
        # Some data has been written by now: to a temporary file, not to the target.
        temps = temp_files(tmp_path)
        written = [(tmp_path / name).stat().st_size for name in temps]
        seen_during_put.append((written, target.read_bytes()))
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        await session.put(PutSpec(path=str(target)), broken_source())
    [(written, content)] = seen_during_put
    assert len(written) == 1 and written[0] > 0
    assert content == b"old content"
    assert target.read_bytes() == b"old content"
    assert temp_files(tmp_path) == []


async def test_put_size_mismatch_does_not_replace(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TransportError, match="size mismatch"):
        await session.put(PutSpec(path=str(target), size=10), chunks(b"12345"))
    with pytest.raises(TransportError, match="size mismatch"):
        await session.put(PutSpec(path=str(target), size=4), chunks(b"123", b"456"))
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []
    result = await session.put(PutSpec(path=str(target), size=6), chunks(b"123", b"456"))
    assert result.size == 6 and target.read_bytes() == b"123456"


async def test_put_cancelled_removes_the_temporary_file(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "f"
    never = asyncio.Event()

    async def stalled_source() -> AsyncIterator[bytes]:
        yield b"x" * (2 * 1024 * 1024)
        await never.wait()
        yield b"unreachable"

    task = asyncio.create_task(session.put(PutSpec(path=str(target)), stalled_source()))
    await wait_until(lambda: len(temp_files(tmp_path)) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: temp_files(tmp_path) == [])
    assert not target.exists()


async def test_put_many_chunks_round_trip(session: Session, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    sizes = [1, 1000, 65536, 3 * 1024 * 1024, 7]

    async def source() -> AsyncIterator[bytes]:
        offset, i = 0, 0
        while offset < len(data):
            size = sizes[i % len(sizes)]
            yield data[offset : offset + size]
            offset += size
            i += 1

    target = tmp_path / "big"
    result = await session.put(PutSpec(path=str(target), size=len(data)), source())
    assert result.size == len(data)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_put_refuses_directories_and_relative_paths(session: Session, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is a directory"):
        await session.put(PutSpec(path=str(tmp_path)), chunks(b"x"))
    with pytest.raises(InvalidRequest, match="names a directory"):
        await session.put(PutSpec(path=str(tmp_path / "new") + "/"), chunks(b"x"))
    with pytest.raises(InvalidRequest, match="absolute"):
        await session.put(PutSpec(path="relative/f"), chunks(b"x"))
    assert temp_files(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root is never denied")
async def test_put_permission_denied(session: Session, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(TransportError) as info:
            await session.put(PutSpec(path=str(locked / "f")), chunks(b"x"))
        assert info.value.message == f"permission denied: {locked / 'f'}"
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- get


async def read_all(remote_chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in remote_chunks]


async def test_get_streams_a_large_file_in_bounded_chunks(session: Session, tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024)
    path = tmp_path / "big"
    path.write_bytes(data)
    path.chmod(0o640)
    remote = await session.get(str(path))
    assert remote.size == len(data)
    assert remote.mode == 0o640
    digest = hashlib.sha256()
    count = 0
    async for chunk in remote.chunks:
        assert 0 < len(chunk) <= GET_CHUNK
        digest.update(chunk)
        count += 1
    assert count >= len(data) // GET_CHUNK
    assert digest.digest() == hashlib.sha256(data).digest()


def open_fds_for(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_get_closes_the_file(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * GET_CHUNK))

    remote = await session.get(str(path))
    assert open_fds_for(path) == 1
    await remote.aclose()  # before reading anything
    assert open_fds_for(path) == 0

    remote = await session.get(str(path))
    assert len(await anext(remote.chunks)) == GET_CHUNK
    await remote.aclose()  # part way through
    assert open_fds_for(path) == 0

    remote = await session.get(str(path))
    assert b"".join(await read_all(remote.chunks)) == path.read_bytes()
    assert open_fds_for(path) == 0  # at end of file, without aclose


async def test_get_missing_is_not_found(session: Session, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        await session.get(str(tmp_path / "missing"))
    with pytest.raises(NotFound):
        await session.get(str(tmp_path / "missing" / "below"))


async def test_get_refuses_directories_and_special_files(session: Session, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is a directory"):
        await session.get(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidRequest, match="not a regular file"):
        await asyncio.wait_for(session.get(str(fifo)), DEADLINE_S)
    with pytest.raises(InvalidRequest, match="absolute"):
        await session.get("relative")


async def test_get_reads_the_size_it_reported(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(b"0123456789")
    remote = await session.get(str(path))
    with open(path, "ab") as f:  # noqa: ASYNC230 - the file must grow while the get is open
        f.write(b"appended after the get started")
    assert b"".join(await read_all(remote.chunks)) == b"0123456789"


@pytest.mark.skipif(platform.system() != "Linux", reason="needs /proc")
async def test_get_reads_pseudo_files_that_report_size_zero(session: Session) -> None:
    remote = await session.get("/proc/self/status")
    assert remote.size == 0
    assert b"Pid:" in b"".join(await read_all(remote.chunks))


# ---------------------------------------------------------------- info, ping, plugin


async def test_info(session: Session) -> None:
    facts = await session.info()
    assert facts.hostname == socket.gethostname()
    assert facts.os == platform.system()
    assert facts.kernel == platform.release()
    assert facts.arch == platform.machine()
    assert facts.os_version
    if os.path.exists("/etc/os-release"):
        assert facts.os_version == platform.freedesktop_os_release()["PRETTY_NAME"]
    if platform.system() == "Linux":
        assert facts.uptime_s is not None and facts.uptime_s > 0
    import pwd

    assert facts.extra == {
        "python": platform.python_version(),
        "user": pwd.getpwuid(os.geteuid()).pw_name,
    }


async def test_ping_and_close(session: Session) -> None:
    async with asyncio.timeout(1):
        assert await session.ping() is None
    assert session.alive


@pytest.mark.parametrize(
    ("host", "accepted"),
    [
        (None, True),
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("::1", True),
        (socket.gethostname(), True),
        (socket.gethostname().upper() + ".", True),
        ("fleetbus-some-other-machine.example", False),
        ("10.255.255.1", False),
    ],
)
def test_accepts_only_this_machine(host: str | None, accepted: bool) -> None:
    assert LocalTransport(FakeContext()).accepts(make_server(host)) is accepted


async def test_transport_description_and_open() -> None:
    transport = LocalTransport(FakeContext())
    assert LocalTransport.name == "local"
    assert LocalTransport.version == fleetbus.__version__
    assert LocalTransport.serves_registered is True
    assert LocalTransport.description
    assert isinstance(await transport.open(make_server(), None), LocalSession)
    assert plugin.fleetbus_transports() == [LocalTransport]


def test_timing_settings() -> None:
    assert LocalTransport(FakeContext()).timings == ProcessTimings()
    assert LocalTransport(FakeContext({"term_grace_s": 1})).timings.term_grace_s == 1.0
    # The local transport's Settings model: a bad value or an unknown key names the setting.
    for bad in (-1, "2", True, float("inf")):
        with pytest.raises(InvalidRequest, match="local transport setting 'term_grace_s'"):
            LocalTransport(FakeContext({"term_grace_s": bad}))
    with pytest.raises(InvalidRequest, match="local transport setting 'other': unknown"):
        LocalTransport(FakeContext({"other": "refused"}))


CHILD_WATCHER_PROBE = """
import asyncio, sys
from fleetbus_base.ops.childwatch import pidfd_usable
from fleetbus_base.ops import ExecSpec, run_process
from fleetbus_base.tuning import apply

chosen = "pidfd_child_watcher" in apply(["pidfd_child_watcher"])
out = []

async def main():
    async def write(stream, data):
        out.append(data)
    result = await run_process(ExecSpec(shell="echo hi; exit 3"), write)
    watcher = None
    if sys.version_info < (3, 12):
        watcher = type(asyncio.get_event_loop_policy().get_child_watcher()).__name__
    print(chosen, pidfd_usable(), watcher, result.exit_code, b"".join(out).decode().strip())

asyncio.run(main())
"""


def test_processes_are_watched_with_pidfds_where_the_kernel_has_them() -> None:
    # Before 3.12 asyncio starts a thread per child; the entry points switch to pidfds.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CHILD_WATCHER_PROBE], capture_output=True,
                          text=True, timeout=60, check=True)
    chosen, usable, watcher, exit_code, output = done.stdout.split()
    assert (exit_code, output) == ("3", "hi")
    if not tuning.enabled():
        assert chosen == "False"  # FLEETBUS_TUNING=off: asyncio's default watcher
        return
    # 3.12+ watches with pidfds itself: nothing to choose there.
    assert chosen == (usable if sys.version_info < (3, 12) else "False")
    if usable == "True" and sys.version_info < (3, 12):
        assert watcher == "PidfdChildWatcher"
