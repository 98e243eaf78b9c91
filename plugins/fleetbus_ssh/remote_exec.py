"""``exec`` over an SSH session channel.

The remote command line
-----------------------
sshd hands our command string to the user's login shell (``$SHELL -c``), which must be
a POSIX shell (sh, dash, bash, ksh, zsh). The string we send is a small wrapper, built
only from :func:`shlex.quote`-d pieces so no argv item, env value or cwd is ever
interpreted by the shell::

    cd -- '<cwd>' ...  || report a missing/unusable cwd, exit
    command -v -- '<argv0>' ... || report "command not found", exit
    export NAME='<value>' ...
    printf '%s %s %s\\n' fleetbus-<nonce> ok "$$" >&2
    exec '<argv0>' '<arg1>' ...          (or: exec /bin/sh -c '<shell>')

Stopping a command
------------------
Closing an SSH channel does not stop the remote process (no pty, so no SIGHUP), so a
cancelled or timed-out command is killed explicitly. OpenSSH's sshd starts every
session's shell with ``setsid()``, so ``$$`` is the id of a fresh process group (and
session) that holds the command and everything it starts; ``exec`` keeps that pid. The
wrapper reports it on stderr in a report line tagged with a random nonce, which we
strip from the stream (wherever it appears, since a login shell's rc files may print
first), so it never reaches the user's output. On cancel we open a second channel and
run ``kill -TERM -<pgid>``, wait up to ``term_grace_s`` for the group to go, then
``kill -KILL -<pgid>``; then close the command's channel.

Output
------
Both streams are read as data arrives and handed to the output sink chunk by chunk
(at most 64 KiB each), without holding a thread while waiting: the channel's
``fileno()`` (a pipe paramiko makes readable whenever data, EOF or close arrives) is
watched with ``loop.add_reader``; only the non-blocking ``recv`` calls themselves go
through ``run_blocking`` (a recv may send a window adjustment, which can block during
a key re-exchange). The next chunk is read only once the sink accepted the previous
one, so a slow consumer holds the remote process back through SSH flow control.

Exit status: ``exit-status`` gives the code; ``exit-signal`` (which paramiko drops; see
:mod:`.connection`) gives the signal, reported as ``ExecResult(None, signal=N)`` like
the local transport does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shlex
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import paramiko
from fleetbus.errors import FleetbusError, InvalidRequest, NotFound, Timeout, TransportError
from fleetbus.transport import ExecResult, ExecSpec, OutputSink
from fleetbus_base.text import readable, shorten

from .connection import EXIT_SIGNAL_ATTR, SshConnection, short
from .settings import SshSettings
from .slots import ChannelSlots

T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]

READ_CHUNK = 65536
"""The largest chunk handed to the output sink in one call."""

_POLL_S = 0.25
# A login shell's rc files may print on stderr before our report line; we hold stderr
# back until the line comes, but not more than this much of it.
_PREAMBLE_LIMIT = 64 * 1024
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STATUSES = ("ok", "nocwd", "notdir", "cwdperm", "nocmd")


def _report(tag: str, status: str) -> str:
    return f"printf '%s %s %s\\n' {tag} {status} \"$$\" >&2"


def _shown(value: str) -> str:
    return shorten(readable(value), 200)


def check_spec(spec: ExecSpec) -> None:
    """Refuse what cannot be sent safely (the core validates too; this is our own guard)."""
    if (spec.argv is None) == (spec.shell is None):
        raise InvalidRequest("exactly one of argv and shell must be set")
    if spec.argv is not None and (not spec.argv or not all(isinstance(a, str) for a in spec.argv)):
        raise InvalidRequest("argv must be a non-empty list of strings")
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name):
            raise InvalidRequest(f"invalid environment variable name {_shown(name)}")
        if "\0" in value:
            raise InvalidRequest(f"environment variable {name} contains a NUL byte")
    texts = [*(spec.argv or []), spec.shell or "", spec.cwd or ""]
    if any("\0" in text for text in texts):
        raise InvalidRequest("argv, shell and cwd must not contain NUL bytes")


def build_command(spec: ExecSpec, tag: str) -> str:
    """The command string for the login shell; see the module docstring."""
    q = shlex.quote
    lines: list[str] = []
    if spec.cwd is not None:
        cwd = q(spec.cwd)
        lines += [
            f"if ! cd -- {cwd} 2>/dev/null; then",
            f"  if [ ! -e {cwd} ]; then {_report(tag, 'nocwd')};",
            f"  elif [ ! -d {cwd} ]; then {_report(tag, 'notdir')};",
            f"  else {_report(tag, 'cwdperm')}; fi",
            "  exit 126",
            "fi",
        ]
    if spec.argv is not None:
        lines.append(f"command -v -- {q(spec.argv[0])} >/dev/null 2>&1 || "
                     f"{{ {_report(tag, 'nocmd')}; exit 127; }}")
    lines += [f"export {name}={q(value)}" for name, value in spec.env.items()]
    lines.append(_report(tag, "ok"))
    if spec.argv is not None:
        lines.append("exec " + " ".join(q(arg) for arg in spec.argv))
    else:
        assert spec.shell is not None
        lines.append(f"exec /bin/sh -c {q(spec.shell)}")
    return "\n".join(lines)


def kill_script(pgid: int, term_grace_s: float) -> str:
    """SIGTERM the process group, wait for it to go, SIGKILL what is left.

    Run by ``/bin/sh`` whatever the login shell. Where /proc exists, zombies do not
    count as members still running (``kill -0`` alone would count them, and where init
    is slow to reap orphans that would always cost the whole grace period). Falls back
    to the single process if ``pgid`` is not a group (an sshd that did not ``setsid()``).
    """
    steps = max(1, round(term_grace_s * 10))
    script = "\n".join([
        f"p={int(pgid)}; t=-$p",
        "running() {",
        "  kill -s 0 -- $t 2>/dev/null || return 1",
        "  [ $t = $p ] || [ ! -r /proc/self/stat ] && return 0",
        "  for f in /proc/[0-9]*/stat; do",
        "    IFS= read -r l < $f 2>/dev/null || continue",
        "    l=${l##*) }; set -- $l",
        "    [ \"$3\" = $p ] && [ \"$1\" != Z ] && return 0",
        "  done",
        "  return 1",
        "}",
        "kill -s TERM -- $t 2>/dev/null || { t=$p; kill -s TERM -- $t 2>/dev/null; } || exit 0",
        "i=0",
        "while running; do",
        f"  if [ $i -ge {steps} ]; then kill -s KILL -- $t 2>/dev/null; exit 0; fi",
        "  sleep 0.1 2>/dev/null || sleep 1",
        "  i=$((i+1))",
        "done",
        "exit 0",
    ])
    return f"exec /bin/sh -c {shlex.quote(script)}"


class PreambleFilter:
    """Finds and removes the wrapper's report line from stderr.

    Stderr is held back until the line arrives (it comes before the command starts, so
    only a login shell's own noise can precede it), then everything but the line
    passes through untouched.
    """

    def __init__(self, tag: str, limit: int = _PREAMBLE_LIMIT) -> None:
        self._pattern = re.compile(re.escape(tag.encode()) + rb" ([a-z]+) ([0-9]+)\n")
        self._held = bytearray()
        self._limit = limit
        self.done = False
        self.status: str | None = None
        self.pid: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Stderr bytes in; the bytes to pass on out (possibly none yet)."""
        if self.done:
            return data
        self._held += data
        match = self._pattern.search(self._held)
        if match is not None and match.group(1).decode() in _STATUSES:
            self.status = match.group(1).decode()
            self.pid = int(match.group(2))
            passed = bytes(self._held[: match.start()] + self._held[match.end():])
            self._held.clear()
            self.done = True
            return passed
        if len(self._held) > self._limit:
            return self.flush()
        return b""

    def flush(self) -> bytes:
        """Give up waiting for the line (end of stream): release what was held."""
        self.done = True
        passed = bytes(self._held)
        self._held.clear()
        return passed


class _Refused(Exception):
    """The wrapper refused to start the command (bad cwd, unknown command)."""

    def __init__(self, error: FleetbusError) -> None:
        super().__init__(error.message)
        self.error = error


class _BackstopExpired(Exception):
    pass


def _ready(chan: paramiko.Channel) -> bool:
    return chan.recv_ready() or chan.recv_stderr_ready() or chan.eof_received or chan.closed


def _drain(chan: paramiko.Channel, limit: int) -> tuple[bytes, bytes, bool]:
    """What has arrived on both streams (never waits), and whether both have ended."""
    out = chan.recv(limit) if chan.recv_ready() else b""
    err = chan.recv_stderr(limit) if chan.recv_stderr_ready() else b""
    ended = (chan.eof_received or chan.closed) and not chan.recv_ready() and not chan.recv_stderr_ready()
    return out, err, ended


def _open(conn: SshConnection, window: int, command: str, no_stdin: bool) -> tuple[paramiko.Channel, int]:
    chan = conn.open_session(window)
    try:
        chan.exec_command(command)
        if no_stdin:
            # EOF at once, as </dev/null: a command that reads stdin must not hang.
            chan.shutdown_write()
        return chan, chan.fileno()
    except paramiko.SSHException as exc:
        chan.close()
        raise TransportError(f"{conn.name} refused to run the command: {short(exc)}") from None
    except BaseException:
        chan.close()
        raise


def _send_stdin(chan: paramiko.Channel, data: bytes) -> None:
    try:
        if data:
            chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        # The process exited (or was stopped) without reading it all: dropped quietly,
        # as a pipe would.
        pass


def _signal_number(name: str) -> int | None:
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return None


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class RemoteExec:
    """One ``exec`` on a connection: start, stream, report how it ended, or stop it."""

    def __init__(self, conn: SshConnection, slots: ChannelSlots, settings: SshSettings,
                 run_blocking: RunBlocking, logger: logging.Logger) -> None:
        self.conn = conn
        self.slots = slots
        self.settings = settings
        self.run_blocking = run_blocking
        self.logger = logger
        self.loop = asyncio.get_running_loop()
        self.chan: paramiko.Channel | None = None
        self.fd: int | None = None
        self.filter: PreambleFilter | None = None
        self._opening: asyncio.Future[tuple[paramiko.Channel, int]] | None = None
        self._stdin: asyncio.Future[None] | None = None
        self._slot_held = False

    async def run(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        check_spec(spec)
        tag = f"fleetbus-{secrets.token_hex(12)}"
        self.filter = PreambleFilter(tag)
        command = build_command(spec, tag)
        deadline = None
        if spec.timeout_s is not None:
            deadline = self.loop.time() + spec.timeout_s + self.settings.timeout_backstop_s
        await self.slots.acquire()
        self._slot_held = True
        try:
            result = await self._execute(command, spec.stdin, output, deadline)
        except _Refused as refused:
            await self._finish(kill=False)
            raise refused.error from None
        except _BackstopExpired:
            await self._finish(kill=True)
            raise Timeout(f"the command on {self.conn.name} ran past its {spec.timeout_s:g} s limit "
                          "and was stopped") from None
        except BaseException:
            # Cancelled (timeout or cancel request), the sink failed, or the connection
            # broke: stop the remote process group before letting it propagate.
            await self._finish(kill=True)
            raise
        await self._finish(kill=False)
        return result

    async def _execute(self, command: str, stdin: bytes | None, output: OutputSink,
                       deadline: float | None) -> ExecResult:
        self._opening = asyncio.ensure_future(
            self.run_blocking(_open, self.conn, self.settings.exec_window_size, command, stdin is None))
        # Shielded: if we are cancelled meanwhile, _finish still gets the channel to stop.
        self.chan, self.fd = await asyncio.shield(self._opening)
        if stdin is not None:
            self._stdin = asyncio.ensure_future(self.run_blocking(_send_stdin, self.chan, stdin))
        return await self._pump(output, deadline)

    async def _wait_ready(self, limit: float) -> None:
        """Until the channel has something for us, or ``limit`` seconds (no thread held)."""
        chan, fd = self.chan, self.fd
        assert chan is not None and fd is not None
        if _ready(chan):
            return
        woken: asyncio.Future[None] = self.loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        self.loop.add_reader(fd, wake)
        try:
            await asyncio.wait({woken}, timeout=max(0.0, limit))
        finally:
            self.loop.remove_reader(fd)

    async def _read(self, limit: float) -> tuple[bytes, bytes, bool]:
        """Wait up to ``limit`` s for data, then take what arrived (stderr filtered)."""
        chan = self.chan
        assert chan is not None and self.filter is not None
        await self._wait_ready(limit)
        if not _ready(chan):
            return b"", b"", False
        out, err, ended = await self.run_blocking(_drain, chan, READ_CHUNK)
        if err:
            err = self.filter.feed(err)
        if ended and not self.filter.done:
            err += self.filter.flush()
        return out, err, ended

    async def _pump(self, output: OutputSink, deadline: float | None) -> ExecResult:
        chan = self.chan
        assert chan is not None and self.filter is not None
        # After the process exits, only a background process it left behind can still
        # hold its output open; we wait exit_grace_s for that in total (time spent in a
        # slow sink does not count), then stop reading, as the local transport does.
        grace = self.settings.exit_grace_s
        while True:
            if deadline is not None and self.loop.time() >= deadline:
                raise _BackstopExpired()
            limit = _POLL_S if deadline is None else min(_POLL_S, deadline - self.loop.time())
            started = self.loop.time()
            out, err, ended = await self._read(limit)
            self._check_preamble()
            if out:
                await output.write("stdout", out)
            if err:
                await output.write("stderr", err)
            if ended:
                break
            if not out and not err and chan.exit_status_ready():
                grace -= self.loop.time() - started
                if grace <= 0:
                    self.logger.info("the command on %s exited but a background process still "
                                     "holds its output open; not waiting for it", self.conn.name)
                    break
        return await self._result()

    def _check_preamble(self) -> None:
        assert self.filter is not None
        status, name = self.filter.status, self.conn.name
        if status is None or status == "ok":
            return
        # The wrapper only got this far with what the request gave it; quote it back.
        if status == "nocmd":
            raise _Refused(NotFound(f"command not found on {name}"))
        if status == "nocwd":
            raise _Refused(NotFound(f"no such working directory on {name}"))
        if status == "notdir":
            raise _Refused(InvalidRequest(f"the working directory on {name} is not a directory"))
        raise _Refused(TransportError(f"permission denied: cannot enter the working directory on {name}"))

    async def _result(self) -> ExecResult:
        chan = self.chan
        assert chan is not None
        # The exit status may come after the end of output, or much later when the
        # process closed its stdout/stderr and kept running: wait as long as it runs.
        pause = 0.005
        while not chan.exit_status_ready():
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_S)
        signal_name = getattr(chan, EXIT_SIGNAL_ATTR, None)
        if signal_name is not None:
            return ExecResult(exit_code=None, signal=_signal_number(signal_name))
        if chan.exit_status >= 0:
            return ExecResult(exit_code=chan.exit_status)
        # status_event is also set when the channel closes without a status.
        if not self.conn.alive:
            raise self.conn.lost()
        raise TransportError(f"{self.conn.name} closed the channel without reporting how the "
                             "command ended")

    async def _finish(self, kill: bool) -> None:
        """Stop (if ``kill``) and close; survives a second cancellation by finishing in
        the background."""
        task = asyncio.ensure_future(self._stop_and_close(kill))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_consume)
            raise

    async def _stop_and_close(self, kill: bool) -> None:
        try:
            if self.chan is None and self._opening is not None:
                # Cancelled while the channel was being opened: it may still appear.
                done, _ = await asyncio.wait({self._opening},
                                             timeout=self.settings.connect_timeout_s)
                if done and not self._opening.cancelled() and self._opening.exception() is None:
                    self.chan, self.fd = self._opening.result()
                elif not done:
                    self._opening.add_done_callback(self._close_late)
                else:
                    _consume(self._opening)
            if self.chan is not None and kill:
                try:
                    await self._kill()
                except Exception as exc:  # best effort; must not mask why we stop
                    self.logger.warning("could not stop the command on %s: %s", self.conn.name, short(exc))
            if self.chan is not None:
                await self.run_blocking(self.chan.close)
            if self._stdin is not None:
                # Closing the channel ended a send still blocked on flow control.
                await asyncio.wait({self._stdin}, timeout=self.settings.kill_timeout_s)
                if self._stdin.done():
                    _consume(self._stdin)
                else:
                    self._stdin.add_done_callback(_consume)
        finally:
            if self._slot_held:
                self._slot_held = False
                self.slots.release()

    def _close_late(self, opening: asyncio.Future[tuple[paramiko.Channel, int]]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            chan, _ = opening.result()
            self.logger.warning("closing a channel to %s that opened after its command was "
                                "cancelled; its process was not started with a known group",
                                self.conn.name)
            asyncio.ensure_future(self.run_blocking(chan.close)).add_done_callback(_consume)

    async def _kill(self) -> None:
        chan = self.chan
        assert chan is not None and self.filter is not None
        if chan.exit_status_ready() and (chan.eof_received or chan.closed):
            return  # it ended on its own; its process group id may be reused already
        if not self.conn.alive:
            self.logger.warning("cannot stop the command on %s: the connection is gone",
                                self.conn.name)
            return
        # The report line may still be on its way if we were cancelled right away.
        limit = self.loop.time() + self.settings.kill_timeout_s
        while not self.filter.done and self.loop.time() < limit:
            _, _, ended = await self._read(min(_POLL_S, limit - self.loop.time()))
            if ended:
                break
        pgid = self.filter.pid if self.filter.status == "ok" else None
        if pgid is None or pgid <= 1:
            if self.filter.status is None:
                self.logger.warning("cannot stop the command on %s: it never reported its "
                                    "process group", self.conn.name)
            return
        async with self.slots.control():
            killer = await self.run_blocking(self._start_kill, pgid)
            try:
                limit = self.loop.time() + self.settings.term_grace_s + self.settings.kill_timeout_s
                pause = 0.005
                while not killer.exit_status_ready() and self.loop.time() < limit:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.1)
            finally:
                await self.run_blocking(killer.close)
        self.logger.debug("stopped process group %d on %s", pgid, self.conn.name)

    def _start_kill(self, pgid: int) -> paramiko.Channel:
        killer = self.conn.open_session(64 * 1024)
        try:
            killer.exec_command(kill_script(pgid, self.settings.term_grace_s))
            killer.shutdown_write()
        except BaseException:
            killer.close()
            raise
        return killer
