"""The options that pick servers for a job, and the job's own options, shared by
``fleetbus run``, ``put`` and ``get``; :class:`JobOptions` turns them into the fields of
a ``jobs.start`` request (docs/bus-api.md, "Jobs")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..jetstream import FILE_TTL_S
from .context import parse_duration, parse_pairs

F = TypeVar("F", bound=Callable[..., Any])


def selection_options(timeout_help: str) -> Callable[[F], F]:
    """The selection and job options ``run``, ``put`` and ``get`` share, and ``--timeout``
    (a single command's limit, and in a job each server's), described by ``timeout_help``."""
    options = [
        click.option("--role", help="Job: servers with this role."),
        click.option("--environment", "environment",
                     help="Job: servers in this environment (--env sets a command's variables)."),
        click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                     help="Job: servers with this label (repeatable; all must match)."),
        click.option("--servers", "server_patterns", metavar="NAMES",
                     help="Job: names and globs, comma-separated ('web-*,db1')."),
        click.option("--all", "all_servers", is_flag=True, help="Job: every registered server."),
        click.option("--max-concurrency", metavar="N|P%", help="Job: servers running at once (default 10)."),
        click.option("--max-errors", metavar="N|P%", help="Job: errors tolerated; one more starts nothing new (default: no limit)."),
        click.option("--batch", metavar="N|P%", help="Job: run in strict waves of this many."),
        click.option("--canary", type=click.IntRange(min=1), help="Job: run this many first; the rest only if all succeed."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), default=600.0, show_default=True,
                     help=timeout_help),
        click.option("--deadline", metavar="DURATION", help="Job: overall limit (90, 90s, 5m, 2h); then running commands are cancelled."),
        click.option("--wait-online", metavar="DURATION", help="Job: an offline server waits this long (30s, 5m, 1h) for its agent to connect "
                          "instead of being an error at once."),
        click.option("--dry-run", is_flag=True, help="Job: list the servers selected, and do nothing."),
    ]

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


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
