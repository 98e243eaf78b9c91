"""``fleetbus jobs list|show|cancel``, and following a job that ``fleetbus run`` started.

The CLI holds no job logic: the core resolves the selection and runs the job
(:mod:`fleetbus.jobs`); this module sends the request and renders the records as they
are kept. Exit codes of a followed job: 0 every target succeeded; 1 some failed but the
error budget held; 2 the budget was spent (or a canary failed), the deadline passed or
the job was cancelled; 125 the job could not be started (docs/cli.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import click
from nats.aio.msg import Msg

from ..client import Client
from ..errors import FleetbusError
from .context import EXIT_INTERRUPTED, Globals, client_call, pass_globals, run_async, with_client
from .joboutput import JobOutput, Mode
from .progress import ProgressLine, wanted
from .render import emit_json, human_bytes, shown, table, who

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_STOPPED = 2
EXIT_CANNOT_START = 125  # as `fleetbus run`: nothing was run
# After Ctrl-C, how long to wait for the job to record how it ended.
CANCEL_WAIT_S = 30.0
# After the summary, how long a command's end of output may still trail its result.
# Waited for only when a server's result says its command ran on a worker and its end
# marker has not come (normally it comes first: the worker sends it before replying);
# past this the result's kept tails stand in for what was not seen.
OUTPUT_END_WAIT_S = 2.0
# How often the progress line's elapsed time moves without an event.
TICK_S = 0.25


def exit_code(summary: dict[str, Any]) -> int:
    """The documented rule, from a job's ``finished`` record."""
    state = summary.get("state")
    if state == "succeeded":
        return EXIT_OK
    if state == "failed":
        return EXIT_SOME_FAILED
    return EXIT_STOPPED


def print_targets(reply: dict[str, Any], as_json: bool) -> int:
    """A dry run's answer: the servers selected, one a line (or one JSON object)."""
    if as_json:
        click.echo(json.dumps({"targets": reply["targets"]}))
    else:
        for name in reply["targets"]:
            click.echo(shown(name))
    return EXIT_OK


def result_line(result: dict[str, Any], width: int) -> str:
    """``web-3  ok  0.21s``, ``db1  ok  1.2 KiB  0.05s`` (a file moved) or
    ``web-7  exit 1  first line of stderr``."""
    outcome = result["outcome"]
    status = outcome
    detail = ""
    if outcome == "ok":
        detail = f"{result.get('duration_s') or 0:.2f}s"
        size = (result.get("data") or {}).get("size")
        if isinstance(size, int):
            detail = f"{human_bytes(size)}  {detail}"
    elif outcome == "failed":
        status = (f"signal {result['signal']}" if result.get("signal") is not None
                  else f"exit {result.get('exit_code')}")
        detail = _first_line(result.get("stderr")) or _first_line(result.get("stdout"))
    elif outcome != "skipped":
        detail = _first_line((result.get("error") or {}).get("message"))
    return f"{shown(result['server']).ljust(width)}  {status}  {shown(detail)}".rstrip()


def summary_line(job: str, summary: dict[str, Any]) -> str:
    c = summary["counts"]
    why = {"budget": "the error budget was spent", "canary": "a canary failed",
           "deadline": "the deadline passed", "cancelled": "cancelled"}.get(summary.get("stop_reason") or "")
    unknown = f", {c['unknown']} unknown" if c.get("unknown") else ""
    text = (f"job {job}: {c['ok']} ok, {c['failed']} failed, {c['cancelled']} cancelled, "
            f"{c['skipped']} skipped{unknown} of {c['total']} in {summary['duration_s']:.2f}s; {summary['state']}")
    return text + (f" ({why})" if why and summary["state"] != "cancelled" else "")


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


Starter = Callable[[Client, str | None], Awaitable[dict[str, Any]]]
#: Called with each server's result; returns the result to print (``fleetbus get``
#: downloads the server's file there, and says so if that failed). Results do not wait
#: for each other's hooks: each is printed when its own hook is done.
OnResult = Callable[[Client, dict[str, Any]], Awaitable[dict[str, Any]]]


def follow_job(g: Globals, starter: Starter, as_json: bool, error_exit: int,
               output: Mode | None = None) -> int:
    """Start a job (``starter(client, output_subject)`` sends ``jobs.start`` or
    ``jobs.rerun``), print each server's result as it is kept, then the summary.

    Ctrl-C (or SIGTERM) cancels the job and still prints how it ended. Returns the exit
    code; a job that cannot start (a bad request, a selection matching nothing) exits
    with ``error_exit`` after one line on stderr. ``output``: also print what the
    commands print, line by line (``lines``) or folded at the end (``group``).
    """
    async def go(c: Client) -> int:
        live: JobOutput | None = None
        inbox: str | None = None
        if output is not None:
            live = JobOutput(output)
            inbox = c.nc.new_inbox()
            await c.nc.subscribe(inbox, cb=live.on_msg)  # before the job can print anything
        return await start_and_follow(c, starter(c, inbox), as_json, live=live)

    return run_async(lambda: with_client(g, go), error_exit)


async def start_and_follow(c: Client, start: Awaitable[dict[str, Any]], as_json: bool,
                           live: JobOutput | None = None, on_result: OnResult | None = None) -> int:
    """Send ``start`` (``jobs.start`` or ``jobs.rerun``) and :func:`follow` the job.

    Ctrl-C is taken from the moment the request goes out: one pressed while it is in
    flight cannot stop the core from starting the job, so it cancels the job as soon as
    its id is known instead of leaving it running unseen behind a CLI that exited."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        reply = await start
        return await follow(c, reply, as_json, live=live, on_result=on_result, interrupted=interrupted)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def follow(c: Client, reply: dict[str, Any], as_json: bool, live: JobOutput | None = None,
                 on_result: OnResult | None = None, interrupted: asyncio.Event | None = None) -> int:
    """Print a job just started (the reply of ``jobs.start`` or ``jobs.rerun``) to its
    end and return the exit code; a dry run's reply: its targets. The one way ``run``,
    ``put``, ``get`` and ``jobs rerun`` follow what they started. ``interrupted``: set
    by a Ctrl-C taken before the reply came (:func:`start_and_follow`)."""
    if reply.get("dry_run"):
        return print_targets(reply, as_json)
    job = reply["id"]
    if not as_json:
        click.echo(f"fleetbus: job {job} on {len(reply['targets'])} servers "
                   f"(fleetbus jobs show {job})", err=True)
    if live is not None:
        live.bind(job, reply["targets"])
    return await _render(c, job, reply["targets"], as_json, cancel_on_interrupt=True, live=live,
                         on_result=on_result, interrupted=interrupted)


class JobPrinter:
    """What a followed job looks like: one line per server as it ends (or a JSON object),
    then the summary; on a terminal also the live progress line below them
    (:class:`~fleetbus.cli.progress.ProgressLine`), kept at the bottom as lines go above.

    Fed the job's records and ``progress`` events; it holds no job logic (the counts
    are the core's).
    """

    def __init__(self, job: str, targets: list[str], as_json: bool, grouping: bool = False,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.job = job
        self.as_json = as_json
        self.grouping = grouping  # --group: ok results fold into the blocks at the end
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.width = max((len(t) for t in targets), default=0)
        self.line = ProgressLine(self.out) if wanted(self.out, as_json) else None
        self.ran: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}  # as kept, by server

    def echo(self, text: str) -> None:
        """A line on stdout, above the progress line if there is one."""
        if self.line is not None:
            self.line.echo(text)
        else:
            click.echo(text, file=self.out)

    def note(self, text: str) -> None:
        """A line on stderr: the progress line is erased first (on a terminal both end up
        on one screen) and comes back with the next event."""
        if self.line is not None:
            self.line.hide()
        click.echo(text, file=self.err)

    def output(self, stream: str, text: str) -> None:
        """A line a command printed (``--output``)."""
        if stream == "stdout":
            self.echo(text)
        else:
            self.note(text)

    def progress(self, body: dict[str, Any]) -> None:
        if self.line is not None and body.get("job") == self.job and body.get("counts"):
            self.line.update(body["counts"], float(body.get("elapsed_s") or 0))

    def tick(self) -> None:
        if self.line is not None:
            self.line.tick()

    def fetching(self, files: int) -> None:
        """How many files are still to download (shown on the progress line)."""
        if self.line is not None:
            self.line.fetching = files
            self.line.tick()

    def kept(self, body: dict[str, Any]) -> None:
        """A server's result as the job kept it (before any download of its file)."""
        self.results[body["server"]] = body
        if body["outcome"] != "skipped":
            self.ran.append(body["server"])

    def result(self, body: dict[str, Any]) -> None:
        """Print a server's result (after :meth:`kept`)."""
        if not (self.grouping and body["outcome"] == "ok"):
            self.echo(json.dumps(body) if self.as_json else result_line(body, self.width))

    def end(self) -> None:
        """The job has ended: no progress line any more (the summary says it all)."""
        if self.line is not None:
            self.line.close()
            self.line = None

    def finished(self, body: dict[str, Any]) -> int:
        self.end()
        click.echo(json.dumps(body) if self.as_json else summary_line(self.job, body), file=self.out)
        return exit_code(body)


async def _render(c: Client, job: str, targets: list[str], as_json: bool, cancel_on_interrupt: bool,
                  live: JobOutput | None = None, on_result: OnResult | None = None,
                  interrupted: asyncio.Event | None = None) -> int:
    """Print a job's results as they are kept and its summary; return the exit code.

    Ctrl-C (or SIGTERM) cancels the job when ``cancel_on_interrupt`` (the results of
    how it ended still follow), else leaves it running and exits 130. With ``live`` in
    ``group`` mode only results other than ``ok`` are printed as they come, and the
    folded outputs before the summary. On a terminal, the live progress line.
    """
    printer = JobPrinter(job, targets, as_json, grouping=live is not None and live.mode == "group")
    if live is not None:
        live.above = printer.output
    loop = asyncio.get_running_loop()
    interrupted = interrupted or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    if cancel_on_interrupt:
        on_interrupt = asyncio.create_task(_cancel_on(interrupted, c, job, as_json, printer))
    else:
        on_interrupt = asyncio.create_task(interrupted.wait())
    following = asyncio.current_task()
    assert following is not None
    on_interrupt.add_done_callback(lambda t: t.cancelled() or following.cancel())
    progress = ticker = None
    # A user follows by polling jobs.get (its follow_job yields the counts as progress):
    # job events are fleetbus's own subjects, which NATS does not let users subscribe to.
    polled = await c.follows_by_polling(job)
    if printer.line is not None:
        async def on_progress(msg: Msg) -> None:
            with contextlib.suppress(ValueError):
                printer.progress(json.loads(msg.data))

        if not polled:
            progress = await c.nc.subscribe(c.names.job_event(job, "progress"), cb=on_progress)
        ticker = asyncio.create_task(_tick(printer))
    # Results whose hook (a download) is still running: printed as each one ends, so
    # one slow file holds up nothing else.
    hooks: set[asyncio.Task[dict[str, Any]]] = set()

    def hooked(body: dict[str, Any], task: asyncio.Task[dict[str, Any]]) -> None:
        hooks.discard(task)
        printer.fetching(len(hooks))
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a hook reports its own failures; this one did not
            body = {**body, "outcome": "error",
                    "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        printer.result(body if exc is not None else task.result())

    try:
        async with contextlib.aclosing(c.follow_job(job)) as records:
            async for kind, body in records:
                if kind == "progress":
                    printer.progress(body)
                elif kind == "result":
                    printer.kept(body)
                    if on_result is None:
                        printer.result(body)
                        continue
                    task = asyncio.create_task(on_result(c, body))
                    hooks.add(task)
                    task.add_done_callback(lambda t, b=body: hooked(b, t))
                    printer.fetching(len(hooks))
                elif kind == "finished":
                    if hooks:
                        await asyncio.wait(hooks)  # every line before the summary
                    printer.end()
                    if live is not None:
                        # Output still on its way (rare: the worker sends its end before its reply).
                        await live.settle(printer.results, OUTPUT_END_WAIT_S)
                        if printer.grouping:
                            live.print_groups(sorted(printer.ran))
                    return printer.finished(body)
    except asyncio.CancelledError:
        printer.end()
        if not cancel_on_interrupt:
            click.echo(f"fleetbus: detached; job {job} goes on (fleetbus jobs watch {job})", err=True)
            return EXIT_INTERRUPTED
        click.echo(f"fleetbus: error: job {job} did not record its end within "
                   f"{CANCEL_WAIT_S:g} s of cancelling", err=True)
        return EXIT_STOPPED
    finally:
        for task in hooks:
            task.cancel()  # a download stopped midway leaves no partial file (jobfiles.download)
        if hooks:
            await asyncio.wait(hooks)
        printer.end()
        on_interrupt.cancel()
        if ticker is not None:
            ticker.cancel()
        if progress is not None:
            with contextlib.suppress(Exception):
                await progress.unsubscribe()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return EXIT_STOPPED  # the records ended without a summary


async def _tick(printer: JobPrinter) -> None:
    """Move the progress line's elapsed time between events."""
    while True:
        await asyncio.sleep(TICK_S)
        printer.tick()


async def _cancel_on(interrupted: asyncio.Event, c: Client, job: str, as_json: bool,
                     printer: JobPrinter) -> None:
    """On Ctrl-C, cancel the job; return (which stops the follower) if its end is not
    recorded within :data:`CANCEL_WAIT_S`."""
    await interrupted.wait()
    if not as_json:
        printer.note(f"fleetbus: interrupted; cancelling job {job}")
    try:
        await c.cancel_job(job)
    except FleetbusError as exc:
        printer.note(f"fleetbus: error: could not cancel job {job}: {shown(exc.message)}")
        return
    await asyncio.sleep(CANCEL_WAIT_S)


@click.group("jobs")
def jobs() -> None:
    """Jobs: one command on many servers (start one with `fleetbus run --role ...`)."""


@jobs.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Newest jobs to show.")
@click.option("--before", metavar="ID", help="Only jobs started before this one (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def list_jobs(g: Globals, limit: int, before: str | None, as_json: bool) -> None:
    """Recent jobs, newest first."""
    listed = client_call(g, lambda c: c.list_jobs(limit, before))
    if as_json:
        emit_json(listed)
        return
    rows = []
    for j in listed:
        c = j.get("counts") or {}
        rows.append((j["id"], j["created"][:19].replace("T", " "), who(j.get("identity"), j["requester"]), j["what"],
                     j["targets"], c.get("ok", ""), c.get("failed", ""), c.get("skipped", ""),
                     j["state"] + (f" ({j['stop_reason']})" if j.get("stop_reason") not in (None, "cancelled") else "")))
    table(("id", "created", "by", "what", "targets", "ok", "failed", "skipped", "state"), rows)


@jobs.command("show")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def show_job(g: Globals, job: str, as_json: bool) -> None:
    """A job's definition and every server's result."""
    got = client_call(g, lambda c: c.get_job(job))
    if as_json:
        emit_json(got)
        return
    definition = got["job"]
    request = definition["request"]
    command = request.get("exec") or {}
    what = command.get("shell") or " ".join(command.get("argv") or []) or request.get("op")
    click.echo(f"job {shown(definition['id'])}  {shown(got['state'])}  by {shown(who(definition.get('identity'), definition['requester']))}  "
               f"at {definition['created'][:19].replace('T', ' ')}")
    click.echo(f"  {shown(request.get('op'))}: {shown(what)}")
    if got.get("summary"):
        click.echo("  " + summary_line(definition["id"], got["summary"]))
    unknown = [r["server"] for r in got["results"] if r["outcome"] == "unknown"]
    if unknown:
        # Never re-run by itself (at most once per server): only when asked, as here.
        click.echo(f"  {len(unknown)} server{'s' if len(unknown) > 1 else ''} may have run the command "
                   "when the job's core died (unknown); nothing reruns by itself. "
                   f"fleetbus jobs rerun {shown(definition['id'])} --failed finishes the job: an "
                   "unknown server's command keeps its id, so none runs twice")
    by_server = {r["server"]: r for r in got["results"]}
    rows = []
    for name in definition["targets"]:
        r = by_server.get(name)
        if r is None:
            rows.append((name, "running" if got["state"] == "running" else "unknown", "", "", ""))
            continue
        detail = (_first_line((r.get("error") or {}).get("message")) or _first_line(r.get("stderr"))
                  or _first_line(r.get("stdout")))
        duration = "" if r.get("duration_s") is None else f"{r['duration_s']:.2f}s"
        rows.append((name, r["outcome"], "" if r.get("exit_code") is None else r["exit_code"], duration, detail))
    table(("server", "outcome", "exit", "duration", "detail"), rows)


@jobs.command("watch")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per server, then the summary.")
@pass_globals
def watch_job(g: Globals, job: str, as_json: bool) -> None:
    """Follow a job from another terminal: every server's result so far and as it comes,
    then the summary; exit as `fleetbus run` would. Ctrl-C leaves the job running."""
    async def go(c: Client) -> int:
        got = await c.get_job(job)
        return await _render(c, job, got["job"]["targets"], as_json, cancel_on_interrupt=False)

    sys.exit(run_async(lambda: with_client(g, go), EXIT_CANNOT_START))


@jobs.command("rerun")
@click.argument("job")
@click.option("--failed", is_flag=True, help="Only the servers whose result was not ok (failed, offline, cancelled, skipped, unknown...).")
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path),
              help="A get job: fetch the files into this folder (default: the folder the job used).")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A put job whose uploaded file is gone: this file again (its sha256 must match).")
@click.option("--dry-run", is_flag=True, help="List the servers it would run on, run nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per server, then the summary.")
@pass_globals
def rerun_job(g: Globals, job: str, failed: bool, to: Path | None, file: Path | None, dry_run: bool,
              as_json: bool) -> None:
    """Run an ended job's operation again as a new job, on all its servers or (--failed)
    on those that did not succeed; printed and exited as `fleetbus run` does. A get job
    fetches the files again; a put job puts its file again."""
    from .jobfiles import rerun_job as rerun  # it builds on this module

    sys.exit(rerun(g, job, failed, dry_run, as_json, to, file))


@jobs.command("cancel")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def cancel_job(g: Globals, job: str, as_json: bool) -> None:
    """Stop a running job: nothing new starts; running commands are cancelled."""
    reply = client_call(g, lambda c: c.cancel_job(job))
    if as_json:
        emit_json(reply)
    elif reply["cancelled"]:
        click.echo(f"job {job}: cancelling (fleetbus jobs show {job})")
    else:
        click.echo(f"job {job} is not running here ({reply['state']})")
