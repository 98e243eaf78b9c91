"""Throttling failed authentication per source address (used by both ends of a link).

After ``limit`` failures within ``window_s`` an address is locked out for ``lockout_s``,
doubling on each further lockout up to ``max_lockout_s``. A success clears the record.
Memory is bounded: at most ``max_tracked`` addresses are remembered, oldest first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List


@dataclass
class _Record:
    failures: List[float] = field(default_factory=list)
    locked_until: float = 0.0
    lockouts: int = 0


class FailureThrottle:
    def __init__(self, limit: int = 5, window_s: float = 60.0, lockout_s: float = 30.0,
                 max_lockout_s: float = 900.0, max_tracked: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_lockout_s = max_lockout_s
        self.max_tracked = max_tracked
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def blocked_for(self, address: str) -> float:
        """Seconds ``address`` is still locked out for (0 when it may try)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - self.clock())

    def failure(self, address: str) -> bool:
        """Record a failure; True when this one locked the address out."""
        now = self.clock()
        record = self._records.pop(address, None) or _Record()
        self._records[address] = record
        while len(self._records) > self.max_tracked:
            self._records.popitem(last=False)
        record.failures = [t for t in record.failures if now - t < self.window_s]
        record.failures.append(now)
        if len(record.failures) >= self.limit:
            record.lockouts += 1
            span = min(self.max_lockout_s, self.lockout_s * 2 ** (record.lockouts - 1))
            record.locked_until = now + span
            record.failures.clear()
            return True
        return False

    def success(self, address: str) -> None:
        self._records.pop(address, None)

    def snapshot(self) -> Dict[str, float]:
        return {a: self.blocked_for(a) for a in self._records}
