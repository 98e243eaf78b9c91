"""A job's live progress line at the bottom of a terminal (``run`` with a selection,
``jobs watch``).

Plain ANSI, no library: ``\\r`` and "erase line" (``ESC [2K``) redraw the one line in
place, and a line printed above it (a server's result, a line of its output) first
erases it and then draws it again below. Redrawn at most every :data:`MIN_REDRAW_S`,
since a job of thousands of servers sends a ``progress`` event per result and a
terminal that redraws for each falls behind. Cut to the terminal's width: a line that
wraps can no longer be erased with ``\\r``.

Only for a terminal: piped output and ``--json`` get no progress line at all
(:func:`wanted`), so what scripts and tests read is the plain lines.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

MIN_REDRAW_S = 0.1
ERASE = "\r\x1b[2K"


def wanted(stream: TextIO, as_json: bool) -> bool:
    """A progress line belongs on ``stream`` only when it is a terminal and not ``--json``."""
    isatty = getattr(stream, "isatty", None)
    return not as_json and bool(isatty and isatty())


def describe(counts: dict[str, Any], elapsed_s: float, fetching: int = 0) -> str:
    """``done 12/60 (1 failed)  running 10  waiting 2  skipped 0  3.4/s  0:03``.

    Done counts every server that has finished, however it ended; the rate is of those.
    ``fetching`` (a ``get`` job): files this requester has still to download, shown as
    ``downloading N`` (a server is done once its result is kept; its file may follow).
    """
    total = int(counts.get("total", 0))
    failed = int(counts.get("failed", 0))
    done = int(counts.get("ok", 0)) + failed + int(counts.get("cancelled", 0))
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    minutes, seconds = divmod(int(elapsed_s), 60)
    downloading = f"downloading {fetching}  " if fetching else ""
    return (f"done {done}/{total} ({failed} failed)  running {counts.get('running', 0)}  "
            f"waiting {counts.get('waiting', 0)}  skipped {counts.get('skipped', 0)}  {downloading}"
            f"{rate:.1f} servers/s  {minutes}:{seconds:02d}")


class ProgressLine:
    """The live line on ``stream`` (a terminal). Lines go above it through :meth:`echo`;
    :meth:`close` erases it."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 width: Callable[[], int] | None = None) -> None:
        self.stream = stream
        self.clock = clock
        self.width = width or (lambda: shutil.get_terminal_size().columns)
        self.counts: dict[str, Any] | None = None
        self._origin = clock()  # the job's start on our clock, once an event says its elapsed
        self._drawn_at: float | None = None
        self._shown = ""  # the text now on the line ("" when erased)
        self.fetching = 0  # files still to download (a get job), set by the printer

    def update(self, counts: dict[str, Any], elapsed_s: float) -> None:
        """A ``progress`` event: its counts, and the job's elapsed time by the core."""
        self.counts = counts
        self._origin = self.clock() - elapsed_s
        self._draw(force=False)

    def tick(self) -> None:
        """Let the elapsed time move between events (called a few times a second)."""
        self._draw(force=False)

    def echo(self, text: str) -> None:
        """Print ``text`` as a line above the progress line."""
        self.stream.write(ERASE if self._shown else "")
        self.stream.write(text + "\n")
        self._shown = ""
        self._draw(force=True)

    def hide(self) -> None:
        """Erase the line for now (another stream writes on the same screen); the next
        event or tick draws it again."""
        if self._shown:
            self.stream.write(ERASE)
            self.stream.flush()
        self._shown = ""

    def close(self) -> None:
        """Erase the line for good, leaving the cursor at the start of an empty line."""
        self.hide()
        self.counts = None

    def _draw(self, force: bool) -> None:
        if self.counts is None:
            self.stream.flush()
            return
        now = self.clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < MIN_REDRAW_S:
            return
        text = describe(self.counts, max(0.0, now - self._origin), self.fetching)[:max(self.width() - 1, 10)]
        if text != self._shown or force:
            self.stream.write(ERASE + text)
            self._shown = text
        self._drawn_at = now
        self.stream.flush()
