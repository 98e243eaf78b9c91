"""What a job's commands print, live: ``run --output`` (lines prefixed with the server,
as pdsh does) and ``run --group`` (identical outputs folded, as ``dshbak -c`` does).

The job request names an ``output_subject`` (an inbox of this CLI); each server's
command publishes its chunks there, tagged with its command id (``Fleetbus-Command``),
which names the server: ``<job>-<server>`` (:func:`fleetbus.jobrun.command_id`). Chunks
can arrive before ``jobs.start`` has replied with the job id, so they wait until
:meth:`JobOutput.bind` says which command is which server.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import click
from nats.aio.msg import Msg

from ..jobrun import command_id
from ..limits import DEFAULT_TAIL_BYTES
from ..output import HDR_COMMAND, HDR_END, HDR_STREAM
from .render import shown

Mode = Literal["lines", "group"]


class JobOutput:
    """Collects and prints a job's live output by server."""

    def __init__(self, mode: Mode, limit: int = DEFAULT_TAIL_BYTES) -> None:
        self.mode = mode
        self.limit = limit  # --group keeps this much per server (like a command's tail)
        self._servers: dict[str, str] | None = None  # command id -> server, once bound
        self._early: list[Msg] = []
        self._partial: dict[tuple[str, str], bytes] = {}
        self.collected: dict[str, bytearray] = {}
        self.truncated: set[str] = set()
        self.from_tails: set[str] = set()  # --group: output taken from the result's tails
        self.seen: set[str] = set()  # servers any chunk came from
        self.ended: set[str] = set()
        self._changed = asyncio.Event()
        # Where a line goes instead of straight to stdout/stderr: on a terminal, above
        # the job's progress line (JobPrinter.output).
        self.above: Callable[[str, str], None] | None = None

    def bind(self, job: str, targets: list[str]) -> None:
        self._servers = {command_id(job, server): server for server in targets}
        early, self._early = self._early, []
        for msg in early:
            self._take(msg)

    async def on_msg(self, msg: Msg) -> None:
        if self._servers is None:
            self._early.append(msg)
        else:
            self._take(msg)

    def _take(self, msg: Msg) -> None:
        headers = msg.headers or {}
        server = (self._servers or {}).get(headers.get(HDR_COMMAND, ""))
        if server is None:
            return  # not this job's
        if headers.get(HDR_END):
            for stream in ("stdout", "stderr"):
                rest = self._partial.pop((server, stream), b"")
                if rest:
                    self._print(server, stream, rest)
            self.ended.add(server)
            self._changed.set()
            return
        stream = "stderr" if headers.get(HDR_STREAM) == "stderr" else "stdout"
        self.seen.add(server)
        if self.mode == "group":
            kept = self.collected.setdefault(server, bytearray())
            room = self.limit - len(kept)
            if len(msg.data) > room:
                self.truncated.add(server)
            kept += msg.data[:max(room, 0)]
            return
        data = self._partial.pop((server, stream), b"") + msg.data
        *lines, rest = data.split(b"\n")
        for line in lines:
            self._print(server, stream, line)
        if rest:
            self._partial[(server, stream)] = rest

    def _print(self, server: str, stream: str, line: bytes) -> None:
        text = f"{shown(server)}: {line.decode(errors='replace')}"
        if self.above is not None:
            self.above(stream, text)
            return
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.write(text + "\n")
        out.flush()

    def awaiting(self, results: Mapping[str, dict[str, Any]]) -> set[str]:
        """The servers whose output may still be on its way: their result says the
        command ran on a worker (an exit code, a signal, or output in its tails), which
        sends the end marker just before replying, and that marker has not come. A
        server that never ran (offline, refused, skipped) sends none: nothing to wait for."""
        return {server for server, r in results.items() if server not in self.ended and (
            r.get("exit_code") is not None or r.get("signal") is not None or r.get("stdout") or r.get("stderr"))}

    async def settle(self, results: Mapping[str, dict[str, Any]], timeout: float) -> None:
        """Wait for the end of output still on its way (:meth:`awaiting`), at most
        ``timeout``; then a server whose output never came at all is shown from its
        result's tails (the last 4 KiB of each stream), so nothing it printed is lost.
        Returns at once when every end marker is in, which is the common case."""
        missing = self.awaiting(results)
        if missing:
            await self.wait_ended(missing, timeout)
        for server in sorted(missing - self.ended - self.seen):
            r = results[server]
            for stream in ("stdout", "stderr"):
                text = str(r.get(stream) or "")
                if not text:
                    continue
                if self.mode == "group":
                    self.collected.setdefault(server, bytearray()).extend(text.encode()[:self.limit])
                    self.from_tails.add(server)
                    continue
                for line in text.splitlines():
                    self._print(server, stream, line.encode())

    async def wait_ended(self, servers: set[str], timeout: float) -> None:
        """Wait for the end marker of each of ``servers`` (it may trail their results)."""
        async def all_ended() -> None:
            while not servers <= self.ended:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(all_ended(), timeout)
        except TimeoutError:
            pass

    def print_groups(self, servers: list[str]) -> None:
        """One block per distinct output, headed by the servers that printed it."""
        groups: dict[bytes, list[str]] = {}
        for server in servers:
            groups.setdefault(bytes(self.collected.get(server, b"")), []).append(server)
        # The most common output first: what most servers said is what one reads first.
        for output, names in sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0])):
            cut = [n for n in names if n in self.truncated]
            header = f"== {', '.join(shown(n) for n in names)} ({len(names)} server{'s' if len(names) > 1 else ''})"
            if cut:
                header += f", first {self.limit // 1024} KiB"
            if any(n in self.from_tails for n in names):
                header += ", from the kept tail of its result"
            click.echo(header + " ==")
            text = output.decode(errors="replace")
            if not text:
                click.echo("(no output)")
            else:
                click.echo(text, nl=not text.endswith("\n"))
