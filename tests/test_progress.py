"""The live progress line of a followed job, fed events on a fake terminal (no NATS).

A small terminal model turns what was written (``\\r``, erase line, newlines) into the
screen's lines, so the tests assert what an operator would see, not escape sequences.
"""

from __future__ import annotations

import io
import json
from typing import Any

from fleetbus.cli.jobs import JobPrinter
from fleetbus.cli.progress import ERASE, MIN_REDRAW_S, ProgressLine, describe


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def screen(written: str) -> list[str]:
    """The lines a terminal shows after ``written`` (only \\r, ESC[2K and \\n are used)."""
    lines = [""]
    col = 0
    i = 0
    while i < len(written):
        if written.startswith("\x1b[2K", i):
            lines[-1] = ""
            i += 4
            continue
        ch = written[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            row = lines[-1]
            lines[-1] = row[:col] + ch + row[col + 1:]
            col += 1
        i += 1
    return lines


def counts(**kw: int) -> dict[str, int]:
    base = {"total": 4, "ok": 0, "failed": 0, "cancelled": 0, "skipped": 0, "unknown": 0,
            "running": 0, "waiting": 0, "pending": 0}
    return {**base, **kw}


def result(server: str, outcome: str, **kw: Any) -> dict[str, Any]:
    return {"job": "j1", "server": server, "outcome": outcome, **kw}


def printer_on(out: io.StringIO, clock: Clock, as_json: bool = False) -> JobPrinter:
    printer = JobPrinter("j1", ["web-1", "web-2", "web-3", "web-4"], as_json, out=out, err=io.StringIO())
    if printer.line is not None:
        printer.line.clock = clock
        printer.line.width = lambda: 120
    return printer


def test_results_go_above_a_line_redrawn_in_place_with_the_counts() -> None:
    out, clock = FakeTTY(), Clock()
    printer = printer_on(out, clock)
    printer.progress({"job": "j1", "counts": counts(running=2, waiting=1, pending=1), "elapsed_s": 0.5})
    assert screen(out.getvalue()) == ["done 0/4 (0 failed)  running 2  waiting 1  skipped 0  0.0 servers/s  0:00"]
    clock.now += 1.5
    printer.result(result("web-1", "ok", duration_s=0.21))
    printer.progress({"job": "j1", "counts": counts(ok=1, running=2, waiting=1), "elapsed_s": 2.0})
    clock.now += 0.5
    printer.result(result("web-2", "failed", exit_code=1, stderr="boom\n"))
    printer.progress({"job": "j1", "counts": counts(ok=1, failed=1, running=1, waiting=1), "elapsed_s": 2.5})
    printer.progress({"job": "other", "counts": counts(ok=4), "elapsed_s": 9})  # not this job's
    clock.now += 1.5 * MIN_REDRAW_S  # the last update came too soon after a redraw: the tick draws it
    printer.tick()

    shown = screen(out.getvalue())
    assert shown == ["web-1  ok  0.21s",
                     "web-2  exit 1  boom",
                     "done 2/4 (1 failed)  running 1  waiting 1  skipped 0  0.8 servers/s  0:02"]
    assert out.getvalue().count(ERASE) >= 4  # redrawn in place, never a new line per update
    assert "\n" not in out.getvalue().rsplit("web-2  exit 1  boom\n", 1)[1]

    printer.result(result("web-3", "ok", duration_s=0.1))
    printer.result(result("web-4", "offline", error={"code": "server_offline",
                                                     "message": "web-4 did not come online within 5m"}))
    code = printer.finished({"state": "failed", "stop_reason": None, "duration_s": 3.0,
                             "counts": counts(ok=3, failed=1)})
    assert code == 1
    assert screen(out.getvalue()) == [
        "web-1  ok  0.21s", "web-2  exit 1  boom", "web-3  ok  0.10s",
        "web-4  offline  web-4 did not come online within 5m",
        "job j1: 3 ok, 1 failed, 0 cancelled, 0 skipped of 4 in 3.00s; failed", ""]


def test_redraws_at_most_ten_times_a_second_and_the_tick_catches_up() -> None:
    out, clock = FakeTTY(), Clock()
    line = ProgressLine(out, clock=clock, width=lambda: 120)
    line.update(counts(running=1), 0.0)
    for ok in range(1, 50):  # a burst of events within one redraw interval
        line.update(counts(ok=ok, running=1), 0.0)
    assert out.getvalue().count(ERASE) == 1
    assert screen(out.getvalue())[-1].startswith("done 0/4")
    clock.now += 1.5 * MIN_REDRAW_S
    line.tick()
    assert out.getvalue().count(ERASE) == 2
    assert screen(out.getvalue())[-1].startswith("done 49/4")
    clock.now += 61
    line.tick()  # no event, but the elapsed time moves
    assert screen(out.getvalue())[-1].endswith("1:01")


def test_the_line_is_cut_to_the_terminal_width() -> None:
    out, clock = FakeTTY(), Clock()
    line = ProgressLine(out, clock=clock, width=lambda: 20)
    line.update(counts(), 0.0)
    assert screen(out.getvalue()) == [describe(counts(), 0.0)[:19]]


def test_not_a_terminal_or_json_has_no_progress_line() -> None:
    for out, as_json in ((io.StringIO(), False), (FakeTTY(), True)):
        clock = Clock()
        printer = printer_on(out, clock, as_json=as_json)
        assert printer.line is None
        printer.progress({"job": "j1", "counts": counts(running=1), "elapsed_s": 0.1})
        printer.result(result("web-1", "ok", duration_s=0.2))
        printer.tick()
        printer.finished({"state": "succeeded", "stop_reason": None, "duration_s": 1.0,
                          "counts": counts(ok=1)})
        written = out.getvalue()
        assert "\r" not in written and "\x1b" not in written and "done " not in written
        lines = written.splitlines()
        assert len(lines) == 2
        if as_json:
            assert json.loads(lines[0])["server"] == "web-1"
        else:
            assert lines[0] == "web-1  ok  0.20s"


def test_a_note_on_stderr_erases_the_line_and_it_comes_back() -> None:
    out, clock = FakeTTY(), Clock()
    printer = printer_on(out, clock)
    printer.progress({"job": "j1", "counts": counts(running=2), "elapsed_s": 0.0})
    printer.note("fleetbus: interrupted; cancelling job j1")
    assert screen(out.getvalue()) == [""]  # nothing left for stderr's line to collide with
    clock.now += 1
    printer.tick()
    assert screen(out.getvalue())[-1].startswith("done 0/4 (0 failed)  running 2")
