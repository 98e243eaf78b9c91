"""Admission: how much work a worker takes on before it says ``busy``.

nats-server drops a client as a *slow consumer* when it falls behind reading its
socket, and with it every subscription, in-flight reply and audit acknowledgement of
that process. A worker falls behind when it spends its time on requests instead of on
reading: a burst of 1 MB bodies costs milliseconds of parsing each (more than the
network takes to deliver them), so the read loop, which shares the event loop with
the parsing, reads a little between parses and the rest piles up in nats-server.

So a request is weighed before any work is done on it, straight from nats-py's read
loop (``dispatch.py``): its size against the request limit, then its bytes and count
against what this worker holds *admitted but not yet running* (waiting to be parsed,
parsed and waiting for its id claim or a concurrency slot). Beyond that bound the
request is answered ``busy`` at once, which costs a small reply and no parsing. The
bound is shared fairly among requesters: each may hold at most
``1/(n+1)`` of it, ``n`` being how many hold some, so there is always room for one
more; a requester holding nothing may always send one request, whatever its size.

A *requester* is the reply subject without its last token: nats clients make every
reply subject of one connection from one inbox prefix (``_INBOX.<nuid>.<token>``), so
this tells connections apart without reading the body (a reply subject of one or two
tokens counts whole). It is a proxy: a requester that makes up a new prefix per
request counts as many requesters (each may then hold one request), which loses it
its fairness, not the bound. Requests without a reply subject share one requester,
``""``. A request that crossed a service import from a user's account has a reply
subject nats-server made (``_R_.<account>.<token>``, one prefix for every user), so
there the requester is the identity NATS authenticated instead (subjects.Identity).

Large bodies are parsed one at a time, requesters taking turns, and parsing takes at
most ``parse_share`` of the event loop's time: after a parse of ``t`` seconds the next
large one waits ``t * (1 - share) / share``, time the read loop uses to catch up. And
while the process is reading behind (more than a request's worth of bytes delivered
and not yet read: ``behind()``), a turn waits for it to catch up, up to
:data:`MAX_DEFER_S`, so reading comes first and parsing never stops altogether. The
queue this builds is what the bound above caps. Small bodies (most commands) are not
paced; they cost microseconds to parse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .limits import MAX_REQUEST_BYTES
from .subjects import Identity

log = logging.getLogger("fleetbus.admission")

# One line per interval while shedding, not one per request: a flood must not become
# a flood of log lines.
REPORT_EVERY_S = 10.0
# While reading is behind, a parse turn waits up to this, checking every DEFER_STEP_S.
MAX_DEFER_S = 0.2
DEFER_STEP_S = 0.002


@dataclass(frozen=True)
class AdmissionSettings:
    """The bound on work a worker holds admitted but not yet running."""

    #: Requests held at once (parsing, waiting for a parse turn, a claim or a slot).
    max_waiting: int = 4096
    #: The body bytes of those requests.
    max_waiting_bytes: int = 64 * 1024 * 1024
    #: Bodies from this size on are parsed one at a time, paced by ``parse_share``.
    large_body_bytes: int = 64 * 1024
    #: The most of the event loop's time that parsing large bodies may take.
    parse_share: float = 0.5

    def __post_init__(self) -> None:
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        if self.max_waiting_bytes < MAX_REQUEST_BYTES:
            raise ValueError(f"max_waiting_bytes must be at least one request ({MAX_REQUEST_BYTES})")
        if self.large_body_bytes < 1:
            raise ValueError("large_body_bytes must be at least 1")
        if not 0.05 <= self.parse_share <= 1.0:
            raise ValueError("parse_share must be between 0.05 and 1")


def requester_of(reply: str, identity: Identity | None = None) -> str:
    """Who is asking, as far as fairness goes: a user's verified identity, else the
    reply subject without its last token, or the whole of a subject of one or two
    tokens (a client's old-style unique inbox per request, ``_INBOX.<nuid>``, must not
    share one requester with every other)."""
    if identity is not None and not identity.is_owner:
        # "id:" keeps these apart from inbox prefixes (which never start so).
        return "id:" + identity.key
    head = reply.rpartition(".")[0]
    return head if "." in head else reply


class Ticket:
    """One admitted request's share of the bound, held until it runs or ends."""

    __slots__ = ("_admission", "large", "requester", "size")

    def __init__(self, admission: Admission, requester: str, size: int) -> None:
        self._admission: Admission | None = admission
        self.requester = requester
        self.size = size
        self.large = size >= admission.settings.large_body_bytes

    def release(self) -> None:
        """Give the share back (the request started running, or ended); idempotent."""
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self)


class Admission:
    """The per-worker bound of :class:`AdmissionSettings`, shared fairly by requesters."""

    def __init__(self, settings: AdmissionSettings | None = None,
                 behind: Callable[[], bool] = lambda: False) -> None:
        """``behind()`` says whether the process is reading behind what NATS delivers."""
        self.settings = settings or AdmissionSettings()
        self.waiting = 0
        self.waiting_bytes = 0
        # requester -> [requests, bytes] it holds; only requesters holding some.
        self._held: dict[str, list[int]] = {}
        # What requesters already holding work leave free for those holding none: shares
        # are fixed as each joins (1/2 + 1/3 + 1/4 ... exceed the bound), so without a
        # reserve a few greedy requesters could fill it and shut everyone new out.
        s = self.settings
        self._holders_max = s.max_waiting - max(1, s.max_waiting // 8)
        self._holders_max_bytes = s.max_waiting_bytes - min(
            s.max_waiting_bytes, max(MAX_REQUEST_BYTES, s.max_waiting_bytes // 8))
        self._turns = _ParseTurns(self.settings.parse_share, behind)

    @property
    def requesters(self) -> int:
        """How many requesters hold admitted requests."""
        return len(self._held)

    def admit(self, requester: str, size: int) -> Ticket | None:
        """A ticket for a request of ``size`` bytes, or None: answer it ``busy``."""
        s = self.settings
        if self.waiting >= s.max_waiting or self.waiting_bytes + size > s.max_waiting_bytes:
            return None
        held = self._held.get(requester)
        if held is not None:
            # Room for every current holder's share and one newcomer's.
            shares = len(self._held) + 1
            if held[0] + 1 > s.max_waiting // shares or held[1] + size > s.max_waiting_bytes // shares:
                return None
            if self.waiting + 1 > self._holders_max or self.waiting_bytes + size > self._holders_max_bytes:
                return None
            held[0] += 1
            held[1] += size
        else:
            self._held[requester] = [1, size]
        self.waiting += 1
        self.waiting_bytes += size
        return Ticket(self, requester, size)

    def parse_turn(self, ticket: Ticket) -> _Turn:
        """``async with admission.parse_turn(ticket)``: around parsing the ticket's body.

        A small body goes at once; a large one waits for its turn (see the module)."""
        return _Turn(self._turns if ticket.large else None, ticket.requester)

    def _release(self, ticket: Ticket) -> None:
        self.waiting -= 1
        self.waiting_bytes -= ticket.size
        held = self._held.get(ticket.requester)
        if held is not None:
            held[0] -= 1
            held[1] -= ticket.size
            if held[0] <= 0:
                del self._held[ticket.requester]


class _Turn:
    """The async context manager :meth:`Admission.parse_turn` returns."""

    __slots__ = ("_requester", "_started", "_turns")

    def __init__(self, turns: _ParseTurns | None, requester: str) -> None:
        self._turns = turns
        self._requester = requester
        self._started = 0.0

    async def __aenter__(self) -> None:
        if self._turns is not None:
            await self._turns.acquire(self._requester)
            self._started = time.perf_counter()

    async def __aexit__(self, *exc: object) -> None:
        if self._turns is not None:
            self._turns.release(time.perf_counter() - self._started)


class _ParseTurns:
    """One holder at a time; waiting requesters served round robin; a pause after each
    turn so that turns take at most ``share`` of the time; no turn while reading is
    behind, for up to :data:`MAX_DEFER_S`."""

    def __init__(self, share: float, behind: Callable[[], bool]) -> None:
        self._rest_per_s = (1.0 - share) / share
        self._behind = behind
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}  # in turn order
        self._held = False
        self._resume_at = 0.0  # loop time before which no turn starts
        self._deferred_since: float | None = None  # when turns began waiting for reading
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, requester: str) -> None:
        loop = asyncio.get_running_loop()
        if (not self._held and not self._waiting and loop.time() >= self._resume_at
                and not self._behind()):
            self._held = True  # free: no await, no loop turn
            return
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.setdefault(requester, deque()).append(turn)
        self._schedule()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release(0.0)  # granted as we were cancelled: pass it on
            else:
                queue = self._waiting.get(requester)
                if queue is not None and turn in queue:
                    queue.remove(turn)
                    if not queue:
                        del self._waiting[requester]
            raise

    def release(self, used_s: float) -> None:
        self._held = False
        self._resume_at = asyncio.get_running_loop().time() + used_s * self._rest_per_s
        self._schedule()

    def _schedule(self) -> None:
        if self._held or not self._waiting or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        delay = self._resume_at - loop.time()
        if delay > 0:
            self._timer = loop.call_later(delay, self._grant)
        else:
            self._grant()

    def _grant(self) -> None:
        self._timer = None
        if self._held or not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._behind():
            if self._deferred_since is None:
                self._deferred_since = now
            if now - self._deferred_since < MAX_DEFER_S:
                self._timer = loop.call_later(DEFER_STEP_S, self._grant)
                return
        self._deferred_since = None
        while not self._held and self._waiting:
            requester, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            del self._waiting[requester]
            if queue:
                self._waiting[requester] = queue  # to the back: the next requester goes next
            if not turn.done():
                self._held = True
                turn.set_result(None)


class ShedReport:
    """Counts requests answered ``busy`` or ``too_large`` before being read, and logs
    them in aggregate: the first at once, then one line per :data:`REPORT_EVERY_S`."""

    def __init__(self, count: Callable[[str], Any]) -> None:
        self._count = count  # metrics: the shed counter's inc, by reason
        self._reasons: dict[str, int] = {}
        self._requesters: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, requester: str) -> None:
        self._count(reason)
        if self._timer is None:
            log.warning("shedding load: a request from %s was answered %s without being read "
                        "(further ones are summed up every %g s)", requester or "-", reason,
                        REPORT_EVERY_S)
            self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY_S, self._report)
            return
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        if len(self._requesters) < 1000 or requester in self._requesters:
            self._requesters[requester] = self._requesters.get(requester, 0) + 1

    def _report(self) -> None:
        self._timer = None
        if not self._reasons:
            return  # quiet: the next shed request is logged at once again
        total = sum(self._reasons.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self._reasons.items()))
        top, top_n = max(self._requesters.items(), key=lambda kv: kv[1])
        log.warning("shed %d requests in the last %g s (%s) from %d requesters; most from %s (%d)",
                    total, REPORT_EVERY_S, reasons, len(self._requesters), top or "-", top_n)
        self._reasons.clear()
        self._requesters.clear()
        self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY_S, self._report)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
