"""What a job starts next: rate control, batches, canary and the error budget.

A pure state machine with no NATS and no clock, so every rule is tested exactly
(tests/test_jobplan.py). The job runner (:mod:`fleetbus.jobs`) asks
:meth:`JobPlan.next_starts` what to start, reports each result with
:meth:`JobPlan.finished`, and calls :meth:`JobPlan.stop` on cancel or at the deadline.

The rules (docs/bus-api.md, "Jobs", says the same):

- **Order.** Targets start in the order given (the selection's, by name).
- **Concurrency.** At most ``max_concurrency`` servers run at once. A percentage is of
  the number of targets, rounded **up**, and never below 1 (``25%`` of 10 is 3).
- **Error budget.** An error is any result but ``ok``: a non-zero exit code, a timeout,
  an offline server, any other failure. With ``max_errors`` = N the job tolerates N
  errors; the budget is **spent when errors > N**, i.e. by the (N+1)th error. Then
  nothing new starts, running servers finish (their results still count), and the
  rest end ``skipped``. A percentage is of the number of targets, rounded **down**
  (``25%`` of 10 allows 2 errors; ``5%`` of 10 allows none). No ``max_errors``: no
  budget, every target runs.
- **Batches.** With ``batch`` = B, servers run in strict waves of B: the next wave
  starts only when every server of the current one has finished. Concurrency still
  applies inside a wave. A percentage rounds up, never below 1.
- **Canary.** With ``canary`` = C, the first C targets form a wave of their own; the
  rest start only if all of them succeed. One canary error stops the job at once
  (reason ``canary``): running canaries finish, nothing else starts.
- **Offline servers.** An ``offline`` result (nobody serves the server) is an error
  that gives back its place at once: it leaves the concurrency count and its wave
  (the wave takes the next target instead), since it never ran anywhere.
- **Waiting for offline servers** (a job with ``wait_online_s``). The runner moves an
  offline server to *waiting* with :meth:`JobPlan.wait` instead of finishing it: like
  an offline result it gives back its concurrency slot and its place in the wave, and
  it is not an error yet. When it comes online, :meth:`JobPlan.online` puts it first
  in line again (it takes a slot and a place in the wave then current); when its wait
  runs out, :meth:`JobPlan.expired` makes it an ``offline`` error, which counts against
  the budget (or stops a canary wave) at that moment. The plan has no clock: the runner
  times the waits.
- **Stop.** :meth:`JobPlan.stop` (cancel, deadline) starts nothing more; what is still
  pending ends ``skipped``, and what is still waiting ends ``offline`` (it was not
  reached), without counting against the budget, which no longer decides anything.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["ok", "failed", "timeout", "offline", "error", "cancelled"]
StopReason = Literal["budget", "canary", "cancelled", "deadline"]

_AMOUNT_RE = re.compile(r"^\s*(\d{1,9})\s*(%?)\s*$")


@dataclass(frozen=True)
class Amount:
    """A count (``3``) or a percentage of the job's targets (``"25%"``)."""

    value: int
    percent: bool = False

    @classmethod
    def parse(cls, raw: int | str, what: str, minimum: int) -> Amount:
        """From an integer or a string like ``"10"`` or ``"25%"``; ValueError names ``what``."""
        if isinstance(raw, bool):
            raise ValueError(f"{what} must be a count or a percentage like '25%'")  # noqa: TRY004  (pydantic reports ValueError)
        if isinstance(raw, int):
            value, percent = raw, False
        else:
            match = _AMOUNT_RE.fullmatch(str(raw))
            if match is None:
                raise ValueError(f"{what} must be a count or a percentage like '25%', not {str(raw)[:32]!r}")
            value, percent = int(match.group(1)), bool(match.group(2))
        if value < minimum or (percent and value > 100):
            top = " and at most 100%" if percent else ""
            raise ValueError(f"{what} must be at least {minimum}{'%' if percent else ''}{top}")
        return cls(value, percent)

    def up(self, total: int) -> int:
        """The count for ``total`` targets, a percentage rounded up, at least 1."""
        if not self.percent:
            return self.value
        return max(1, math.ceil(total * self.value / 100))

    def down(self, total: int) -> int:
        """The count for ``total`` targets, a percentage rounded down (may be 0)."""
        if not self.percent:
            return self.value
        return total * self.value // 100

    def __str__(self) -> str:
        return f"{self.value}{'%' if self.percent else ''}"


@dataclass(frozen=True)
class PlanOptions:
    max_concurrency: Amount = Amount(10)
    max_errors: Amount | None = None
    batch: Amount | None = None
    canary: int = 0


@dataclass
class JobPlan:
    """Decides what starts next as results arrive. See the module docstring for the rules."""

    targets: Sequence[str]
    options: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self) -> None:
        total = len(self.targets)
        if len(set(self.targets)) != total:
            raise ValueError("targets must be distinct")
        self.concurrency = self.options.max_concurrency.up(total)
        self.error_limit = None if self.options.max_errors is None else self.options.max_errors.down(total)
        self.batch_size = None if self.options.batch is None else self.options.batch.up(total)
        self.canary = min(self.options.canary, total)
        self.pending: deque[str] = deque(self.targets)
        self.running: set[str] = set()
        self.waiting: list[str] = []  # offline, in the order they went waiting
        self.outcomes: dict[str, Outcome] = {}
        # How many of each outcome, kept as outcomes are recorded: progress goes out on
        # every result, and counting a thousand outcomes each time adds up.
        self.tally: Counter[Outcome] = Counter()
        self.errors = 0
        self.stopped: StopReason | None = None
        self.given_up: list[str] = []  # waiting when the job stopped: they end offline
        self._in_canary = self.canary > 0
        self._wave_size = self.canary if self._in_canary else self.batch_size
        self._wave_taken = 0  # servers of the current wave started and not given back

    # what to do -------------------------------------------------------------------------
    def next_starts(self) -> list[str]:
        """The servers to start now, in order; they count as running from here on."""
        starts: list[str] = []
        while self.stopped is None and self.pending and len(self.running) < self.concurrency:
            if self._wave_size is not None and self._wave_taken >= self._wave_size:
                if self.running:
                    break  # strict waves: the next one waits for this one to finish
                self._next_wave()
            name = self.pending.popleft()
            self.running.add(name)
            self._wave_taken += 1
            starts.append(name)
        return starts

    def finished(self, name: str, outcome: Outcome) -> None:
        """Record one running server's result."""
        if name not in self.running:
            raise ValueError(f"{name} is not running")
        self.running.discard(name)
        self._record(name, outcome)
        if outcome == "ok" or (outcome == "cancelled" and self.stopped in ("cancelled", "deadline")):
            return  # a command we cancelled ourselves is not the server's error
        if outcome == "offline":
            self._wave_taken -= 1  # it never ran: its place in the wave goes to the next
        self._error()

    def wait(self, name: str) -> None:
        """A running server was offline: it waits (no slot, no place in the wave, no error yet)."""
        if name not in self.running:
            raise ValueError(f"{name} is not running")
        self.running.discard(name)
        self._wave_taken -= 1
        if self.stopped is not None:
            self._record(name, "offline")  # stopped meanwhile: it will not be tried again
            self.given_up.append(name)
        else:
            self.waiting.append(name)

    def online(self, name: str) -> None:
        """A waiting server came online: it starts next (when slots and its wave allow)."""
        if name not in self.waiting:
            raise ValueError(f"{name} is not waiting")
        if self.stopped is not None:
            return  # stop() already ended it
        self.waiting.remove(name)
        self.pending.appendleft(name)

    def expired(self, name: str) -> None:
        """A waiting server's wait ran out: an ``offline`` error from now."""
        if name not in self.waiting:
            raise ValueError(f"{name} is not waiting")
        self.waiting.remove(name)
        self._record(name, "offline")
        self._error()

    def _record(self, name: str, outcome: Outcome) -> None:
        old = self.outcomes.get(name)
        if old is not None:
            self.tally[old] -= 1
        self.outcomes[name] = outcome
        self.tally[outcome] += 1

    def _error(self) -> None:
        self.errors += 1
        if self.stopped is None and self._in_canary:
            self.stop("canary")
        elif self.stopped is None and self.error_limit is not None and self.errors > self.error_limit:
            self.stop("budget")

    def stop(self, reason: StopReason) -> None:
        """Start nothing more (cancel, deadline, budget, canary). The first reason given
        is kept. Servers still waiting end ``offline`` now (:attr:`given_up`)."""
        if self.stopped is None:
            self.stopped = reason
        for name in self.waiting:
            self._record(name, "offline")  # not reached; the budget no longer matters
        self.given_up += self.waiting
        self.waiting.clear()

    # what happened ------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Nothing runs and nothing more will start."""
        return not self.running and (self.stopped is not None or not (self.pending or self.waiting))

    def skipped(self) -> list[str]:
        """Targets that never started (valid once :attr:`done`)."""
        return list(self.pending) if self.stopped is not None else []

    @property
    def skipped_count(self) -> int:
        """``len(skipped())`` without the list."""
        return len(self.pending) if self.stopped is not None else 0

    def _next_wave(self) -> None:
        self._in_canary = False
        self._wave_size = self.batch_size
        self._wave_taken = 0
