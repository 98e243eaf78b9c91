"""WinRS shells and the commands run in them, over pywinrm's low-level ``Protocol``.

Three layers, all async, every pywinrm call made through ``ctx.run_blocking``:

- :class:`WinrmClient`: a small pool of ``winrm.protocol.Protocol`` objects, each with its
  own ``requests`` session and so its own keep-alive HTTP connection (and, for NTLM, its
  own authenticated connection and message-encryption state). A Protocol is used by one
  thread at a time; concurrent operations (a Receive long-poll of one command, a Signal
  for another, a Send of stdin) each take their own. A call abandoned by a cancelled
  coroutine keeps its Protocol until its thread returns.
- :class:`ShellPool`: the shell lifecycle (below).
- :class:`RunningCommand`: one WinRS Command: start, stdin (Send), output (Receive,
  repeated, each chunk handed on as it arrives), and its end: Signal ``terminate`` as
  cleanup after a normal end; Signal ``terminate`` **and** Delete of its shell when it is
  abandoned (timeout, cancellation, failure), so that nothing keeps running and no
  shell is left counting against Windows' per-user shell quota.

Shell lifecycle: reused shells, one command at a time per shell
---------------------------------------------------------------

Per command, a fresh shell costs one more round trip (Create before and Delete after,
instead of one Signal after) and, on Windows, a new ``winrshost.exe`` process with the
user's profile loaded (``WINRS_NOPROFILE`` is false): tens to hundreds of milliseconds
that the test server below does not reproduce. Measured with pywinrm against the test
WS-Management server (``tests/support/wsman_server.py``, loopback, 4 runs of 50
sequential ``exit 0`` commands, median; a local process start is about 6 ms of each)::

                              shell per command   reused shell   HTTP requests
    HTTPS + Basic             12.0 ms             10.0 ms        4 vs 3
    HTTPS + NTLM              12.2 ms             10.7 ms        4 vs 3
    HTTP + NTLM (sealed)      13.3 ms             11.2 ms        4 vs 3
    (one Identify round trip: 1.7-2.8 ms)

Windows' quotas decide the rest: ``MaxShellsPerUser`` (30 in Microsoft's documentation;
25 is reported on 2012 R2-2019 and 5 on 2008 R2) counts the shells of the *user*, across every fleetbus
worker and every other tool logged in as that user; ``MaxProcessesPerShell`` (25, 15 on
2012 R2) counts all processes of a shell including children, so many concurrent
commands in one shell can hit it; ``MaxConcurrentOperationsPerUser`` (1500; 15 before
2012, where every command run in a shell counted until the shell closed).

So a session keeps a pool of shells:

- a command without ``cwd``/``env`` takes an idle pooled shell (or opens one), runs
  alone in it, and gives it back; at most ``max_idle_shells`` (default 2) stay open
  between commands, and a shell is retired after ``max_commands_per_shell`` (100)
  commands;
- a command with ``cwd`` or ``env`` gets a shell of its own, created with that working
  directory and those variables (``rsp:WorkingDirectory`` / ``rsp:Environment``: exact,
  no quoting) and deleted when the command ends;
- at most ``max_shells`` (default 8) shells are open per session; more concurrent
  commands wait for one. The default leaves room for three workers under the
  2012 R2-2019 quota of 25;
- a reused shell that Windows has dropped (idle timeout, WinRM restart: fault
  2150858843) or that reached an operations quota (2150859174) is replaced and the
  command retried once: Windows refused the Command, so it never ran;
- shells are created asking for ``IdleTimeOut`` ``shell_idle_timeout_s`` (600 s), so even
  if fleetbus dies, Windows deletes its shells once they have been idle that long (or
  its own winrs ``IdleTimeout``, if the server enforces a shorter one);
- ``reuse_shells = false`` (a transport setting) gives every command its own shell.
"""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetbus.errors import AuthFailed, FleetbusError, ServerOffline, Timeout, TransportError
from fleetbus.transport import OutputSink, TransportContext
from winrm.exceptions import InvalidCredentialsError, WinRMOperationTimeoutError, WSManFaultError
from winrm.protocol import Protocol

from .commands import CommandLine
from .errors import RETRY_WITH_NEW_SHELL, map_error

#: After a refused Send, how long a command may go on before it is stopped.
STDIN_GRACE_S = 5.0

SIGNAL_TERMINATE = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate"

IDENTIFY_ENVELOPE = (
    '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:wsmid="http://schemas.dmtf.org/wbem/wsman/identity/1/wsmanidentity.xsd">'
    "<s:Header/><s:Body><wsmid:Identify/></s:Body></s:Envelope>"
)
_WSMID = "{http://schemas.dmtf.org/wbem/wsman/identity/1/wsmanidentity.xsd}"


@dataclass(frozen=True)
class ShellSettings:
    max_shells: int = 8
    max_idle_shells: int = 2
    max_commands_per_shell: int = 100
    reuse_shells: bool = True
    codepage: int = 65001
    shell_idle_timeout_s: int = 600
    cleanup_timeout_s: float = 15.0
    stdin_chunk_bytes: int = 96 * 1024

    def __post_init__(self) -> None:
        if self.max_shells < 1 or self.max_idle_shells < 0 or self.max_commands_per_shell < 1:
            raise ValueError("max_shells and max_commands_per_shell must be at least 1")


def parse_identify(body: bytes | str) -> dict[str, str]:
    """The fields of an IdentifyResponse (ProtocolVersion, ProductVendor, ProductVersion)."""
    root = ET.fromstring(body)
    response = root.find(f".//{_WSMID}IdentifyResponse")
    if response is None:
        raise TransportError("the WinRM server's answer to Identify is not an IdentifyResponse")
    return {child.tag.removeprefix(_WSMID): (child.text or "").strip() for child in response}


class WinrmClient:
    """A pool of pywinrm Protocols for one endpoint; every call runs in ``run_blocking``."""

    def __init__(self, ctx: TransportContext, make_protocol: Callable[[], Protocol],
                 where: dict[str, Any], max_idle: int = 8) -> None:
        self._ctx = ctx
        self._make = make_protocol
        self.where = where
        self._idle: list[Protocol] = []
        self._max_idle = max_idle
        self._closed = False
        self.alive = True
        self.requests = 0

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``Protocol.<method>(*args, **kwargs)`` with errors mapped to fleetbus errors.

        ``WinRMOperationTimeoutError`` (a Receive with nothing to report yet) is passed
        through unmapped for the receive loop.
        """
        if self._closed:
            raise ServerOffline(f"{self.where.get('server')}: the WinRM session is closed")
        protocol = self._idle.pop() if self._idle else self._make()

        def blocking() -> Any:
            return getattr(protocol, method)(*args, **kwargs)

        self.requests += 1
        future = asyncio.ensure_future(self._ctx.run_blocking(blocking))
        future.add_done_callback(lambda done: self._checkin(protocol, done))
        try:
            return await asyncio.shield(future)
        except (asyncio.CancelledError, WinRMOperationTimeoutError):
            raise
        except Exception as exc:  # every pywinrm/requests failure gets mapped
            mapped = map_error(exc, self.where)
            refusal = _login_refusal(exc) if isinstance(mapped, AuthFailed) else None
            if refusal is not None:
                self._ctx.services.count_auth_failure(self._ctx.transport_name, refusal)
            if isinstance(mapped, (ServerOffline, AuthFailed, Timeout)):
                self.alive = False  # the host opens a new session next time
            raise mapped from None

    def _checkin(self, protocol: Protocol, done: asyncio.Future[Any]) -> None:
        # After a fault (an HTTP 500 with a SOAP body) the connection is as good as before;
        # after anything else (401, a broken connection, a timeout) start afresh.
        failed = done.cancelled() or (
            done.exception() is not None
            and not isinstance(done.exception(), (WinRMOperationTimeoutError, WSManFaultError)))
        if self._closed or failed or len(self._idle) >= self._max_idle:
            _close_protocol(protocol)
        else:
            self._idle.append(protocol)

    async def identify(self) -> dict[str, str]:
        """One WS-Management Identify round trip (authenticated, like every request)."""
        return parse_identify(await self.call("send_message", IDENTIFY_ENVELOPE))

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for protocol in idle:
            _close_protocol(protocol)


def _login_refusal(exc: BaseException) -> str | None:
    """The auth-failure metric's reason when WinRM refused the login, else None: a TLS
    certificate that could not be verified is the server's identity, not a login."""
    if isinstance(exc, InvalidCredentialsError):
        return "bad_credentials"  # HTTP 401
    if isinstance(exc, WSManFaultError):
        return "access_denied"  # logged in, but not allowed to use WinRM
    return None


def _close_protocol(protocol: Protocol) -> None:
    try:
        protocol.transport.close_session()
    except Exception:  # closing sockets: nothing useful to report
        pass


@dataclass(eq=False)
class Shell:
    id: str
    reusable: bool
    commands: int = 0
    created: float = field(default_factory=time.monotonic)


class ShellPool:
    """The shells of one session: reused ones for plain commands, own ones for cwd/env."""

    def __init__(self, client: WinrmClient, settings: ShellSettings, logger: logging.Logger) -> None:
        self._client = client
        self.settings = settings
        self._log = logger
        self._idle: list[Shell] = []
        self._open = 0  # shells open or being opened or being deleted
        self._cond = asyncio.Condition()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def open_count(self) -> int:
        return self._open

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, cwd: str | None = None, env: dict[str, str] | None = None,
                      fresh: bool = False) -> Shell:
        own = bool(cwd) or bool(env) or not self.settings.reuse_shells
        while True:
            victim: Shell | None = None
            async with self._cond:
                while True:
                    if self._closed:
                        raise ServerOffline(f"{self._client.where.get('server')}: the WinRM session is closed")
                    if not own and not fresh and self._idle:
                        return self._idle.pop()
                    if self._open < self.settings.max_shells:
                        self._open += 1
                        break
                    if self._idle:
                        victim = self._idle.pop(0)  # the longest idle: delete it to make room
                        break
                    await self._cond.wait()
            if victim is not None:
                await self._delete(victim)
                continue
            break
        creating = asyncio.ensure_future(self._client.call(
            "open_shell",
            working_directory=cwd or None,
            env_vars=dict(env) if env else None,
            codepage=self.settings.codepage,
            idle_timeout=f"PT{int(self.settings.shell_idle_timeout_s)}S",
        ))
        try:
            shell_id = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The Create is on its way: delete the shell it makes, so none leaks.
            creating.add_done_callback(self._created_too_late)
            raise
        except BaseException:
            await self._forget()
            raise
        return Shell(id=shell_id, reusable=not own)

    def _created_too_late(self, creating: asyncio.Future[str]) -> None:
        if creating.cancelled() or creating.exception() is not None:
            cleanup = self._forget()
        else:
            cleanup = self._delete(Shell(id=creating.result(), reusable=False))
        task = asyncio.ensure_future(cleanup)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def release(self, shell: Shell, reuse: bool = True) -> None:
        """Give ``shell`` back after a command that ended normally."""
        keep = (reuse and shell.reusable and not self._closed
                and shell.commands < self.settings.max_commands_per_shell
                and len(self._idle) < self.settings.max_idle_shells)
        if keep:
            async with self._cond:
                self._idle.append(shell)
                self._cond.notify()
            return
        await self._delete(shell)

    async def discard(self, shell: Shell) -> None:
        """Delete ``shell`` (ending whatever still runs in it)."""
        await self._delete(shell)

    async def _delete(self, shell: Shell) -> None:
        try:
            await self._client.call("close_shell", shell.id, close_session=False)
        except FleetbusError as exc:
            self._log.warning("%s: deleting WinRM shell %s failed: %s",
                              self._client.where.get("server"), shell.id, exc.message)
        finally:
            await self._forget()

    async def _forget(self) -> None:
        async with self._cond:
            self._open -= 1
            self._cond.notify()

    async def close(self) -> None:
        """Delete the idle shells; shells in use are deleted when their command ends."""
        async with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        if idle:
            await asyncio.gather(*(self._delete(shell) for shell in idle), return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.cleanup_timeout_s)


class RunningCommand:
    """One WinRS Command in a shell."""

    def __init__(self, conn: Connection, shell: Shell, command_id: str) -> None:
        self.conn = conn
        self.shell = shell
        self.id = command_id
        self.done = False
        self._ended = False
        #: Why stdin could not be sent (the process may have ended; if it did not, it
        #: waits for input that will never come, so the receive loop gives up on it).
        self.stdin_error: FleetbusError | None = None
        self.stdin_error_at = 0.0

    @classmethod
    async def start(cls, conn: Connection, line: CommandLine, *, cwd: str | None,
                    env: dict[str, str] | None, stdin: bool) -> RunningCommand:
        pool = conn.shells
        shell = await pool.acquire(cwd, env)
        for attempt in (1, 2):
            try:
                command_id = await conn.client.call(
                    "run_command", shell.id, line.command, (),
                    console_mode_stdin=not stdin, skip_cmd_shell=line.skip_cmd_shell)
            except FleetbusError as exc:
                code = exc.details.get("fault_code")
                if attempt == 1 and shell.reusable and code in RETRY_WITH_NEW_SHELL:
                    # Windows refused the Command, so nothing ran: a fresh shell, once.
                    conn.log.info("%s: WinRM shell %s refused a command (fault %s); using a new shell",
                                  conn.where.get("server"), shell.id, code)
                    await pool.discard(shell)
                    shell = await pool.acquire(cwd, env, fresh=True)
                    continue
                await cls._give_back(conn, shell, exc)
                raise
            except BaseException:
                # Cancelled while the Command was on its way: it may have started.
                await conn.shielded(pool.discard(shell))
                raise
            shell.commands += 1
            conn.active += 1
            return cls(conn, shell, command_id)
        raise AssertionError("unreachable")

    @staticmethod
    async def _give_back(conn: Connection, shell: Shell, exc: FleetbusError) -> None:
        if isinstance(exc, (ServerOffline, AuthFailed)) or not shell.reusable:
            await conn.shielded(conn.shells.discard(shell))
        else:
            await conn.shells.release(shell)

    async def send(self, data: bytes, end: bool) -> bool:
        """Send stdin; False when the server refused it (usually: the process ended)."""
        try:
            await self.conn.client.call("send_command_input", self.shell.id, self.id, data, end=end)
        except TransportError as exc:
            self.conn.log.debug("%s: stdin not accepted: %s", self.conn.where.get("server"), exc.message)
            self.stdin_error = exc
            self.stdin_error_at = time.monotonic()
            return False
        return True

    def check_stdin(self) -> None:
        """Give up on a command that still runs long after its stdin was refused."""
        if (self.stdin_error is not None and not self.done
                and time.monotonic() - self.stdin_error_at > STDIN_GRACE_S):
            raise TransportError(f"{self.conn.where.get('server')}: stdin could not be sent and the "
                                 f"command did not end: {self.stdin_error.message}")

    async def send_all(self, data: bytes) -> None:
        size = self.conn.shells.settings.stdin_chunk_bytes
        if not data:
            await self.send(b"", end=True)
            return
        for offset in range(0, len(data), size):
            last = offset + size >= len(data)
            if not await self.send(data[offset: offset + size], end=last):
                return

    async def receive(self) -> tuple[bytes, bytes, int | None]:
        """One Receive: (stdout, stderr, exit code once the command is done)."""
        try:
            out, err, code, done = await self.conn.client.call(
                "get_command_output_raw", self.shell.id, self.id)
        except WinRMOperationTimeoutError:
            return b"", b"", None
        if done:
            self.done = True
            return out, err, code
        return out, err, None

    async def finish(self) -> None:
        """After a normal end: release the command (Signal), give the shell back."""
        if self._ended:
            return
        self._ended = True
        try:
            if not self.shell.reusable:
                await self.conn.shells.discard(self.shell)
                return
            try:
                await self.conn.client.call("cleanup_command", self.shell.id, self.id)
            except FleetbusError as exc:
                self.conn.log.info("%s: releasing command %s failed (%s); deleting its shell",
                                   self.conn.where.get("server"), self.id, exc.message)
                await self.conn.shells.discard(self.shell)
                return
            await self.conn.shells.release(self.shell)
        finally:
            self.conn.command_ended()

    async def abandon(self) -> None:
        """Stop the command and delete its shell; survives the caller's cancellation."""
        if self._ended:
            return
        self._ended = True
        await self.conn.shielded(self._abandon())

    async def _abandon(self) -> None:
        try:
            if not self.done:
                try:
                    await self.conn.client.call("cleanup_command", self.shell.id, self.id)
                except FleetbusError as exc:
                    self.conn.log.warning("%s: Signal terminate for command %s failed: %s",
                                          self.conn.where.get("server"), self.id, exc.message)
            await self.conn.shells.discard(self.shell)
        finally:
            self.conn.command_ended()


class Connection:
    """Everything one session holds: the Protocol pool, the shells, background cleanups."""

    def __init__(self, ctx: TransportContext, make_protocol: Callable[[], Protocol],
                 where: dict[str, Any], settings: ShellSettings) -> None:
        self.ctx = ctx
        self.log = ctx.logger
        self.where = where
        self.client = WinrmClient(ctx, make_protocol, where, max_idle=max(4, settings.max_shells))
        self.shells = ShellPool(self.client, settings, ctx.logger)
        self._background: set[asyncio.Task[Any]] = set()
        #: Commands started and not yet finished or abandoned.
        self.active = 0
        self._closing = False

    def command_ended(self) -> None:
        self.active -= 1
        if self._closing and self.active == 0:
            self.client.close()

    async def shielded(self, coro: Any) -> None:
        """Run cleanup ``coro`` to its end (bounded) even if the caller is cancelled."""
        async def bounded() -> None:
            try:
                async with asyncio.timeout(self.shells.settings.cleanup_timeout_s):
                    await coro
            except TimeoutError:
                self.log.warning("%s: WinRM cleanup did not finish within %g s",
                                 self.where.get("server"), self.shells.settings.cleanup_timeout_s)
            except FleetbusError as exc:
                self.log.warning("%s: WinRM cleanup failed: %s", self.where.get("server"), exc.message)

        task = asyncio.ensure_future(bounded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    async def start(self, line: CommandLine, *, cwd: str | None = None,
                    env: dict[str, str] | None = None, stdin: bool = False) -> RunningCommand:
        return await RunningCommand.start(self, line, cwd=cwd, env=env, stdin=stdin)

    async def run(self, line: CommandLine, output: OutputSink, *, cwd: str | None = None,
                  env: dict[str, str] | None = None, stdin: bytes | None = None,
                  stderr_filter: Any = None) -> int:
        """Run ``line``, streaming its output to ``output``; return its exit code.

        Stdin is sent by a task of its own while output is being received, so a process
        that writes before it has read all its input cannot deadlock us.
        """
        cmd = await self.start(line, cwd=cwd, env=env, stdin=stdin is not None)
        sender: asyncio.Task[None] | None = None
        try:
            if stdin is not None:
                sender = asyncio.ensure_future(cmd.send_all(stdin))
            while True:
                out, err, code = await cmd.receive()
                if code is None:
                    cmd.check_stdin()
                if out:
                    await output.write("stdout", out)
                if err and stderr_filter is not None:
                    err = stderr_filter.feed(err)
                if err:
                    await output.write("stderr", err)
                if code is not None:
                    break
            if stderr_filter is not None:
                rest = stderr_filter.flush()
                if rest:
                    await output.write("stderr", rest)
            if sender is not None:
                await sender
        except BaseException:
            if sender is not None:
                if sender.done():
                    if not sender.cancelled():
                        sender.exception()  # seen: the command's own error is what we report
                else:
                    sender.cancel()
            await cmd.abandon()
            raise
        await cmd.finish()
        return code

    async def close(self) -> None:
        """Delete the idle shells now; commands still running (the host closes a stale
        session in the background) clean up after themselves, then the client closes."""
        self._closing = True
        try:
            await self.shells.close()
            if self._background:
                await asyncio.wait(set(self._background), timeout=self.shells.settings.cleanup_timeout_s)
        finally:
            if self.active == 0:
                self.client.close()

