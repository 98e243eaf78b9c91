"""The conformance suite: the Session contract of :mod:`fleetbus.transport` as pytest tests.

A transport author subclasses :class:`TransportConformance` in their own test module and
provides two fixtures: ``session`` (an open :class:`~fleetbus.transport.Session` to a
real server, closed after the test) and ``scratch`` (an empty folder on that server, as
the server spells paths; the default is pytest's ``tmp_path``, right when the server is
this machine). Every test method then runs against the transport::

    class TestMyTransport(TransportConformance):
        python = ("python3",)          # how to run Python on the server

        @pytest.fixture
        async def session(self, my_server):
            async with FakeContext("mine") as ctx:
                s = await MyTransport(ctx).open(my_server.record(), my_server.credential())
                yield s
                await s.close()

The test programs are one-line Python scripts run with ``python`` (a class attribute),
so the server needs a Python 3 interpreter; they touch only ``scratch``. Capabilities a
transport lacks are named in ``lacks`` (capability -> reason) and skip the tests that
need them with that reason; a rule the transport knowingly breaks
goes into ``known_gaps`` (test name -> reason) and is then expected to fail (strictly:
once fixed, the test reports it). Nothing else is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest

from ..errors import FleetbusError, NotFound, TransportError
from ..transport import ExecResult, ExecSpec, FileStat, PutSpec, RemoteFile, ServerFacts, Session
from .sinks import CollectingSink, SlowSink

DEADLINE_S = 15.0  # plugins.md: cancellation must stop the remote work well within 15 s
MIB = 1 << 20
CAPABILITIES = frozenset({"signals", "file_modes", "empty_default_stdin", "python"})


async def chunks_of(data: bytes, size: int = 256 * 1024,
                    fail: BaseException | None = None) -> AsyncIterator[bytes]:
    """``data`` as a put source of ``size``-byte chunks; ``fail`` is raised after the last."""
    for start in range(0, len(data), size):
        yield data[start:start + size]
    if fail is not None:
        raise fail


async def read_all(remote: RemoteFile) -> bytes:
    try:
        return b"".join([chunk async for chunk in remote.chunks])
    finally:
        await remote.aclose()


def pattern(size: int, seed: bytes = b"fleetbus") -> bytes:
    """``size`` bytes that differ along their length, so a lost or moved chunk shows."""
    block = hashlib.sha256(seed).digest() * 2048
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(8, "big") + block[: 4096 - 8]
        counter += 1
    return bytes(out[:size])


class TransportConformance:
    """Inherit this in a test class and provide ``session`` (and maybe ``scratch``)."""

    #: The command that runs Python 3 on the server.
    python: ClassVar[tuple[str, ...]] = ("python3",)
    #: The separator of the server's paths.
    path_separator: ClassVar[str] = "/"
    #: Capabilities this transport lacks, each with the reason shown when its tests
    #: skip: ``signals`` (a process can die of a signal, reported as
    #: ``ExecResult(None, signal)``), ``file_modes`` (``put`` applies ``PutSpec.mode``,
    #: ``put`` and ``get`` report it), ``empty_default_stdin`` (with ``stdin=None`` a
    #: process reading its standard input gets end of file at once), ``python`` (the
    #: server runs ``python`` programs: without it only the transport-neutral tests run).
    lacks: ClassVar[dict[str, str]] = {}
    #: Rules this transport is known to break: test method name -> why. They run and
    #: must fail (strict xfail), so a fix shows up as a pass to remove from this list.
    known_gaps: ClassVar[dict[str, str]] = {}

    DIGEST_STDIN = "import hashlib,sys; d=sys.stdin.buffer.read(); print(len(d), hashlib.sha256(d).hexdigest())"

    # --------------------------------------------------------------- fixtures to provide

    @pytest.fixture
    async def session(self) -> AsyncIterator[Session]:
        """An open session to a real server; override it. Closed by the fixture."""
        raise NotImplementedError(f"{type(self).__name__} must provide a `session` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def scratch(self, tmp_path: Any) -> str:
        """An empty folder on the server; the default fits servers that are this machine."""
        return str(tmp_path)

    @pytest.fixture(autouse=True)
    def _known_gap(self, request: pytest.FixtureRequest) -> None:
        unknown = set(self.lacks) - CAPABILITIES
        if unknown:  # a misspelt capability would otherwise skip nothing, silently
            raise TypeError(f"{type(self).__name__}.lacks names unknown capabilities {sorted(unknown)}; "
                            f"known: {sorted(CAPABILITIES)}")
        name = request.node.originalname
        if name in self.known_gaps:
            request.applymarker(pytest.mark.xfail(reason=f"known gap: {self.known_gaps[name]}", strict=True))

    # --------------------------------------------------------------- helpers

    def join(self, *parts: str) -> str:
        return self.path_separator.join(parts)

    def py(self, code: str, **kw: Any) -> ExecSpec:
        """An ExecSpec running ``code`` (one line) with the server's Python."""
        self.require("python")
        return ExecSpec(argv=[*self.python, "-c", code], shell=None, **kw)

    def require(self, capability: str) -> None:
        if capability in self.lacks:
            pytest.skip(f"{type(self).__name__} lacks {capability}: {self.lacks[capability]}")

    async def run(self, session: Session, spec: ExecSpec,
                  sink: CollectingSink | None = None) -> tuple[ExecResult, CollectingSink]:
        sink = sink or CollectingSink()
        async with asyncio.timeout(60):
            result = await session.exec(spec, sink)
        sink.close()
        assert isinstance(result, ExecResult), f"exec returned {result!r}, not an ExecResult"
        assert sink.violations == [], sink.violations
        return result, sink

    async def exists(self, session: Session, path: str) -> bool:
        try:
            await (await session.get(path)).aclose()
        except NotFound:
            return False
        return True

    async def late_marker_proof(self, session: Session, scratch: str, start: Callable[[str], Awaitable[None]]) -> None:
        """Prove a process stopped: it would write ``late`` after DELAY; a witness started
        after it with the same delay writes ``witness``; once the witness has, ``late``
        must still be absent."""
        self.require("python")
        delay = 1.0
        code = ("import pathlib,sys,time; print('started', flush=True); "
                f"time.sleep({delay}); pathlib.Path(sys.argv[1]).write_text('done')")
        await start(code)
        witness, _ = await self.run(session, ExecSpec(argv=[*self.python, "-c", code, "witness"], shell=None,
                                                      cwd=scratch))
        assert witness == ExecResult(exit_code=0)
        assert await self.exists(session, self.join(scratch, "witness"))
        assert not await self.exists(session, self.join(scratch, "late")), \
            "the stopped process went on running and wrote its marker"

    # --------------------------------------------------------------- exec

    async def test_exec_argv_exit_code_and_streams(self, session: Session) -> None:
        """exec(argv) runs the program, returns ExecResult(exit_code=N), and keeps stdout and stderr apart."""
        code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
        result, sink = await self.run(session, self.py(code))
        assert result == ExecResult(exit_code=3, signal=None)
        assert sink.data("stdout").replace(b"\r\n", b"\n") == b"out\n"
        assert sink.data("stderr").replace(b"\r\n", b"\n") == b"err\n"
        for code_ in (0, 42):
            result, _ = await self.run(session, self.py(f"raise SystemExit({code_})"))
            assert result == ExecResult(exit_code=code_)

    async def test_exec_argv_is_passed_verbatim(self, session: Session) -> None:
        """argv items reach the program as they are: no shell expands, splits or globs them."""
        self.require("python")
        args = ["$HOME;", "*", "a b", 'q"uote', "back\\slash", ""]
        spec = ExecSpec(argv=[*self.python, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *args],
                        shell=None)
        result, sink = await self.run(session, spec)
        assert result.exit_code == 0, sink.text("stderr")
        assert json.loads(sink.data("stdout")) == args

    async def test_exec_shell(self, session: Session) -> None:
        """exec(shell) runs one command line with the server's shell and returns its exit code."""
        result, sink = await self.run(session, ExecSpec(argv=None, shell="echo conformance-shell"))
        assert result.exit_code == 0
        assert b"conformance-shell" in sink.data("stdout")
        result, _ = await self.run(session, ExecSpec(argv=None, shell="exit 7"))
        assert result == ExecResult(exit_code=7)

    async def test_exec_signal_death(self, session: Session) -> None:
        """A process killed by a signal ends as ExecResult(exit_code=None, signal=N), not as an error."""
        self.require("signals")
        for sig in (9, 15):
            result, _ = await self.run(session, self.py(f"import os; os.kill(os.getpid(), {sig})"))
            assert result == ExecResult(exit_code=None, signal=sig)

    async def test_exec_stdin(self, session: Session) -> None:
        """stdin bytes (any, binary too) reach the process whole, then end of file."""
        data = pattern(4096, b"stdin") + b"\x00\xff\r\n"
        result, sink = await self.run(session, self.py(self.DIGEST_STDIN, stdin=data))
        assert result.exit_code == 0, sink.text("stderr")
        assert sink.text("stdout").split() == [str(len(data)), hashlib.sha256(data).hexdigest()]

    async def test_exec_without_stdin_reads_end_of_file(self, session: Session) -> None:
        """With stdin None, standard input is empty: a process reading it gets end of file at once."""
        self.require("empty_default_stdin")
        result, sink = await self.run(session, self.py(self.DIGEST_STDIN))
        assert result.exit_code == 0, sink.text("stderr")
        assert sink.text("stdout").split()[0] == "0"

    async def test_exec_large_stdin(self, session: Session) -> None:
        """stdin of hundreds of KiB (the bus takes up to about 750 KiB in one request) reaches the process whole."""
        data = pattern(300 * 1024, b"large stdin")
        result, sink = await self.run(session, self.py(self.DIGEST_STDIN, stdin=data))
        assert result.exit_code == 0, sink.text("stderr")
        assert sink.text("stdout").split() == [str(len(data)), hashlib.sha256(data).hexdigest()]

    async def test_exec_env(self, session: Session) -> None:
        """env adds variables to the process's environment, values verbatim."""
        env = {"FLEETBUS_CONFORMANCE_A": "one two", "FLEETBUS_CONFORMANCE_B": "$x;%y%"}
        code = "import json,os; print(json.dumps({k: os.environ.get(k) for k in sorted(os.environ) if 'CONFORMANCE' in k}))"
        result, sink = await self.run(session, self.py(code, env=env))
        assert result.exit_code == 0, sink.text("stderr")
        assert json.loads(sink.data("stdout")) == env

    async def test_exec_cwd(self, session: Session, scratch: str) -> None:
        """cwd is the process's working folder."""
        await session.put(PutSpec(path=self.join(scratch, "probe.txt")), chunks_of(b"in the cwd"))
        result, sink = await self.run(session, self.py("print(open('probe.txt').read())", cwd=scratch))
        assert result.exit_code == 0, sink.text("stderr")
        assert sink.text("stdout").strip() == "in the cwd"

    async def test_exec_missing_program_is_not_found(self, session: Session) -> None:
        """A program that does not exist is NotFound (bus code not_found), not an exit code."""
        spec = ExecSpec(argv=["fleetbus-conformance-no-such-program", "x"], shell=None)
        with pytest.raises(NotFound):
            await self.run(session, spec)

    async def test_exec_missing_cwd_is_not_found(self, session: Session, scratch: str) -> None:
        """A cwd that does not exist is NotFound."""
        with pytest.raises(NotFound):
            await self.run(session, self.py("print(1)", cwd=self.join(scratch, "no-such-folder")))

    async def test_output_streams_while_the_process_runs(self, session: Session, scratch: str) -> None:
        """Output reaches the sink as it is produced: the process waits for a file the test
        writes only after it saw the first line."""
        code = ("import os,time; print('ready', flush=True); "
                "[time.sleep(0.02) for _ in iter(lambda: os.path.exists('go'), True)]; print('done')")
        sink = CollectingSink()
        task = asyncio.create_task(self.run(session, self.py(code, cwd=scratch), sink))
        try:
            await sink.wait_for(lambda: b"ready" in sink.data("stdout"), DEADLINE_S)
            await session.put(PutSpec(path=self.join(scratch, "go")), chunks_of(b"go"))
            result, _ = await asyncio.wait_for(task, DEADLINE_S)
        finally:
            task.cancel()
        assert result.exit_code == 0
        assert sink.text("stdout").split() == ["ready", "done"]

    async def test_output_size_order_and_back_pressure(self, session: Session) -> None:
        """Megabytes of output arrive whole and in order per stream, to a slow sink, one write at a time."""
        code = ("import sys; [(sys.stdout.write('%08d-%s\\n' % (i, 'o' * 54)), "
                "i % 16 or sys.stderr.write('%08d\\n' % i)) for i in range(49152)]")
        sink = SlowSink()
        result, _ = await self.run(session, self.py(code), sink)
        assert result.exit_code == 0, sink.text("stderr")[-500:]
        out = sink.data("stdout").replace(b"\r\n", b"\n")
        assert out == b"".join(b"%08d-%s\n" % (i, b"o" * 54) for i in range(49152))  # 3 MiB
        err = sink.data("stderr").replace(b"\r\n", b"\n")
        assert err == b"".join(b"%08d\n" % i for i in range(0, 49152, 16))
        assert sink.max_in_flight == 1, "a write began before the previous one returned"

    async def test_cancel_stops_the_remote_process(self, session: Session, scratch: str) -> None:
        """Cancelling the task running exec stops the remote process and lets CancelledError through."""

        async def start(code: str) -> None:
            sink = CollectingSink()
            task = asyncio.create_task(session.exec(
                ExecSpec(argv=[*self.python, "-c", code, "late"], shell=None, cwd=scratch), sink))
            await sink.wait_for(lambda: b"started" in sink.data("stdout"), DEADLINE_S)
            task.cancel()
            async with asyncio.timeout(DEADLINE_S):
                with pytest.raises(asyncio.CancelledError):
                    await task

        await self.late_marker_proof(session, scratch, start)

    async def test_timeout_stops_the_remote_process(self, session: Session, scratch: str) -> None:
        """A host time limit (asyncio.timeout around exec, as the host applies timeout_s) stops the process."""

        async def start(code: str) -> None:
            sink = CollectingSink()
            spec = ExecSpec(argv=[*self.python, "-c", code, "late"], shell=None, cwd=scratch, timeout_s=30.0)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(None) as limit:
                    task = asyncio.ensure_future(session.exec(spec, sink))
                    await sink.wait_for(lambda: b"started" in sink.data("stdout"), DEADLINE_S)
                    limit.reschedule(asyncio.get_running_loop().time())  # the limit runs out now
                    await task
            assert task.cancelled()

        await self.late_marker_proof(session, scratch, start)

    async def test_concurrent_commands_on_one_session(self, session: Session, scratch: str) -> None:
        """One session carries concurrent execs, puts, gets and pings, each with its own result."""
        self.require("python")
        data = pattern(200 * 1024, b"concurrent")

        async def one(i: int) -> None:
            code = f"import sys; sys.stdout.write('{i}:' + 'x' * 100000); sys.exit({i})"
            result, sink = await self.run(session, self.py(code))
            assert result.exit_code == i and sink.data("stdout") == f"{i}:".encode() + b"x" * 100000

        async def transfer(i: int) -> None:
            path = self.join(scratch, f"c{i}")
            await session.put(PutSpec(path=path), chunks_of(data + bytes([i])))
            assert await read_all(await session.get(path)) == data + bytes([i])

        async with asyncio.timeout(60):
            await asyncio.gather(*(one(i) for i in range(6)), *(transfer(i) for i in range(3)), session.ping())

    # --------------------------------------------------------------- put and get

    @pytest.mark.parametrize("size", [0, 1, 3 * MIB + 7], ids=["empty", "one-byte", "3MiB"])
    async def test_put_get_round_trip(self, session: Session, scratch: str, size: int) -> None:
        """put writes exactly the source's bytes and returns their count; get reads them back with the size."""
        data = pattern(size)
        path = self.join(scratch, "round.bin")
        stat = await session.put(PutSpec(path=path, size=size), chunks_of(data))
        assert isinstance(stat, FileStat) and stat.size == size
        remote = await session.get(path)
        assert remote.size == size
        assert await read_all(remote) == data

    async def test_put_replaces_a_file(self, session: Session, scratch: str) -> None:
        """put over an existing file replaces its content whole."""
        path = self.join(scratch, "replace.txt")
        await session.put(PutSpec(path=path), chunks_of(b"old content, longer than the new"))
        await session.put(PutSpec(path=path), chunks_of(b"new"))
        assert await read_all(await session.get(path)) == b"new"

    async def test_put_mode(self, session: Session, scratch: str) -> None:
        """PutSpec.mode is applied and reported by put's FileStat and by get."""
        self.require("file_modes")
        path = self.join(scratch, "mode.txt")
        stat = await session.put(PutSpec(path=path, mode=0o640), chunks_of(b"m"))
        assert stat.mode == 0o640
        remote = await session.get(path)
        await remote.aclose()
        assert remote.mode == 0o640

    async def test_put_make_parents(self, session: Session, scratch: str) -> None:
        """make_parents=True creates missing folders; with False a missing folder is NotFound."""
        path = self.join(scratch, "a", "b", "c.txt")
        await session.put(PutSpec(path=path, make_parents=True), chunks_of(b"deep"))
        assert await read_all(await session.get(path)) == b"deep"
        with pytest.raises(NotFound):
            await session.put(PutSpec(path=self.join(scratch, "x", "y.txt"), make_parents=False),
                              chunks_of(b"nowhere"))

    async def test_failed_put_leaves_nothing_at_the_path(self, session: Session, scratch: str) -> None:
        """A put whose source fails part way raises that error and leaves the old file (or no file) at the path."""
        old, new = self.join(scratch, "kept.bin"), self.join(scratch, "never.bin")
        await session.put(PutSpec(path=old), chunks_of(b"the old content"))
        for path in (old, new):
            failure = TransportError("the source broke part way")
            with pytest.raises(FleetbusError) as raised:
                await session.put(PutSpec(path=path, size=2 * MIB), chunks_of(pattern(MIB), fail=failure))
            assert raised.value is failure or isinstance(raised.value, TransportError)
        assert await read_all(await session.get(old)) == b"the old content"
        assert not await self.exists(session, new), "a failed put left a partial file at the path"

    async def test_cancelled_put_leaves_nothing_at_the_path(self, session: Session, scratch: str) -> None:
        """A put cancelled part way (a timeout) leaves no file at the path."""
        path = self.join(scratch, "cancelled.bin")
        gate = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield pattern(MIB)
            gate.set()
            await asyncio.Event().wait()  # the requester went silent
            yield b""  # pragma: no cover

        task = asyncio.create_task(session.put(PutSpec(path=path), stalled()))
        await asyncio.wait_for(gate.wait(), DEADLINE_S)
        task.cancel()
        async with asyncio.timeout(DEADLINE_S):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not await self.exists(session, path)

    async def test_get_missing_is_not_found(self, session: Session, scratch: str) -> None:
        """get of a path that does not exist raises NotFound."""
        with pytest.raises(NotFound):
            await read_all(await session.get(self.join(scratch, "no-such-file")))

    async def test_get_closed_unread(self, session: Session, scratch: str) -> None:
        """A RemoteFile closed before it was read releases cleanly and the session goes on working."""
        path = self.join(scratch, "unread.bin")
        await session.put(PutSpec(path=path), chunks_of(pattern(MIB)))
        for _ in range(3):
            remote = await session.get(path)
            assert remote.size == MIB
            await remote.aclose()
        assert await read_all(await session.get(path)) == pattern(MIB)

    # --------------------------------------------------------------- info, ping, alive

    async def test_info_field_types(self, session: Session) -> None:
        """info returns ServerFacts: text facts are str or None, uptime a number or None, extra JSON-serializable."""
        facts = await asyncio.wait_for(session.info(), 30)
        assert isinstance(facts, ServerFacts)
        for name in ("hostname", "os", "os_version", "kernel", "arch"):
            value = getattr(facts, name)
            assert value is None or isinstance(value, str), f"{name} is {value!r}"
        assert facts.uptime_s is None or (isinstance(facts.uptime_s, (int, float))
                                          and not isinstance(facts.uptime_s, bool) and facts.uptime_s >= 0)
        assert isinstance(facts.extra, dict)
        json.dumps(facts.extra)

    async def test_ping(self, session: Session) -> None:
        """ping returns None when the server answers."""
        assert await asyncio.wait_for(session.ping(), 30) is None

    async def test_alive_and_close(self, session: Session) -> None:
        """A working session is alive; close() returns promptly (the host bounds it to 10 s)."""
        assert session.alive is True
        result, _ = await self.run(session, ExecSpec(argv=None, shell="exit 3"))
        assert result == ExecResult(exit_code=3)
        assert session.alive is True
        async with asyncio.timeout(10):
            await session.close()
