"""The process's file-descriptor budget: raise the soft limit, keep a reserve free.

A listener facing the network must stop taking connections before the process runs out
of descriptors, or everything else it does (NATS, a command's pipes, a log file) fails
with "Too many open files". :class:`FdBudget` says how many more descriptors the
listener may take: the soft ``RLIMIT_NOFILE`` minus what is open minus a reserve of
``max(reserve_min, reserve_fraction * soft)`` left for everything else.

Counting what is open reads ``/proc/self/fd`` (Linux), at most every ``sample_s``
seconds; between two readings the caller reports each descriptor it takes and closes,
and the next reading corrects whatever else changed. Without
``/proc`` the caller's own count of held connections is used instead.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Tuple

try:
    import resource
except ImportError:  # not on Windows: the limits below are then unknown
    resource = None  # type: ignore[assignment]

RESERVE_MIN = 256
RESERVE_FRACTION = 0.10
SAMPLE_S = 0.25
_FD_DIR = "/proc/self/fd"


def raise_nofile_limit() -> Tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (soft, hard) after.

    The default soft limit (1,024 under systemd) is a guard for programs that use
    ``select()``; asyncio uses epoll, so the whole hard limit is usable. Never lowers it.
    """
    if resource is None:
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. a hard limit above fs.nr_open: keep the soft one
    return soft, hard


def soft_nofile_limit() -> int:
    """The soft descriptor limit, or a large number when it is unknown or unlimited."""
    if resource is None:
        return 1 << 20
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def count_open_fds() -> Optional[int]:
    """How many descriptors this process holds (None when ``/proc`` cannot tell)."""
    try:
        return len(os.listdir(_FD_DIR))
    except OSError:
        return None


class FdBudget:
    """How many more descriptors a listener may take, keeping a reserve for the rest."""

    def __init__(self, reserve_min: int = RESERVE_MIN, reserve_fraction: float = RESERVE_FRACTION,
                 sample_s: float = SAMPLE_S, limit: Optional[int] = None,
                 counter: Callable[[], Optional[int]] = count_open_fds,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit if limit is not None else soft_nofile_limit()
        # Never more than half the limit: a tiny limit must still leave room to accept.
        self.reserve = min(self.limit // 2, max(reserve_min, int(self.limit * reserve_fraction)))
        self.sample_s = sample_s
        self._counter = counter
        self._clock = clock
        self._sampled_at = float("-inf")
        self._open = 0
        self._taken_since = 0

    def room(self, held: int = 0) -> int:
        """Descriptors that may still be taken before the reserve (may be negative).

        ``held`` is the caller's count of connections it holds, used when ``/proc`` is
        not there to count every descriptor.
        """
        now = self._clock()
        if now - self._sampled_at >= self.sample_s:
            counted = self._counter()
            self._open = counted if counted is not None else held
            self._sampled_at = now
            self._taken_since = 0
        return self.limit - self.reserve - self._open - self._taken_since

    def took(self, count: int = 1) -> None:
        """The caller opened ``count`` descriptors since the last reading (negative: closed)."""
        self._taken_since += count

    def resample(self) -> None:
        """Forget the last reading, so the next :meth:`room` counts again."""
        self._sampled_at = float("-inf")
