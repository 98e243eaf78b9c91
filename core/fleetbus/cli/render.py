"""Printing results: aligned tables for people, JSON for scripts.

Everything shown in a table or a key-value list may come from a server, an agent or
another requester, so :func:`shown` (the one place) escapes control characters before
it reaches the terminal. JSON output needs nothing: json.dumps escapes them itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from ..printable import printable


def shown(value: Any) -> str:
    """``value`` as text for a terminal: empty for None, control characters escaped."""
    return "" if value is None else printable(str(value))


def who(identity: dict[str, Any] | None, declared: str | None, unknown: str = "owner") -> str:
    """Whom a record names (its verified ``identity``, subjects.Identity.record): ``owner``
    or the user's name (else its key), with ``(declared: X)`` when the requester the
    request declared is another; ``unknown`` for a record kept before identities were."""
    if identity is None:
        name = unknown
    elif identity.get("account") is None:
        name = "owner"
    else:
        name = str(identity.get("name") or identity.get("name_tag") or identity.get("user") or "?")
    return name if declared in (None, name) else f"{name} (declared: {declared})"


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[shown(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    click.echo("  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())


def key_values(rows: Sequence[tuple[str, Any]]) -> None:
    """Aligned ``key  value`` lines, skipping empty values."""
    visible = [(shown(k), shown(v)) for k, v in rows if v not in (None, "")]
    width = max((len(k) for k, _ in visible), default=0)
    for key, value in visible:
        click.echo(f"{key.ljust(width)}  {value}")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class Progress:
    """A transfer progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < 1024 * 1024:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
