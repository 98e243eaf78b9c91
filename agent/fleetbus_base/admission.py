"""Admission before authentication: which connections a listener takes, and in what order.

Used by the gateway (outbound agents dial it) and by ``fleetbus-agent listen``: both
face peers that have proved nothing yet. :class:`Gate` accepts from a listening socket
by hand and holds each connection as a plain socket, with no TLS state, until a
handshake slot is free (:class:`HandshakeSlots`). What it bounds, and why:

- **Slots** (``max_handshakes``): handshakes at once. Thousands of agents dialling at
  once (a gateway restart) all miss their deadlines if they all run together.
- **Fair order**: the next free slot goes to the source address served least recently,
  and within one address to its newest connection. A flood from one address then
  costs another address's agent one slot's wait, not a place behind the flood; and
  under a reconnect storm the newest connection is the one whose agent has not given
  up yet (an agent abandons a connect after 10 s and dials again).
- **Unauthenticated connections held**: per source address (``max_per_source``) and in
  total (``max_unauthenticated``). Past a cap the newcomer evicts the oldest connection
  still waiting (not yet in its handshake): past the per-address cap, one of its own
  address; past the total, one of the heaviest address when that holds more than the
  newcomer's, so a new address always gets a place.
- **Silent peers take no slot**: a connection waits for a slot only once it has sent
  something (a real client sends its TLS hello as soon as it connects); one that sends
  nothing within ``silent_s`` is dropped, as is one whose peer hung up while waiting.
- **One deadline** (``handshake_timeout_s``) for TLS and the hello together, and a
  bounded wait for a slot (``wait_s``).
- **Descriptors** (:class:`.fdbudget.FdBudget`): past the budget it sheds as above, and
  when the reserve itself is reached it stops accepting (the kernel's backlog costs
  this process nothing) until descriptors are free again.

The caller provides ``handshake(sock, source, deadline)``, run while a slot is held,
which returns what ``serve`` needs or None (having closed the socket), and
``serve(result)``, run after the slot is released.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Deque, Dict, Generic, Optional, Set, TypeVar

from .fdbudget import RESERVE_FRACTION, RESERVE_MIN, FdBudget

T = TypeVar("T")

ACCEPT_BATCH = 128
"""Connections accepted per wake-up of the listening socket at most."""
PAUSE_S = 0.1
"""How soon to look again after the process ran short of descriptors or memory."""
SHED_MARGIN = 64
"""Descriptors of room below which the gate sheds instead of holding more."""
SERVED_MEMORY = 4096
"""Source addresses whose last turn is remembered (the rest count as never served)."""
_ACCEPT_LATER = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TCP_ESTABLISHED = 1


@dataclass
class GateSettings:
    """Limits on connections that have not authenticated yet (see the module docstring)."""

    max_handshakes: int = 64
    max_unauthenticated: int = 8192
    max_per_source: int = 8192
    handshake_timeout_s: float = 5.0
    wait_s: float = 5.0
    silent_s: float = 5.0
    fd_reserve_min: int = RESERVE_MIN
    fd_reserve_fraction: float = RESERVE_FRACTION

    def __post_init__(self) -> None:
        for name in ("max_handshakes", "max_unauthenticated", "max_per_source"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
            setattr(self, name, int(getattr(self, name)))
        for name in ("handshake_timeout_s", "wait_s", "silent_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be more than 0")
            setattr(self, name, float(getattr(self, name)))


class HandshakeSlots:
    """At most ``limit`` handshakes at once; the next slot goes to the least recently
    served source, and to that source's newest waiting connection.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting = 0
        """Connections waiting for a slot right now."""
        self._queues: Dict[str, Deque[asyncio.Future[str]]] = {}
        self._served: OrderedDict[str, int] = OrderedDict()
        self._turn = 0

    async def acquire(self, max_wait: float, source: str = "") -> bool:
        """Take a slot (True) or give up after ``max_wait`` seconds (False)."""
        return await self.take(max_wait, source) == ""

    async def take(self, max_wait: float, source: str = "") -> str:
        """Take a slot: "" when granted, else why not ("waited")."""
        # A slot is only ever free while no live waiter is left, so a free one is taken
        # at once: nobody is overtaken.
        if self.active < self.limit:
            self.active += 1
            self._note_served(source)
            return ""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = deque()
        # Timed-out waiters are the oldest, at the left end: dropped here, in O(1) each.
        while queue and queue[0].done():
            queue.popleft()
        queue.append(fut)
        self.waiting += 1
        timer = loop.call_later(max_wait, _resolve, fut, "waited")
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result() == "":
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise
        finally:
            timer.cancel()
            self.waiting -= 1

    def release(self) -> None:
        """Give the slot to the next waiting connection (see the class docstring), or free it."""
        while self._queues:
            source = min(self._queues, key=self._last_turn)
            queue = self._queues[source]
            while queue:
                fut = queue.pop()
                if not fut.done():
                    fut.set_result("")
                    self._note_served(source)
                    if not queue:
                        del self._queues[source]
                    return
            del self._queues[source]
        self.active -= 1

    def _last_turn(self, source: str) -> int:
        return self._served.get(source, 0)

    def _note_served(self, source: str) -> None:
        self._turn += 1
        self._served[source] = self._turn
        self._served.move_to_end(source)
        if len(self._served) > SERVED_MEMORY:
            self._served.popitem(last=False)


def _resolve(fut: asyncio.Future[str], value: str) -> None:
    if not fut.done():
        fut.set_result(value)


def _peer_gone(sock: socket.socket) -> bool:
    """True when the peer already closed or reset the connection (Linux; else False)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0] != _TCP_ESTABLISHED
    except OSError:
        return False


def _peek(sock: socket.socket) -> Optional[bool]:
    """True when the peer sent something, False when it hung up, None when nothing yet."""
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False


def source_of(peer: Any) -> str:
    """The source address of a peername (the throttling and fairness unit)."""
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return "?"


class Gate(Generic[T]):
    """Accepts connections from ``listener`` and admits them (see the module docstring).

    ``dropped(reason)`` is told of each connection dropped before its handshake:
    "source_cap", "shed", "waited", "gone", "silent". ``source_cap(source)`` may lower
    the per-source cap for one address (e.g. one that keeps failing to authenticate).
    """

    def __init__(self, listener: socket.socket, settings: GateSettings,
                 handshake: Callable[[socket.socket, str, float], Awaitable[Optional[T]]],
                 serve: Callable[[T], Awaitable[None]], *,
                 log: logging.Logger,
                 dropped: Callable[[str], None] = lambda reason: None,
                 source_cap: Optional[Callable[[str], int]] = None,
                 budget: Optional[FdBudget] = None) -> None:
        self.listener = listener
        self.settings = settings
        self.slots = HandshakeSlots(settings.max_handshakes)
        self.budget = budget or FdBudget(settings.fd_reserve_min, settings.fd_reserve_fraction)
        self._handshake = handshake
        self._serve = serve
        self._log = log
        self._dropped = dropped
        self._source_cap = source_cap
        self._held: Dict[str, int] = {}
        # Per source, its connections not yet given a slot, oldest first (task -> socket):
        # the ones a newcomer may evict.
        self._waiting: Dict[str, Dict[asyncio.Task[Any], socket.socket]] = {}
        self._evicted: Set[asyncio.Task[Any]] = set()
        self._started: Set[asyncio.Task[Any]] = set()
        self.unauthenticated = 0
        """Connections accepted and not yet through their handshake."""
        self.accepted = 0
        """Connections accepted since start (shed ones too)."""
        self.paused = False
        """True while the gate does not accept (descriptors or memory short)."""
        self._resume_timer: Optional[asyncio.TimerHandle] = None
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def waiting(self) -> int:
        """Connections waiting for a handshake slot."""
        return self.slots.waiting

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.listener.fileno(), self._ready)

    async def aclose(self) -> None:
        """Stop accepting, close the listening socket, end every handshake and service."""
        if self._loop is not None and not self.paused:
            self._loop.remove_reader(self.listener.fileno())
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self.paused = True
        self.listener.close()
        for waiting in self._waiting.values():
            for task, conn in waiting.items():
                if task not in self._started:
                    conn.close()  # its task is cancelled below before it ever runs
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # accepting ------------------------------------------------------------------------
    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            room = self.budget.room(self.unauthenticated)
            if room <= 0:
                self._pause("the process is near its descriptor limit "
                            f"({self.budget.limit}, {self.budget.reserve} kept in reserve)")
                return
            try:
                conn, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_LATER:
                    self._pause(exc.strerror or str(exc))
                    return
                continue  # that one connection failed (ECONNABORTED and the like)
            self.budget.took()
            self.accepted += 1
            conn.setblocking(False)
            self._take(conn, source_of(peer), room)

    def _take(self, conn: socket.socket, source: str, room: int) -> None:
        cap = self.settings.max_per_source
        if self._source_cap is not None:
            cap = min(cap, self._source_cap(source))
        # Over a cap, the newest connection replaces the oldest waiting one rather than
        # being refused: the oldest is the closest to being given up by its agent, and a
        # refusal at once would only send an agent into longer and longer backoff (in a
        # 5,000-agent reconnect storm from one address, refusing doubled the time to
        # settle).
        if self._held.get(source, 0) >= cap and not self._evict(source, "source_cap"):
            self._refuse(conn, "source_cap")
            return
        if self.unauthenticated >= self.settings.max_unauthenticated or room <= SHED_MARGIN:
            held = self._held.get(source, 0)
            heaviest = max(self._waiting, key=lambda s: self._held.get(s, 0), default=None)
            if heaviest is None or self._held.get(heaviest, 0) <= held + 1:
                heaviest = source  # none heavier: only its own oldest may go
            if not self._evict(heaviest, "shed"):
                self._refuse(conn, "shed")
                return
        self._held[source] = self._held.get(source, 0) + 1
        self.unauthenticated += 1
        assert self._loop is not None
        task = self._loop.create_task(self._run(conn, source, time.monotonic()))
        self._waiting.setdefault(source, {})[task] = conn
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _evict(self, source: str, reason: str) -> bool:
        """Turn away ``source``'s oldest connection still waiting; False if it has none."""
        waiting = self._waiting.get(source)
        if not waiting:
            return False
        task, conn = next(iter(waiting.items()))
        self._not_waiting(source, task)
        self._dropped(reason)
        self._evicted.add(task)
        self._give_back(source)  # its place is the newcomer's now, not when it has ended
        if task.cancel() and task not in self._started:
            # Accepted in this same batch: cancelled before its first step, its code never
            # runs, so its socket is closed here. (A started one closes its own, after
            # it has stopped watching the descriptor.)
            conn.close()
        return True

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._evicted.discard(task)
        # Nobody awaits these tasks: a bug in a handshake or serve step is said here, once.
        if not task.cancelled() and task.exception() is not None:
            self._log.error("serving a connection failed", exc_info=task.exception())

    def _give_back(self, source: str, closed: bool = True) -> None:
        """``source`` holds one unauthenticated connection less (``closed``: its descriptor too)."""
        left = self._held.get(source, 1) - 1
        if left:
            self._held[source] = left
        else:
            self._held.pop(source, None)
        self.unauthenticated -= 1
        if closed:
            self.budget.took(-1)

    def _not_waiting(self, source: str, task: Optional[asyncio.Task[Any]]) -> None:
        waiting = self._waiting.get(source)
        if waiting is not None and task is not None:
            waiting.pop(task, None)
            if not waiting:
                del self._waiting[source]

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        self._dropped(reason)
        conn.close()
        self.budget.took(-1)

    def _pause(self, why: str) -> None:
        if not self.paused:
            self._log.warning("not accepting connections for now: %s", why)
            assert self._loop is not None
            self._loop.remove_reader(self.listener.fileno())
            self.paused = True
        self.budget.resample()
        assert self._loop is not None
        self._resume_timer = self._loop.call_later(PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._resume_timer = None
        if self.listener.fileno() < 0:
            return  # closed meanwhile
        if self.budget.room(self.unauthenticated) <= SHED_MARGIN // 2:
            self._resume_timer = asyncio.get_running_loop().call_later(PAUSE_S, self._resume)
            return
        self.paused = False
        self._log.info("accepting connections again")
        asyncio.get_running_loop().add_reader(self.listener.fileno(), self._ready)

    # one connection ---------------------------------------------------------------------
    async def _run(self, conn: socket.socket, source: str, accepted_at: float) -> None:
        result: Optional[T] = None
        task = asyncio.current_task()
        self._started.add(task)
        try:
            refusal = await self._first_byte(conn, accepted_at)
            if not refusal:
                refusal = await self.slots.take(self.settings.wait_s, source)
            self._not_waiting(source, task)
            if refusal:
                self._dropped(refusal)
                conn.close()
                return
            try:
                if _peer_gone(conn):
                    # It gave up while waiting for a slot (its connect timed out): a
                    # handshake would cost the key exchange and fail anyway.
                    self._dropped("gone")
                    conn.close()
                    return
                deadline = time.monotonic() + self.settings.handshake_timeout_s
                result = await self._handshake(conn, source, deadline)
            finally:
                self.slots.release()
        except BaseException:
            conn.close()  # cancelled (stopping) or a bug: no half-open peer
            raise
        finally:  # closed, or through its handshake: no longer unauthenticated
            self._not_waiting(source, task)
            self._started.discard(task)
            if task not in self._evicted:  # else its place was given back at eviction
                self._give_back(source, closed=result is None)
        if result is not None:
            await self._serve(result)

    async def _first_byte(self, conn: socket.socket, accepted_at: float) -> str:
        """Wait, without a slot, until the peer sends something: "" then, else why not.

        A real client sends its TLS hello as soon as it is connected; a connection that
        sends nothing within ``silent_s`` never takes a handshake slot from one that did.
        Only readiness is watched here: no byte is read before the handshake.
        """
        sent = _peek(conn)
        if sent is None:
            assert self._loop is not None
            fd = conn.fileno()
            ready: asyncio.Future[str] = self._loop.create_future()
            self._loop.add_reader(fd, _resolve, ready, "")
            wait = max(0.0, self.settings.silent_s - (time.monotonic() - accepted_at))
            timer = self._loop.call_later(wait, _resolve, ready, "silent")
            try:
                if await ready:
                    return "silent"
            finally:
                timer.cancel()
                self._loop.remove_reader(fd)
            sent = _peek(conn)
        if sent is None:
            return "silent"
        return "" if sent else "gone"
