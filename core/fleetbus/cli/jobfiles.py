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

from pathlib import Path, PurePosixPath
from typing import Any

import click

from ..client import Client
from ..errors import FleetbusError
from ..jobfiles import download, upload
from .context import Globals, fail, run_async, with_client
from .jobopts import JobOptions
from .jobs import EXIT_CANNOT_START, EXIT_OK, EXIT_SOME_FAILED, OnResult, _render, print_targets


def put_job(g: Globals, options: JobOptions, local: Path, remote: str, mode: str | None,
            make_parents: bool, as_json: bool) -> int:
    """Upload ``local`` once and put it at ``remote`` on every server selected; return
    the exit code."""
    body: dict[str, Any] = {"path": remote, "make_parents": make_parents}
    if mode is not None:
        body["mode"] = mode
    # Built before anything is uploaded: a bad option is one line, not a wasted upload.
    request = options.request("put", {**body, "object": "dry-run", "sha256": "0" * 64, "size": 0})

    async def go(c: Client) -> int:
        if options.dry_run:  # nothing is uploaded for a dry run
            return await _dry_run(c, request, as_json)
        stored = await upload(c.files, local)
        try:
            request["put"].update(object=stored.name, sha256=stored.sha256, size=stored.size)
            reply = await c.start_job(request)
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

    request = options.request("get", {"path": remote})  # a bad option is one line, before any work

    async def go(c: Client) -> int:
        if options.dry_run:
            return await _dry_run(c, request, as_json)
        reply = await c.start_job(request)
        return await _follow(c, reply, as_json, fetch)

    code = run_async(lambda: with_client(g, go), EXIT_CANNOT_START)
    return EXIT_SOME_FAILED if downloads_failed and code == EXIT_OK else code


async def _dry_run(c: Client, request: dict[str, Any], as_json: bool) -> int:
    return print_targets(await c.start_job(request), as_json)


async def _follow(c: Client, reply: dict[str, Any], as_json: bool, on_result: OnResult | None = None) -> int:
    job = reply["id"]
    if not as_json:
        click.echo(f"fleetbus: job {job} on {len(reply['targets'])} servers (fleetbus jobs show {job})", err=True)
    return await _render(c, job, reply["targets"], as_json, cancel_on_interrupt=True, on_result=on_result)
