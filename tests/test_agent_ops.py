"""Tests of ``fleetbus_base.ops`` used directly, as the agent uses it.

Real processes and real files in tmp_path; nothing from fleetbus core is imported, so
these tests see the package exactly as a remote server running the agent does. The last
tests check that the agent package imports nothing outside the standard library and
works on the oldest Python the agent supports (3.9), when such an interpreter exists.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fleetbus_base.ops import (
    ERROR_CODES,
    GET_CHUNK,
    READ_CHUNK,
    SECRET_ENV_VARS,
    ExecResult,
    ExecSpec,
    OpError,
    ProcessTimings,
    PutSpec,
    ThreadRunner,
    child_environment,
    default_run_blocking,
    executables,
    get_file,
    put_file,
    run_process,
    server_facts,
)
from fleetbus_base.ops import child as child_module
from fleetbus_base.ops import errors as op_errors
from fleetbus_base.ops.facts import parse_os_release
from fleetbus_base.pagecache import DROP_EVERY
from support.ops_helpers import RecordingSink, alive, chunks, temp_files, wait_until
from support.pagecache import require_droppable_cache, resident_fraction

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the operations are POSIX only")

DEADLINE_S = 5.0
AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"


# ---------------------------------------------------------------- errors


def test_op_error_codes_and_helpers() -> None:
    assert ERROR_CODES == (
        "invalid_request",
        "not_found",
        "timeout",
        "cancelled",
        "transport_error",
        "too_large",
        "internal",
    )
    for code in ERROR_CODES:
        err = getattr(op_errors, code)("what happened")
        assert isinstance(err, OpError)
        assert (err.code, err.message, str(err)) == (code, "what happened", "what happened")
        assert err.to_dict() == {"code": code, "message": "what happened"}
    with pytest.raises(ValueError, match="server_offline"):
        OpError("server_offline", "not an operation's error")


# ---------------------------------------------------------------- exec


async def test_exec_streams_output_while_running_and_returns_exit_code(tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    spec = ExecSpec(
        shell='echo first; echo early >&2; read line < "$GO"; echo "second $line"; exit 7',
        env={"GO": str(fifo)},
    )
    out = RecordingSink()
    task = asyncio.create_task(run_process(spec, out.write))
    try:
        await out.wait_for(
            lambda: out.data("stdout") == b"first\n" and out.data("stderr") == b"early\n"
        )
        assert not task.done()  # still blocked on the fifo: the output came live

        def release() -> None:
            with open(fifo, "w") as f:
                f.write("now\n")

        await asyncio.wait_for(asyncio.to_thread(release), DEADLINE_S)
        result = await asyncio.wait_for(task, DEADLINE_S)
    finally:
        task.cancel()
    assert result == ExecResult(exit_code=7, signal=None)
    assert out.data("stdout") == b"first\nsecond now\n"


async def test_exec_argv_stdin_and_large_output_in_bounded_chunks() -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    out = RecordingSink()
    result = await run_process(ExecSpec(argv=["cat"], stdin=data), out.write)
    assert result == ExecResult(exit_code=0)
    assert hashlib.sha256(out.data("stdout")).digest() == hashlib.sha256(data).digest()
    assert len(out.writes) >= len(data) // READ_CHUNK  # RecordingSink.write checks each size

    out = RecordingSink()
    await run_process(ExecSpec(argv=["echo", "$HOME;", "*"]), out.write)
    assert out.data("stdout") == b"$HOME; *\n"  # no shell in between


async def test_exec_reports_the_killing_signal() -> None:
    result = await run_process(ExecSpec(shell="kill -TERM $$"), RecordingSink().write)
    assert result == ExecResult(exit_code=None, signal=signal.SIGTERM)


async def test_exec_strips_secret_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "FLEETBUS_AGENT_KEY" in SECRET_ENV_VARS
    monkeypatch.setenv("FLEETBUS_AGENT_KEY", "agent-secret")
    monkeypatch.setenv("FLEETBUS_MASTER_KEY", "master-secret")
    monkeypatch.setenv("FLEETBUS_T_VISIBLE", "visible")
    out = RecordingSink()
    await run_process(ExecSpec(argv=["env"], env={"FLEETBUS_T_NEW": "new"}), out.write)
    env = out.data("stdout")
    assert b"FLEETBUS_T_VISIBLE=visible" in env and b"FLEETBUS_T_NEW=new" in env
    assert b"agent-secret" not in env and b"master-secret" not in env

    # Given explicitly, a secret's name is passed on like any other variable.
    assert child_environment({"FLEETBUS_AGENT_KEY": "given"}, base={"FLEETBUS_AGENT_KEY": "x"}) == {
        "FLEETBUS_AGENT_KEY": "given"
    }


async def test_exec_strips_secrets_without_overrides_and_passes_ours_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With no overrides the child may inherit our environment as it is, but only when
    # no secret is in it: each case must still hold.
    monkeypatch.setenv("FLEETBUS_T_VISIBLE", "visible")
    for secret in (None, "agent-secret"):
        if secret is not None:
            monkeypatch.setenv("FLEETBUS_AGENT_KEY", secret)
        else:
            monkeypatch.delenv("FLEETBUS_AGENT_KEY", raising=False)
        out = RecordingSink()
        await run_process(ExecSpec(argv=["env"]), out.write)
        env = out.data("stdout")
        assert b"FLEETBUS_T_VISIBLE=visible" in env
        assert b"FLEETBUS_AGENT_KEY" not in env


async def test_exec_holds_output_back_from_a_slow_consumer() -> None:
    # A consumer that does not take output must not make us buffer all of it: the pipe
    # stops being read, so the process blocks in write() until the consumer catches up.
    size = 8 * 1024 * 1024
    gate = asyncio.Event()
    got: list[bytes] = []

    async def write(stream: str, data: bytes) -> None:
        await gate.wait()
        got.append(data)

    task = asyncio.create_task(run_process(ExecSpec(argv=["head", "-c", str(size), "/dev/zero"]), write))
    try:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done  # blocked writing: what it wrote does not fit in our buffers
        gate.set()
        result = await asyncio.wait_for(task, DEADLINE_S)
    finally:
        task.cancel()
    assert result == ExecResult(exit_code=0)
    assert sum(len(chunk) for chunk in got) == size


async def test_exec_drops_stdin_the_process_never_reads() -> None:
    # More than a pipe holds, to a process that exits without reading: no hang, no error.
    result = await asyncio.wait_for(
        run_process(ExecSpec(shell="exit 4", stdin=os.urandom(1024 * 1024)), RecordingSink().write),
        DEADLINE_S,
    )
    assert result == ExecResult(exit_code=4)


async def test_exec_without_pidfds_waits_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels before 5.3 (and other POSIX systems) have no pidfd: the exit is seen by a
    # thread blocked in waitpid instead, with the same results.
    monkeypatch.setattr(child_module, "_pidfds", False)

    def no_pidfds(pid: int) -> int:
        raise AssertionError("pidfd_open called without pidfds")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    out = RecordingSink()
    result = await asyncio.wait_for(
        run_process(ExecSpec(argv=["cat"], stdin=b"through a thread"), out.write), DEADLINE_S
    )
    assert result == ExecResult(exit_code=0) and out.data("stdout") == b"through a thread"
    result = await asyncio.wait_for(
        run_process(ExecSpec(shell="kill -KILL $$"), RecordingSink().write), DEADLINE_S
    )
    assert result == ExecResult(exit_code=None, signal=signal.SIGKILL)
    # Each waiting thread ends once it has handed the exit to the loop (a moment after
    # the result is in): none is left behind.
    await wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("fleetbus-waitpid-")])


async def test_exec_leaves_no_descriptor_or_zombie_behind() -> None:
    def open_fds() -> set[str]:
        """The descriptors an exec could leave behind: pipes, pidfds, /dev/null. Others
        are not counted: a thread an earlier test left (a server's, an executor's) may
        open or close a socket or file meanwhile."""
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # closed meanwhile (the listing's own descriptor among them)
            if target.startswith("pipe:") or "pidfd" in target or target == "/dev/null":
                out.add(f"{fd} {target}")
        return out

    def waiting_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("fleetbus-waitpid-")]

    child_module._devnull()  # the one /dev/null every child's stdin shares, kept open
    # A waiting thread (pidfds unavailable, or an earlier test's) closes what it holds a
    # moment after its result is in: count descriptors with none of them running.
    await wait_until(lambda: not waiting_threads())
    before = open_fds()
    pids = []
    for spec in (ExecSpec(shell="echo $$"), ExecSpec(shell="echo $$; cat", stdin=b"x"),
                 ExecSpec(shell="echo $$; echo err >&2; exit 2")):
        out = RecordingSink()
        await run_process(spec, out.write)
        pids.append(int(out.data("stdout").split()[0]))
    with pytest.raises(OpError):
        await run_process(ExecSpec(argv=["fleetbus-no-such-command"]), RecordingSink().write)
    await wait_until(lambda: not waiting_threads())
    assert open_fds() == before, (sorted(open_fds() - before), sorted(before - open_fds()))
    # Reaped, not left as zombies (a zombie keeps its /proc entry).
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


async def _start_group(
    shell: str, stray_pids: list[int], timings: ProcessTimings
) -> tuple[asyncio.Task[ExecResult], int, int]:
    """Start ``shell`` (which prints "$$ $!"); the task, the leader and the grandchild."""
    out = RecordingSink()
    task = asyncio.create_task(run_process(ExecSpec(shell=shell), out.write, timings=timings))
    await out.wait_for(lambda: out.data("stdout").endswith(b"\n"))
    leader, grandchild = (int(pid) for pid in out.data("stdout").split())
    stray_pids.extend([grandchild, leader])
    assert alive(leader) and alive(grandchild)
    return task, leader, grandchild


@pytest.mark.parametrize(
    "shell",
    ['sleep 300 & echo "$$ $!"; wait', 'trap "" TERM; sleep 300 & echo "$$ $!"; wait'],
    ids=["sigterm", "sigkill-after-ignored-sigterm"],
)
async def test_cancel_kills_the_process_group(shell: str, stray_pids: list[int]) -> None:
    # No run_blocking given: the group check runs on the package's own thread pool.
    task, leader, grandchild = await _start_group(
        shell, stray_pids, ProcessTimings(term_grace_s=0.3)
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    assert not alive(leader)  # reaped before the cancellation came out
    await wait_until(lambda: not alive(grandchild))


async def test_timeout_backstop_raises_timeout_and_kills(stray_pids: list[int]) -> None:
    out = RecordingSink()
    spec = ExecSpec(shell='sleep 300 & echo "$$ $!"; wait', timeout_s=0.2)
    with pytest.raises(OpError) as info:
        await asyncio.wait_for(
            run_process(spec, out.write, timings=ProcessTimings(timeout_backstop_s=0.1)),
            DEADLINE_S,
        )
    assert info.value.code == "timeout"
    leader, grandchild = (int(pid) for pid in out.data("stdout").split())
    stray_pids.extend([grandchild, leader])
    assert not alive(leader)
    await wait_until(lambda: not alive(grandchild))


async def test_timeout_backstop_reaches_a_consumer_that_never_returns(stray_pids: list[int]) -> None:
    # The consumer stalls on its first write: the backstop must still end the command.
    stalled = asyncio.Event()
    first: list[bytes] = []

    async def write(stream: str, data: bytes) -> None:
        first.append(data)
        stalled.set()
        await asyncio.Event().wait()

    spec = ExecSpec(shell="echo $$; exec sleep 300", timeout_s=0.2)
    task = asyncio.create_task(
        run_process(spec, write, timings=ProcessTimings(timeout_backstop_s=0.1))
    )
    await asyncio.wait_for(stalled.wait(), DEADLINE_S)
    with pytest.raises(OpError) as info:
        await asyncio.wait_for(task, DEADLINE_S)
    assert info.value.code == "timeout"
    leader = int(first[0])
    stray_pids.append(leader)
    assert not alive(leader)  # stopped and reaped before the error came out
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_callback_failure_propagates_and_stops_the_group(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "pid"
    spec = ExecSpec(shell=f'sleep 300 & echo $! > "{pidfile}"; echo out; wait')
    # A TimeoutError from the callback is its own, not mistaken for the backstop.
    with pytest.raises(TimeoutError, match="consumer gone"):
        await asyncio.wait_for(
            run_process(spec, RecordingSink(fail=TimeoutError("consumer gone")).write), DEADLINE_S
        )
    grandchild = int(pidfile.read_text())
    stray_pids.append(grandchild)
    await wait_until(lambda: not alive(grandchild))


async def test_background_process_holding_the_pipe_does_not_hang(stray_pids: list[int]) -> None:
    out = RecordingSink()
    started = time.monotonic()
    result = await asyncio.wait_for(
        run_process(
            ExecSpec(shell="sleep 300 & echo $!; echo done >&2"),
            out.write,
            timings=ProcessTimings(exit_grace_s=0.3),
        ),
        DEADLINE_S,
    )
    stray_pids.append(int(out.data("stdout")))
    assert result.exit_code == 0 and out.data("stderr") == b"done\n"
    assert time.monotonic() - started < 3.0


async def test_exec_errors_have_bus_codes(tmp_path: Path) -> None:
    async def code_of(spec: ExecSpec) -> tuple[str, str]:
        with pytest.raises(OpError) as info:
            await run_process(spec, RecordingSink().write)
        return info.value.code, info.value.message

    assert await code_of(ExecSpec(argv=["fleetbus-no-such-command"])) == (
        "not_found",
        "no such file or directory: 'fleetbus-no-such-command'",
    )
    missing = str(tmp_path / "gone")
    assert await code_of(ExecSpec(argv=["true"], cwd=missing)) == (
        "not_found",
        f"no such working directory: {missing!r}",
    )
    a_file = tmp_path / "file"
    a_file.write_text("#!/bin/sh\n")
    a_file.chmod(0o644)
    assert (await code_of(ExecSpec(shell="true", cwd=str(a_file))))[0] == "invalid_request"
    if os.geteuid() != 0:
        assert (await code_of(ExecSpec(argv=[str(a_file)]))) == (
            "transport_error",
            f"permission denied: {str(a_file)!r}",
        )
    for bad in (
        ExecSpec(argv=["true"], shell="true"),
        ExecSpec(),
        ExecSpec(argv=[]),
        ExecSpec(argv="true"),  # type: ignore[arg-type]
        ExecSpec(argv=["echo", "nul\0byte"]),
        ExecSpec(argv=["true"], env={"BAD=NAME": "x"}),
        ExecSpec(argv=["true"], env={"N": 1}),  # type: ignore[dict-item]
        ExecSpec(argv=["true"], timeout_s=float("nan")),
    ):
        assert (await code_of(bad))[0] == "invalid_request", bad


def _tool(directory: Path, says: str) -> None:
    directory.mkdir(exist_ok=True)
    tool = directory / "fleetbus-test-tool"
    tool.write_text(f"#!/bin/sh\necho {says}\n")
    tool.chmod(0o755)


async def test_exec_runs_what_a_fresh_path_search_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Commands named without a path are looked up in the parent and the answer reused
    # for a moment; what runs must still be what the child's own search would run.
    first, second = tmp_path / "first", tmp_path / "second"
    _tool(second, "second")
    path = f"{first}:{second}:{os.environ.get('PATH', '')}"

    async def run_tool() -> bytes:
        out = RecordingSink()
        result = await run_process(ExecSpec(argv=["fleetbus-test-tool"], env={"PATH": path}), out.write)
        assert result == ExecResult(exit_code=0)
        return out.data("stdout")

    assert await run_tool() == b"second\n"
    # Removed while remembered: searched again at once, not reported missing.
    monkeypatch.setattr(executables, "REMEMBER_S", 3600.0)
    _tool(first, "first")
    assert executables.resolve("fleetbus-test-tool", {"PATH": path}) == str(second / "fleetbus-test-tool")
    (second / "fleetbus-test-tool").unlink()
    assert await run_tool() == b"first\n"
    # Installed earlier on PATH: found once the remembered answer is older than REMEMBER_S.
    _tool(second, "second")
    (first / "fleetbus-test-tool").unlink()
    monkeypatch.setattr(executables, "REMEMBER_S", 0.0)
    assert await run_tool() == b"second\n"


def test_path_lookup_matches_execvp(tmp_path: Path) -> None:
    not_executable, a_directory, good = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for directory in (not_executable, a_directory, good):
        directory.mkdir()
    (not_executable / "tool").write_text("#!/bin/sh\n")
    (not_executable / "tool").chmod(0o644)
    (a_directory / "tool").mkdir()
    (good / "tool").write_text("#!/bin/sh\n")
    (good / "tool").chmod(0o755)
    env = {"PATH": f"{not_executable}:{a_directory}:{good}"}
    assert executables.resolve("tool", env) == str(good / "tool")  # as execvp: skips both
    assert executables.resolve(str(good / "tool"), env) is None  # a path is used as given
    assert executables.resolve("no-such-tool", env) is None  # left to the child, which reports it
    assert executables.resolve("tool", {"PATH": f"relative:{good}"}) is None  # depends on the cwd
    assert executables.resolve("tool", {"PATH": f":{good}"}) is None  # "" is the cwd
    assert executables.resolve("tool", {}) is None  # no PATH: exec's default search


# ---------------------------------------------------------------- put


async def test_put_is_atomic_and_applies_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old content")
    target.chmod(0o644)
    midway: list[tuple[list[str], bytes]] = []

    async def source() -> AsyncIterator[bytes]:
        yield b"n" * (2 * 1024 * 1024)  # past the write batch, so some is on disk
        midway.append((temp_files(tmp_path), target.read_bytes()))
        yield b"end"

    result = await put_file(PutSpec(path=str(target), mode=0o4750), source())
    [(temps, content)] = midway
    assert len(temps) == 1 and content == b"old content"
    assert result.size == 2 * 1024 * 1024 + 3 and result.mode == 0o4750
    assert stat.S_IMODE(target.stat().st_mode) == 0o4750
    assert target.read_bytes().endswith(b"nend")
    assert temp_files(tmp_path) == []


async def test_put_keeps_a_large_file_out_of_the_page_cache(tmp_path: Path) -> None:
    require_droppable_cache(tmp_path)
    block = os.urandom(1024 * 1024)
    size = 3 * DROP_EVERY
    large, small = tmp_path / "large.bin", tmp_path / "small.bin"
    assert (await put_file(PutSpec(path=str(large)), chunks(*[block] * (size // len(block))))).size == size
    await put_file(PutSpec(path=str(small)), chunks(block))
    # Complete (fsynced, so every page is clean): the large file is gone from the
    # cache. How much of it is cached midway depends on how fast the disk writes back,
    # so that is not asserted.
    assert resident_fraction(large) < 0.05
    # A small file, likely read back soon, stays cached as any write would leave it.
    assert resident_fraction(small) > 0.9
    assert large.read_bytes() == block * (size // len(block))


async def test_put_default_mode_and_kept_mode(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b" / "new"
    old_umask = os.umask(0o077)  # the default mode must not depend on the umask
    try:
        result = await put_file(PutSpec(path=str(new)), chunks(b"hello ", b"", b"world"))
    finally:
        os.umask(old_umask)
    assert (result.size, result.mode) == (11, 0o644)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644 and new.read_bytes() == b"hello world"

    new.chmod(0o600)
    assert (await put_file(PutSpec(path=str(new)), chunks(b"x"))).mode == 0o600
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


async def test_put_failure_or_cancellation_leaves_the_target(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (1024 * 1024)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        await put_file(PutSpec(path=str(target)), broken())
    with pytest.raises(OpError, match="size mismatch") as info:
        await put_file(PutSpec(path=str(target), size=10), chunks(b"12345"))
    assert info.value.code == "transport_error"

    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x" * (2 * 1024 * 1024)
        await never.wait()
        yield b"unreachable"

    task = asyncio.create_task(put_file(PutSpec(path=str(target)), stalled()))
    await wait_until(lambda: len(temp_files(tmp_path)) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: temp_files(tmp_path) == [])
    assert target.read_bytes() == b"old"


async def test_put_errors_have_bus_codes(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (PutSpec(path="relative/f"), "invalid_request", "absolute"),
        (PutSpec(path=str(tmp_path)), "invalid_request", "is a directory"),
        (PutSpec(path=str(tmp_path / "d") + "/"), "invalid_request", "names a directory"),
        (PutSpec(path=str(fifo)), "invalid_request", "not a regular file"),
        (PutSpec(path=str(tmp_path / "f"), mode=0o10000), "invalid_request", "mode"),
        (
            PutSpec(path=str(tmp_path / "missing" / "f"), make_parents=False),
            "not_found",
            "no such directory",
        ),
    ]
    for spec, code, words in cases:
        with pytest.raises(OpError, match=words) as info:
            await put_file(spec, chunks(b"x"))
        assert info.value.code == code, spec
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- get


async def test_get_is_chunked_and_round_trips(tmp_path: Path) -> None:
    data = os.urandom(5 * GET_CHUNK + 123)
    path = tmp_path / "big"
    path.write_bytes(data)
    path.chmod(0o640)
    remote = await get_file(str(path))
    assert (remote.size, remote.mode) == (len(data), 0o640)
    digest = hashlib.sha256()
    sizes = []
    async for chunk in remote.chunks:
        sizes.append(len(chunk))
        digest.update(chunk)
    assert max(sizes) == GET_CHUNK and len(sizes) == 6
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()

    # Put and get agree with each other.
    copy = tmp_path / "copy"
    await put_file(PutSpec(path=str(copy), size=len(data)), (await get_file(str(path))).chunks)
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_get_reads_the_size_it_reported_and_closes(tmp_path: Path) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(b"0123456789")
    remote = await get_file(str(path))
    with open(path, "ab") as f:  # noqa: ASYNC230 - the file must grow while the get is open
        f.write(b"appended after the get started")
    assert b"".join([chunk async for chunk in remote.chunks]) == b"0123456789"

    remote = await get_file(str(path))
    await remote.aclose()  # before the first chunk
    assert [chunk async for chunk in remote.chunks] == []


async def test_get_errors_have_bus_codes(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (str(tmp_path / "missing"), "not_found", "no such file"),
        (str(tmp_path / "missing" / "below"), "not_found", "no such file"),
        (str(tmp_path), "invalid_request", "is a directory"),
        (str(fifo), "invalid_request", "not a regular file"),
        ("relative", "invalid_request", "absolute"),
        ("", "invalid_request", "empty"),
    ]
    for path, code, words in cases:
        with pytest.raises(OpError, match=words) as info:
            await asyncio.wait_for(get_file(path), DEADLINE_S)
        assert info.value.code == code, path


# ---------------------------------------------------------------- info, blocking


def test_server_facts() -> None:
    facts = server_facts()
    assert facts.hostname == socket.gethostname()
    assert (facts.os, facts.kernel, facts.arch) == (
        platform.system(),
        platform.release(),
        platform.machine(),
    )
    if os.path.exists("/etc/os-release") or os.path.exists("/usr/lib/os-release"):
        assert facts.os_version == platform.freedesktop_os_release()["PRETTY_NAME"]
    if platform.system() == "Linux":
        assert facts.uptime_s is not None and facts.uptime_s > 0
    assert set(facts.extra) == {"python", "user"}
    assert facts.to_dict()["hostname"] == facts.hostname


def test_os_release_parsing() -> None:
    parsed = parse_os_release(
        ['PRETTY_NAME="Some \\"Linux\\" 1.0"\n', "ID=some\n", "# comment\n", "VERSION_ID='1'\n"]
    )
    assert parsed["PRETTY_NAME"] == 'Some "Linux" 1.0'
    assert (parsed["ID"], parsed["VERSION_ID"], parsed["NAME"]) == ("some", "1", "Linux")
    assert parse_os_release([])["PRETTY_NAME"] == "Linux"


async def test_thread_runner_runs_off_the_loop_and_is_bounded() -> None:
    runner = ThreadRunner(max_workers=2)
    running = 0
    peak = 0
    lock = threading.Lock()

    def work() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return threading.current_thread().name

    try:
        names = await asyncio.gather(*(runner(work) for _ in range(6)))
    finally:
        runner.shutdown()
    assert peak == 2
    assert all(name.startswith("fleetbus-ops") for name in names)
    assert default_run_blocking() is default_run_blocking()


# ---------------------------------------------------------------- standard library only

# Imports every module of the agent package from sys.argv[1] (a folder or a zip) with
# nothing else on sys.path but the standard library, then fails if any module came
# from anywhere else. Runs unchanged on every Python the agent supports.
IMPORT_CHECK = textwrap.dedent(
    """
    import importlib, os, pkgutil, sys
    root = sys.argv[1]
    sys.path.insert(0, root)
    import fleetbus_agent, fleetbus_base
    names = ["fleetbus_agent", "fleetbus_base"] + [
        m.name
        for package in (fleetbus_agent, fleetbus_base)
        for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]
    for name in names:
        if name.rsplit(".", 1)[-1] != "__main__":  # importing it would run the agent
            importlib.import_module(name)
    assert "fleetbus_base.ops.process" in names, names
    loaded = dict(sys.modules)  # before sysconfig, which this check needs, is imported
    import sysconfig
    ours = ("fleetbus_agent", "fleetbus_base")
    allowed = [os.path.join(os.path.realpath(root), package) for package in ours] + [
        os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")
    ]
    stdlib_names = getattr(sys, "stdlib_module_names", None)
    foreign = []
    for name, module in sorted(loaded.items()):
        top = name.split(".")[0]
        if top == "__main__":  # this script
            continue
        if stdlib_names is not None and top not in stdlib_names and top not in ours:
            foreign.append(name)
            continue
        origin = getattr(module, "__file__", None)
        if origin and not any(
            os.path.realpath(origin).startswith(base + os.sep) for base in allowed
        ):
            foreign.append(name + " from " + origin)
    if foreign:
        sys.exit("not from the standard library: " + ", ".join(foreign))
    print(len(names), "modules")
    """
)


def run_isolated(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    # -I: no PYTHONPATH, no user site, no script folder on sys.path; -S: no site
    # module, so no site-packages (where pydantic and fleetbus core live).
    return subprocess.run(
        [python, "-I", "-S", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", os.defpath)},
    )


def build_zip(tmp_path: Path) -> Path:
    """The agent's packages (fleetbus_agent, fleetbus_base) as a zip, as they travel in its zipapp."""
    archive = tmp_path / "agent.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for src in sorted(AGENT_DIR.rglob("*.py")):
            zf.write(src, src.relative_to(AGENT_DIR).as_posix())
    return archive


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_agent_package_imports_only_the_standard_library(tmp_path: Path, form: str) -> None:
    root = str(AGENT_DIR) if form == "folder" else str(build_zip(tmp_path))
    proc = run_isolated(sys.executable, "-c", IMPORT_CHECK, root)
    assert proc.returncode == 0, proc.stderr
    assert "modules" in proc.stdout


def find_python(version: str) -> str | None:
    """A working interpreter of ``version`` ("3.9"), or None.

    pyenv puts shims on PATH that exist but refuse to run unless that version is
    selected, so each candidate is asked for its version.
    """
    candidates = [shutil.which(f"python{version}")]
    for root in ("~/.pyenv/versions", "/root/.pyenv/versions", "/opt/python", "/usr/local"):
        pattern = os.path.join(os.path.expanduser(root), f"{version}*", "bin", f"python{version}")
        candidates += sorted(glob.glob(pattern))
    want = tuple(int(part) for part in version.split("."))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            proc = subprocess.run(
                [candidate, "-c", "import sys; print(tuple(sys.version_info[:2]))"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and proc.stdout.strip() == str(want):
            return candidate
    return None


OLD_PYTHONS = ["3.9", "3.10"]  # 3.9 is the agent's floor; 3.10 also lacks asyncio.timeout


@pytest.fixture(params=OLD_PYTHONS)
def old_python(request: pytest.FixtureRequest) -> str:
    python = find_python(request.param)
    if python is None:
        pytest.skip(f"no Python {request.param} interpreter on this machine")
    return python


def test_agent_package_compiles_and_imports_on_old_python(
    old_python: str, tmp_path: Path
) -> None:
    # Byte-compiling catches syntax the old parser refuses (match, except*, ...);
    # importing catches what only fails when evaluated (X | Y outside annotations,
    # newer stdlib names).
    compile_all = textwrap.dedent(
        """
        import pathlib, py_compile, sys
        root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        for i, src in enumerate(sorted(root.rglob("*.py"))):
            py_compile.compile(str(src), cfile=str(out / f"{i}.pyc"), doraise=True)
        """
    )
    proc = run_isolated(old_python, "-c", compile_all, str(AGENT_DIR), str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    proc = run_isolated(old_python, "-c", IMPORT_CHECK, str(AGENT_DIR))
    assert proc.returncode == 0, proc.stderr


# exec, cancel, backstop, put, get and info end to end, on the old interpreter's asyncio.
OLD_PYTHON_SMOKE = textwrap.dedent(
    """
    import asyncio, hashlib, os, sys
    sys.path.insert(0, sys.argv[1])
    from fleetbus_base import ops
    tmp = sys.argv[2]

    def alive(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    async def main():
        out = []
        async def write(stream, data):
            out.append((stream, data))
        result = await ops.run_process(ops.ExecSpec(shell="echo hi; echo err >&2; exit 3"), write)
        assert result == ops.ExecResult(exit_code=3), result
        assert out == [("stdout", b"hi\\n"), ("stderr", b"err\\n")], out

        try:
            await ops.run_process(ops.ExecSpec(argv=["fleetbus-no-such-command"]), write)
        except ops.OpError as exc:
            assert exc.code == "not_found", exc
        else:
            raise AssertionError("no error for a missing command")

        out.clear()
        spec = ops.ExecSpec(shell='trap "" TERM; sleep 300 & echo "$$ $!"; wait')
        task = asyncio.ensure_future(
            ops.run_process(spec, write, timings=ops.ProcessTimings(term_grace_s=0.2))
        )
        while not out:
            await asyncio.sleep(0.02)
        leader, child = (int(pid) for pid in out[0][1].split())
        task.cancel()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("cancel did not propagate")
        for _ in range(250):
            if not alive(leader) and not alive(child):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("process group survived cancel")

        try:
            await ops.run_process(
                ops.ExecSpec(shell="sleep 300", timeout_s=0.1),
                write,
                timings=ops.ProcessTimings(timeout_backstop_s=0.1),
            )
        except ops.OpError as exc:
            assert exc.code == "timeout", exc
        else:
            raise AssertionError("no timeout")

        data = os.urandom(3 * ops.GET_CHUNK + 5)
        async def source():
            yield data[:1000]
            yield data[1000:]
        path = os.path.join(tmp, "sub", "f")
        stat = await ops.put_file(ops.PutSpec(path, mode=0o600, size=len(data)), source())
        assert (stat.size, stat.mode) == (len(data), 0o600), stat
        remote = await ops.get_file(path)
        got = [chunk async for chunk in remote.chunks]
        assert max(map(len, got)) == ops.GET_CHUNK
        assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()
        try:
            await ops.get_file(os.path.join(tmp, "missing"))
        except ops.OpError as exc:
            assert exc.code == "not_found", exc
        else:
            raise AssertionError("no error for a missing file")

        assert ops.server_facts().to_dict()["hostname"]

    asyncio.run(main())
    print("ok")
    """
)


def test_operations_work_on_old_python(old_python: str, tmp_path: Path) -> None:
    proc = run_isolated(old_python, "-c", OLD_PYTHON_SMOKE, str(AGENT_DIR), str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
