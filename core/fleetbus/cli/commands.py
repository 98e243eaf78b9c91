"""``fleetbus run|put|get|info|ping``: commands on one server, by name (``run`` also
starts a job on a selection of servers: :mod:`fleetbus.cli.jobs`)."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from .. import tuning
from ..client import Client, ExecOutcome
from ..errors import Cancelled, FleetbusError, Timeout
from ..limits import MAX_INLINE_BYTES
from .context import (
    EXIT_INTERRUPTED,
    Globals,
    client_call,
    fail,
    parse_pairs,
    pass_globals,
    run_async,
    with_client,
)
from .jobfiles import get_job, put_job
from .jobopts import JobOptions, selection_options
from .jobs import follow_job
from .render import Progress, emit_json, human_bytes, key_values

EXIT_FLEETBUS_ERROR = 125  # as `docker run`: the command could not be run at all
EXIT_TIMEOUT = 124  # as timeout(1)


def _write(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("server")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@selection_options("Seconds before the process group is killed (in a job: on each server).")
@click.option("--output", "show_output", is_flag=True, help="Job: print what each server prints, each line prefixed with its name.")
@click.option("--group", "group_output", is_flag=True, help="Job: fold identical outputs into one block listing the servers that printed it.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
@click.option("--cwd", help="Working directory on the server.")
@click.option("--shell", "use_shell", is_flag=True, help="Run COMMAND as one shell command line.")
@click.option("--powershell", "use_powershell", is_flag=True,
              help="Run COMMAND as a PowerShell script (Windows transports; sent -EncodedCommand).")
@click.option("--stdin", "-i", "forward_stdin", is_flag=True, help=f"Send standard input (up to {MAX_INLINE_BYTES // 1024} KiB).")
@click.option("--id", "command_id", help="Command id; a retry with the same id is not run twice.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON instead of streaming output.")
@pass_globals
def run(g: Globals, server: str, command: tuple[str, ...], show_output: bool, group_output: bool,
        env: tuple[str, ...], cwd: str | None, use_shell: bool, use_powershell: bool, forward_stdin: bool,
        command_id: str | None, as_json: bool, **selection: Any) -> None:
    """Run COMMAND on SERVER, streaming its output; exit with its exit code.

    Put `--` before COMMAND when it has options of its own:
    fleetbus run web1 -- ls -la /srv

    With --role, --environment, --label, --servers or --all instead of SERVER, run
    COMMAND as a job on every server selected, printing one line per server as it
    finishes: fleetbus run --role web --max-concurrency 25% -- systemctl reload nginx
    """
    options = JobOptions(**selection)
    timeout_s = options.timeout_s
    if options.selecting:
        command = (server, *command)  # no SERVER: the first word is the command's
    elif given := [*options.job_only(), *(["--output"] if show_output else []),
                   *(["--group"] if group_output else [])]:
        fail(f"{', '.join(given)} need a selection (--role, --environment, --label, --servers or --all)",
             EXIT_FLEETBUS_ERROR)
    if not command:
        fail("give the command to run after the server (fleetbus run web1 -- uname -a)", EXIT_FLEETBUS_ERROR)
    argv = list(command)
    if use_shell and use_powershell:
        fail("give --shell or --powershell, not both", EXIT_FLEETBUS_ERROR)
    if use_powershell:
        # A Windows transport runs ["powershell", SCRIPT] with -EncodedCommand (docs/wmi.md).
        argv = ["powershell", " ".join(argv)]
    stdin = None
    if forward_stdin:
        stdin = sys.stdin.buffer.read(MAX_INLINE_BYTES + 1)
        if len(stdin) > MAX_INLINE_BYTES:
            fail(f"standard input is larger than {MAX_INLINE_BYTES // 1024} KiB; use `fleetbus put` for files",
                 EXIT_FLEETBUS_ERROR)
    env_map = parse_pairs(env, "--env")
    if options.selecting:
        if command_id is not None:
            fail("--id names one command; a job gives each server's command its own id", EXIT_FLEETBUS_ERROR)
        exec_body: dict[str, Any] = {"shell": " ".join(argv)} if use_shell else {"argv": argv}
        if env_map:
            exec_body["env"] = env_map
        if cwd:
            exec_body["cwd"] = cwd
        if stdin is not None:
            exec_body["stdin_b64"] = base64.b64encode(stdin).decode()
        request = options.request("exec", exec_body)
        if show_output and group_output:
            fail("give --output or --group, not both", EXIT_FLEETBUS_ERROR)
        if as_json and (show_output or group_output):
            fail("--json carries each server's output tail; --output and --group are for reading",
                 EXIT_FLEETBUS_ERROR)
        mode = "lines" if show_output else "group" if group_output else None

        async def start(c: Client, inbox: str | None) -> dict[str, Any]:
            if inbox is not None:
                exec_body["output_subject"] = inbox
            return await c.start_job(request)

        sys.exit(follow_job(g, start, as_json, EXIT_FLEETBUS_ERROR, mode))
    command_id = command_id or uuid.uuid4().hex

    async def go(c: Client) -> ExecOutcome:
        task = asyncio.create_task(c.exec(
            server, None if use_shell else argv, shell=" ".join(argv) if use_shell else None,
            env=env_map, cwd=cwd, stdin=stdin, timeout_s=timeout_s,
            on_output=None if as_json else _write, command_id=command_id))
        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        loop.add_signal_handler(signal.SIGTERM, interrupted.set)
        waiter = asyncio.create_task(interrupted.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                # Stop the remote process too, not just our wait for it.
                await c.cancel(server, command_id)
                try:
                    await asyncio.wait_for(task, timeout=10)
                except (FleetbusError, TimeoutError):
                    pass
                click.echo("fleetbus: interrupted; the command was cancelled", err=True)
                sys.exit(EXIT_INTERRUPTED)
            return task.result()
        finally:
            waiter.cancel()
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

    outcome = run_async(lambda: with_client(g, go), EXIT_FLEETBUS_ERROR,
                        {Timeout: EXIT_TIMEOUT, Cancelled: EXIT_INTERRUPTED})
    if as_json:
        emit_json(outcome.raw)
    if outcome.signal is not None:
        if not as_json:
            click.echo(f"fleetbus: the command was killed by signal {outcome.signal}", err=True)
        sys.exit(128 + outcome.signal)
    sys.exit(outcome.exit_code if outcome.exit_code is not None else EXIT_FLEETBUS_ERROR)


def _mode(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal mode like 0644", param_hint="--mode") from None
    if not 0 <= mode <= 0o7777:
        raise click.BadParameter("mode must be between 0 and 07777", param_hint="--mode")
    return mode


@click.command("put")
@click.argument("args", nargs=-1, metavar="[SERVER] LOCAL REMOTE")
@click.option("--mode", help="Octal file mode on the server, e.g. 0640.")
@click.option("--no-parents", is_flag=True, help="Fail if the remote folder does not exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON (a job: one object per server).")
@selection_options("Job: seconds for each server's transfer.")
@pass_globals
def put(g: Globals, args: tuple[str, ...], mode: str | None, no_parents: bool, as_json: bool,
        **selection: Any) -> None:
    """Copy the file LOCAL (- for stdin) to REMOTE on SERVER, atomically.

    With --role, --environment, --label, --servers or --all instead of SERVER, copy it to
    every server selected as one job: LOCAL is uploaded once, each server checks its
    sha256; one line per server as it finishes, exit codes as `fleetbus run`:
    fleetbus put --role web ./build.tar.gz /opt/app/build.tar.gz --mode 0644
    """
    options = JobOptions(**selection)
    if options.selecting:
        if len(args) != 2:
            raise click.UsageError("give LOCAL and REMOTE after the selection (fleetbus put --role web ./f /srv/f)")
        local, remote = args
        if local == "-" or not Path(local).is_file():
            raise click.BadParameter(f"{local} is not a file: a job uploads a local file once for every server",
                                     param_hint="LOCAL")
        _mode(mode)  # checked here; sent as given
        sys.exit(put_job(g, options, Path(local), remote, mode, not no_parents, as_json))
    if given := options.job_only():
        fail(f"{', '.join(given)} need a selection (--role, --environment, --label, --servers or --all)",
             EXIT_FLEETBUS_ERROR)
    if len(args) != 3:
        raise click.UsageError("give SERVER LOCAL REMOTE, or a selection and LOCAL REMOTE")
    server, local, remote = args
    if local != "-" and not Path(local).is_file():
        raise click.BadParameter(f"{local} is not a file", param_hint="LOCAL")
    tuning.apply(tuning.TRANSFER)  # 1 MiB buffers per chunk
    source: bytes | Path = sys.stdin.buffer.read() if local == "-" else Path(local)
    progress = Progress(f"put {server}:{remote}", sys.stderr.isatty() and not as_json)
    try:
        reply = client_call(g, lambda c: c.put(server, source, remote, mode=_mode(mode),
                                               make_parents=not no_parents, progress=progress))
    finally:
        progress.close()
    if as_json:
        emit_json(reply)
    else:
        click.echo(f"{server}:{remote}  {human_bytes(reply['size'])}  sha256 {reply['sha256']}")


@click.command("get")
@click.argument("args", nargs=-1, metavar="[SERVER] REMOTE [LOCAL]")
@click.option("--json", "as_json", is_flag=True, help="Print the reply (without content) as JSON.")
@selection_options("Job: seconds for each server's transfer.")
@pass_globals
def get(g: Globals, args: tuple[str, ...], as_json: bool, **selection: Any) -> None:
    """Copy REMOTE on SERVER to LOCAL (default: its base name here; - for stdout).

    With --role, --environment, --label, --servers or --all instead of SERVER, fetch it
    from every server selected as one job into LOCAL/<server>/<name> (LOCAL: a folder,
    default the current one): fleetbus get --role db /etc/postgresql/postgresql.conf ./configs/
    """
    options = JobOptions(**selection)
    if options.selecting:
        if len(args) not in (1, 2):
            raise click.UsageError("give REMOTE and a local folder after the selection "
                                   "(fleetbus get --role db /etc/x ./x/)")
        dest = Path(args[1] if len(args) == 2 else ".")
        if dest.exists() and not dest.is_dir():
            fail(f"{dest} is not a folder: a job writes {dest}/<server>/<name>", EXIT_FLEETBUS_ERROR)
        sys.exit(get_job(g, options, args[0], dest, as_json))
    if given := options.job_only():
        fail(f"{', '.join(given)} need a selection (--role, --environment, --label, --servers or --all)",
             EXIT_FLEETBUS_ERROR)
    if len(args) not in (2, 3):
        raise click.UsageError("give SERVER REMOTE [LOCAL], or a selection and REMOTE [FOLDER]")
    server, remote = args[:2]
    local = args[2] if len(args) == 3 else None
    tuning.apply(tuning.TRANSFER)
    to_stdout = local == "-"
    dest = None if to_stdout else Path(local or Path(remote).name or "download")
    progress = Progress(f"get {server}:{remote}", sys.stderr.isatty() and not as_json and not to_stdout)
    tmp = dest.with_name(f".{dest.name}.fleetbus-partial") if dest else None
    try:
        reply, data = client_call(g, lambda c: c.get(server, remote, tmp, progress=progress))
        if tmp is not None and dest is not None:
            tmp.replace(dest)  # a failed download never leaves a half file under the real name
    finally:
        progress.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
    if to_stdout and data is not None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if as_json:
        emit_json(reply)
    else:
        click.echo(f"{dest}  {human_bytes(reply['size'])}  sha256 {reply['sha256']}")


@click.command("info")
@click.argument("server")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def info(g: Globals, server: str, as_json: bool) -> None:
    """Facts about SERVER: host name, OS, architecture, uptime, transport."""
    reply = client_call(g, lambda c: c.info(server))
    if as_json:
        emit_json(reply)
        return
    rows: list[tuple[str, Any]] = [(k, reply.get(k)) for k in (
        "server", "hostname", "os", "os_version", "kernel", "arch", "transport", "transport_version")]
    if reply.get("uptime_s") is not None:
        rows.append(("uptime", _duration(float(reply["uptime_s"]))))
    rows += [(k, v) for k, v in (reply.get("extra") or {}).items()]
    key_values(rows)


def _duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h {rest // 60}m"


@click.command("ping")
@click.argument("server")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def ping(g: Globals, server: str, as_json: bool) -> None:
    """Round trip to SERVER itself, through its transport."""
    import time

    async def go(c: Client) -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        reply = await c.ping(server)
        return reply, time.monotonic() - started

    reply, total = client_call(g, go)
    reply["round_trip_s"] = round(total, 6)
    if as_json:
        emit_json(reply)
    else:
        click.echo(f"{server} answered over {reply['transport']} in {total * 1000:.1f} ms "
                   f"(transport {reply['latency_s'] * 1000:.1f} ms)")
