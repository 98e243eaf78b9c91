"""Throttling and logging failed authentication (the gateway and the listening agent).

:class:`FailureThrottle` is one lockout table: after ``limit`` failures of one name
within ``window_s`` it is locked out for ``lockout_s``, doubling on each further lockout
up to ``max_lockout_s``; a success clears it; at most ``max_tracked`` names are kept.

:class:`AuthThrottle` keeps three of them, so that neither a NAT neighbour's mistakes
nor rotating addresses defeat throttling:

- per (address, key id): a source guessing one key is locked out; a neighbour behind
  the same address with another key, or with garbage, is not;
- per key id, from any address: guesses at one key from rotating addresses are locked
  out, except from an address that authenticated with that key recently (trusted);
- per address, any key: an address that keeps failing is *penalised*, not banned: it
  may hold fewer unauthenticated connections at once (:class:`.admission.Gate`), so a
  correct agent behind it still gets its handshake.

:class:`FailureLog` logs failures in aggregate: the first from an address at once, then
one line per address per interval with the count by reason. No key is ever logged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple


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


NO_KEY = "-"
"""The key id of a hello with no well-formed key (garbage, another auth method)."""


class AuthThrottle:
    """Failed authentications throttled by source, by key id and by address (see above)."""

    def __init__(self, source_limit: int = 5, key_limit: int = 20, address_limit: int = 20,
                 window_s: float = 60.0, lockout_s: float = 30.0, max_lockout_s: float = 900.0,
                 trust_s: float = 86400.0, max_tracked: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        def table(limit: int) -> FailureThrottle:
            return FailureThrottle(limit, window_s, lockout_s, max_lockout_s, max_tracked, clock)

        self.sources = table(source_limit)
        self.keys = table(key_limit)
        self.addresses = table(address_limit)
        self.trust_s = trust_s
        self.max_tracked = max_tracked
        self.clock = clock
        self._trusted: OrderedDict[Tuple[str, str], float] = OrderedDict()

    def locked(self, address: str, key_id: Optional[str]) -> bool:
        """True when a hello from ``address`` for ``key_id`` is to be refused unchecked."""
        key = key_id or NO_KEY
        if self.sources.blocked_for(_source(address, key)) > 0:
            return True
        # Trust lifts only the key-wide lock, which strangers can set off; an address's
        # own failures still lock that address out.
        return key != NO_KEY and self.keys.blocked_for(key) > 0 and not self.trusted(address, key)

    def failure(self, address: str, key_id: Optional[str]) -> bool:
        """Record a failed authentication; True when it locked something out."""
        key = key_id or NO_KEY
        locked = self.sources.failure(_source(address, key))
        if key != NO_KEY:
            locked = self.keys.failure(key) or locked
        return self.addresses.failure(address) or locked

    def success(self, address: str, key_id: Optional[str]) -> None:
        """``address`` proved ``key_id``: clear its record and trust the pair for a while."""
        key = key_id or NO_KEY
        self.sources.success(_source(address, key))
        pair = (address, key)
        self._trusted[pair] = self.clock() + self.trust_s
        self._trusted.move_to_end(pair)
        while len(self._trusted) > self.max_tracked:
            self._trusted.popitem(last=False)

    def trusted(self, address: str, key_id: str) -> bool:
        until = self._trusted.get((address, key_id))
        return until is not None and until > self.clock()

    def penalised(self, address: str) -> bool:
        """True while ``address`` has failed too often (of any key) of late."""
        return self.addresses.blocked_for(address) > 0


def _source(address: str, key_id: str) -> str:
    return f"{address} {key_id}"


class FailureLog:
    """Failed authentications, logged in aggregate rather than one line per attempt.

    The first failure from an address, and the first that locks it out, are logged at
    once (for at most ``max_immediate`` addresses per interval, so rotating addresses do
    not flood the log either); later ones are counted by reason, and :meth:`flush`
    (called every ``interval_s`` by the owner) writes one line for each of the
    ``max_itemised`` addresses with the most failures and one line for all the others.
    """

    def __init__(self, log: logging.Logger, one: str, many: str, interval_s: float = 60.0,
                 max_immediate: int = 20, max_itemised: int = 20, max_tracked: int = 10000) -> None:
        self.log = log
        self.one = one
        """What failed, singular ("agent authentication")."""
        self.many = many
        """The same, plural ("agent authentications")."""
        self.interval_s = interval_s
        self.max_immediate = max_immediate
        self.max_itemised = max_itemised
        self.max_tracked = max_tracked
        self._immediate = 0
        self._pending: Dict[str, Counter[str]] = {}
        self._lockouts: Set[str] = set()
        self._seen: Set[str] = set()
        self._seen_before: Set[str] = set()
        self._untracked: Counter[str] = Counter()

    def note(self, address: str, reason: str, locked: bool = False) -> None:
        """Count one failure from ``address`` (``reason``: a short label, no secrets)."""
        first = address not in self._seen and address not in self._seen_before
        if len(self._seen) < self.max_tracked:
            self._seen.add(address)
        if first and self._immediate < self.max_immediate:
            self._immediate += 1
            self.log.warning("%s from %s failed (%s)%s; further failures from it are summed up "
                             "every %g s", self.one, address, reason,
                             "; locked out for a while" if locked else "", self.interval_s)
            return
        if locked and address not in self._lockouts and self._immediate < self.max_immediate:
            self._immediate += 1
            self._lockouts.add(address)
            self.log.warning("%s from %s failed (%s); locked out for a while", self.one, address, reason)
            return
        counts = self._pending.get(address)
        if counts is None:
            if len(self._pending) >= self.max_tracked:
                self._untracked[reason] += 1
                return
            counts = self._pending[address] = Counter()
        counts[reason] += 1

    def flush(self) -> None:
        """Log the failures counted since the last flush (see the class docstring)."""
        ranked = sorted(self._pending.items(), key=lambda item: -sum(item[1].values()))
        for address, counts in ranked[:self.max_itemised]:
            self.log.warning("%d more failed %s from %s in the last %g s (%s)",
                             sum(counts.values()), self.many, address, self.interval_s,
                             _reasons(counts))
        others = Counter(self._untracked)
        for _address, counts in ranked[self.max_itemised:]:
            others.update(counts)
        if others:
            self.log.warning("%d more failed %s from %s other addresses in the last %g s (%s)",
                             sum(others.values()), self.many,
                             max(0, len(ranked) - self.max_itemised) or "untracked",
                             self.interval_s, _reasons(others))
        self._pending = {}
        self._lockouts = set()
        self._untracked = Counter()
        self._immediate = 0
        self._seen_before = self._seen
        self._seen = set()


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
