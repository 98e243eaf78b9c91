"""``fleetbus put|get`` on a selection of servers: one job that moves a file to or from
every server selected (the core runs it: :mod:`fleetbus.jobs`; the requester's side of
the object store: :mod:`fleetbus.jobfiles`), and ``fleetbus jobs rerun`` of such a job.

``put`` uploads the local file once, starts a ``put`` job of that object and deletes the
object when the job has ended. ``get`` starts a ``get`` job and, as each server's result
is kept, fetches its file into ``DEST/<server>/<name>`` (several at a time), checks its
sha256 and deletes the object; the job's ``client_notes`` record DEST, so that ``jobs
rerun`` fetches the files of a rerun to the same place. Lines, the summary and exit
codes are those of ``fleetbus run`` on a selection (:mod:`fleetbus.cli.jobs`); a
``get`` whose download failed counts as failed.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

import click

from ..client import Client
from ..errors import FleetbusError, InvalidRequest
from ..jobfiles import Downloads, upload
from .context import Globals, fail, run_async, with_client
from .jobopts import JobOptions
from .jobs import EXIT_CANNOT_START, EXIT_OK, EXIT_SOME_FAILED, OnResult, start_and_follow

#: The key of ``client_notes`` where ``fleetbus get`` records its destination folder.
NOTE_DEST = "dest"


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
            return await start_and_follow(c, c.start_job(request), as_json)
        stored = await upload(c.files, local)
        try:
            request["put"].update(object=stored.name, sha256=stored.sha256, size=stored.size)
            return await start_and_follow(c, c.start_job(request), as_json)
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
    failed: list[str] = []
    request = options.request("get", {"path": remote})  # a bad option is one line, before any work
    request["client_notes"] = {NOTE_DEST: str(dest.resolve())}  # for `jobs rerun`

    async def go(c: Client) -> int:
        return await start_and_follow(c, c.start_job(request), as_json,
                                      on_result=fetcher(Downloads(c.files, dest, filename), failed))

    return downloaded(run_async(lambda: with_client(g, go), EXIT_CANNOT_START), failed, as_json)


def fetcher(downloads: Downloads, failed: list[str]) -> OnResult:
    """The hook that downloads each ``ok`` server's file (:class:`Downloads` bounds how
    many at once); a failed download turns that server's result into an ``error`` and
    is listed in ``failed``."""
    async def fetch(_c: Client, result: dict[str, Any]) -> dict[str, Any]:
        if result["outcome"] != "ok":
            return result
        try:
            await downloads.fetch(result)
        except Exception as exc:  # whatever it was, it is this server's and shown on its line
            failed.append(result["server"])
            message = exc.message if isinstance(exc, FleetbusError) else str(exc) or type(exc).__name__
            return {**result, "outcome": "error",
                    "error": {"code": "download", "message": f"could not download: {message}"}}
        return result

    return fetch


def downloaded(code: int, failed: list[str], as_json: bool) -> int:
    """A ``get`` job's exit code: as the job's, and at least 1 when a download failed."""
    if failed and not as_json:
        click.echo(f"fleetbus: {len(failed)} download{'s' if len(failed) > 1 else ''} failed: "
                   f"{', '.join(sorted(failed))}", err=True)
    return EXIT_SOME_FAILED if failed and code == EXIT_OK else code


def rerun_job(g: Globals, job: str, failed_only: bool, dry_run: bool, as_json: bool,
              to: Path | None, file: Path | None) -> int:
    """``fleetbus jobs rerun``: the job's request again as a new job, followed as ``run``
    follows one. A ``get`` job's files go to ``to``, else to the folder its first
    requester recorded; a ``put`` job reuses its object while that still exists, else
    needs ``file`` again (checked against the job's sha256 before it is uploaded)."""
    failed: list[str] = []

    async def go(c: Client) -> int:
        request = (await c.get_job(job))["job"]["request"]
        op = request.get("op")
        if to is not None and op != "get":
            raise InvalidRequest(f"--to is for a get job; job {job} is {op}")
        if file is not None and op != "put":
            raise InvalidRequest(f"--file is for a put job; job {job} is {op}")
        on_result: OnResult | None = None
        notes: dict[str, Any] | None = None
        if op == "get":
            dest = to or _recorded_dest(request)
            if dest is None:
                raise InvalidRequest(f"job {job} does not say where its files went: give --to DIR")
            if dest.exists() and not dest.is_dir():
                raise InvalidRequest(f"{dest} is not a folder: a job writes {dest}/<server>/<name>")
            notes = {**(request.get("client_notes") or {}), NOTE_DEST: str(dest.resolve())}
            on_result = fetcher(Downloads(c.files, dest, PurePosixPath(request["get"]["path"]).name), failed)
        put_object = None
        if file is not None and not dry_run:
            sha256 = await asyncio.to_thread(_sha256, file)
            if sha256 != request["put"]["sha256"]:
                raise InvalidRequest(f"{file} is not what job {job} put (its sha256 differs); "
                                     "put it as a new job instead")
            put_object = (await upload(c.files, file)).name
        try:
            return await start_and_follow(c, c.rerun_job(job, failed_only, dry_run, client_notes=notes,
                                                         put_object=put_object), as_json, on_result=on_result)
        finally:
            if put_object is not None:
                await c.files.delete(put_object)

    return downloaded(run_async(lambda: with_client(g, go), EXIT_CANNOT_START), failed, as_json)


def _recorded_dest(request: dict[str, Any]) -> Path | None:
    dest = (request.get("client_notes") or {}).get(NOTE_DEST)
    return Path(dest) if isinstance(dest, str) and dest else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
