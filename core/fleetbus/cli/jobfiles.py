"""``fleetbus put|get`` on a selection of servers: one job that moves a file to or from
every server selected (the core runs it: :mod:`fleetbus.jobs`; the requester's side of
the object store: :mod:`fleetbus.jobfiles`).

``put`` uploads the local file once, starts a ``put`` job of that object and deletes the
object when the job has ended. ``get`` starts a ``get`` job and, as each server's result
is kept, fetches its file into ``DEST/<server>/<name>``, checks its sha256 and deletes
the object. Lines, the summary and exit codes are those of ``fleetbus run`` on a
selection (:mod:`fleetbus.cli.jobs`); a ``get`` whose download failed counts as failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import click

from ..client import Client
from ..errors import FleetbusError
from ..jetstream import FILE_TTL_S
from ..jobfiles import download, upload
from .context import Globals, fail, parse_duration, parse_pairs, run_async, with_client
from .jobs import EXIT_CANNOT_START, EXIT_OK, EXIT_SOME_FAILED, OnResult, _render
from .render import shown

F = TypeVar("F", bound=Callable[..., Any])


def selection_options(fn: F) -> F:
    """The selection and job options of ``fleetbus run``, for ``put`` and ``get``."""
    options = [
        click.option("--role", help="Job: servers with this role."),
        click.option("--environment", "environment", help="Job: servers in this environment."),
        click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                     help="Job: servers with this label (repeatable; all must match)."),
        click.option("--servers", "server_patterns", metavar="NAMES",
                     help="Job: names and globs, comma-separated ('web-*,db1')."),
        click.option("--all", "all_servers", is_flag=True, help="Job: every registered server."),
        click.option("--max-concurrency", metavar="N|P%", help="Job: servers at once (default 10)."),
        click.option("--max-errors", metavar="N|P%", help="Job: errors tolerated; one more starts nothing new."),
        click.option("--batch", metavar="N|P%", help="Job: in strict waves of this many."),
        click.option("--canary", type=click.IntRange(min=1), help="Job: this many first; the rest only if all succeed."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), default=600.0, show_default=True,
                     help="Job: seconds for each server's transfer."),
        click.option("--deadline", metavar="DURATION", help="Job: overall limit (90, 90s, 5m, 2h)."),
        click.option("--wait-online", metavar="DURATION", help="Job: an offline server waits this long to connect."),
        click.option("--dry-run", is_flag=True, help="Job: list the servers selected, move nothing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@dataclass
class JobOptions:
    """What ``selection_options`` collected, as the job request's fields."""

    role: str | None = None
    environment: str | None = None
    labels: tuple[str, ...] = ()
    server_patterns: str | None = None
    all_servers: bool = False
    max_concurrency: str | None = None
    max_errors: str | None = None
    batch: str | None = None
    canary: int | None = None
    timeout_s: float = 600.0
    deadline: str | None = None
    wait_online: str | None = None
    dry_run: bool = False

    @property
    def selecting(self) -> bool:
        return bool(self.role or self.environment or self.labels or self.server_patterns or self.all_servers)

    def job_only(self) -> list[str]:
        """The job options given, which need a selection."""
        given = {"--max-concurrency": self.max_concurrency, "--max-errors": self.max_errors,
                 "--batch": self.batch, "--canary": self.canary, "--deadline": self.deadline,
                 "--wait-online": self.wait_online, "--dry-run": self.dry_run or None}
        return [k for k, v in given.items() if v is not None]

    def request(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        selection: dict[str, Any] = {"labels": parse_pairs(self.labels, "--label"), "all": self.all_servers}
        if self.server_patterns:
            selection["servers"] = [p.strip() for p in self.server_patterns.split(",") if p.strip()]
        if self.role:
            selection["role"] = self.role
        if self.environment:
            selection["environment"] = self.environment
        deadline = parse_duration(self.deadline)
        if op == "put":
            # The object expires with the file bucket's TTL: past it a server's put would
            # find nothing, so the job ends before that, as a deadline says clearly.
            if deadline is not None and deadline > FILE_TTL_S:
                raise click.BadParameter(f"a put job ends within {FILE_TTL_S / 3600:g} h, when its "
                                         "uploaded file expires", param_hint="--deadline")
            deadline = deadline or FILE_TTL_S
        request: dict[str, Any] = {"selection": selection, "op": op, op: body, "timeout_s": self.timeout_s,
                                   "deadline_s": deadline, "dry_run": self.dry_run}
        if self.wait_online is not None:
            request["wait_online_s"] = parse_duration(self.wait_online, "--wait-online")
        for key, value in (("max_concurrency", self.max_concurrency), ("max_errors", self.max_errors),
                           ("batch", self.batch), ("canary", self.canary)):
            if value is not None:
                request[key] = value
        return request


def put_job(g: Globals, options: JobOptions, local: Path, remote: str, mode: str | None,
            make_parents: bool, as_json: bool) -> int:
    """Upload ``local`` once and put it at ``remote`` on every server selected; return
    the exit code."""
    body: dict[str, Any] = {"path": remote, "make_parents": make_parents}
    if mode is not None:
        body["mode"] = mode

    async def go(c: Client) -> int:
        if options.dry_run:  # nothing is uploaded for a dry run
            return await _dry_run(c, options.request("put", {**body, "object": "dry-run",
                                                              "sha256": "0" * 64, "size": 0}), as_json)
        stored = await upload(c.files, local)
        try:
            body.update(object=stored.name, sha256=stored.sha256, size=stored.size)
            reply = await c.start_job(options.request("put", body))
            return await _follow(c, reply, as_json)
        finally:
            # The job has ended (or never started): nobody reads the object any more.
            await c.files.delete(stored.name)

    return run_async(lambda: with_client(g, go), EXIT_CANNOT_START)


def get_job(g: Globals, options: JobOptions, remote: str, dest: Path, as_json: bool) -> int:
    """Fetch ``remote`` from every server selected into ``dest/<server>/``; return the
    exit code (a failed download makes it at least 1)."""
    filename = PurePosixPath(remote).name
    if not filename:
        fail(f"{remote} names no file", EXIT_CANNOT_START)
    downloads_failed = 0

    async def fetch(c: Client, result: dict[str, Any]) -> dict[str, Any]:
        nonlocal downloads_failed
        if result["outcome"] != "ok":
            return result
        try:
            await download(c.files, result, dest, filename)
        except (FleetbusError, OSError) as exc:
            downloads_failed += 1
            message = exc.message if isinstance(exc, FleetbusError) else str(exc)
            return {**result, "outcome": "error",
                    "error": {"code": "download", "message": f"could not download: {message}"}}
        return result

    async def go(c: Client) -> int:
        if options.dry_run:
            return await _dry_run(c, options.request("get", {"path": remote}), as_json)
        reply = await c.start_job(options.request("get", {"path": remote}))
        return await _follow(c, reply, as_json, fetch)

    code = run_async(lambda: with_client(g, go), EXIT_CANNOT_START)
    return EXIT_SOME_FAILED if downloads_failed and code == EXIT_OK else code


async def _dry_run(c: Client, request: dict[str, Any], as_json: bool) -> int:
    reply = await c.start_job(request)
    if as_json:
        click.echo(json.dumps({"targets": reply["targets"]}))
    else:
        for name in reply["targets"]:
            click.echo(shown(name))
    return EXIT_OK


async def _follow(c: Client, reply: dict[str, Any], as_json: bool, on_result: OnResult | None = None) -> int:
    job = reply["id"]
    if not as_json:
        click.echo(f"fleetbus: job {job} on {len(reply['targets'])} servers (fleetbus jobs show {job})", err=True)
    return await _render(c, job, reply["targets"], as_json, cancel_on_interrupt=True, on_result=on_result)
