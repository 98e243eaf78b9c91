"""The two ends of one operation on a connection: :class:`ControllerStream` and
:class:`AgentStream`, with per-stream credit (flow control) and the events a
controller reads."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Deque,
    Dict,
    Generic,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from .frames import DATA_FRAME_TYPES, Frame, encode_frame
from .peer import is_int, peer_text

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger(__name__)


class StreamError(Exception):
    """Sending on a stream that has ended or whose connection is closed.

    ``code`` is ``server_offline`` when the connection is gone, ``cancelled`` after a
    cancel, ``invalid_request`` for misuse (sending after ``eof``/``done``), or the
    code the stream failed with.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Event:
    """One thing that happened on a :class:`ControllerStream`, from ``events()``.

    ``kind`` is ``"out"`` (process output; ``stream`` is ``"stdout"``/``"stderr"``,
    ``body`` the bytes), ``"meta"`` (``size`` and ``mode`` of a file being sent),
    ``"data"`` (``body`` is a chunk of file content), ``"done"`` (``result`` is the
    operation's result object) or ``"fail"`` (``error`` is ``{"code", "message"}``).
    ``done`` and ``fail`` are always last.
    """

    kind: str
    stream: Optional[str] = None
    body: bytes = field(default=b"", repr=False)
    result: Optional[Dict[str, Any]] = None
    error: Optional[Dict[str, str]] = None
    size: Optional[int] = None
    mode: Optional[int] = None


_T = TypeVar("_T")


class _Inbox(Generic[_T]):
    """A FIFO with one consumer and no bound: the part of asyncio.Queue a stream uses.

    Every command opens a stream, and asyncio.Queue's constructor (two deques and an
    Event) showed up at about 6% of a gateway's CPU when it was answering pings. Flow
    control bounds what arrives here, not the inbox.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: Deque[_T] = deque()
        self._waiter: Optional[asyncio.Future[None]] = None

    def put_nowait(self, item: _T) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> _T:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> _T:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                # Cancelled while waiting: nothing was taken, so nothing is lost.
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()


class _Stream:
    """State common to both ends of a stream: credit for sending, accounting for receiving."""

    def __init__(self, conn: Connection, stream_id: int, op: str, args: Dict[str, Any]) -> None:
        self.conn = conn
        self.id = stream_id
        self.op = op
        self.args = args
        self._credit = conn.peer_window
        # Made on first wait: most streams (ping, info, exec without much output) never wait.
        self._credit_event: Optional[asyncio.Event] = None
        self._recv_unacked = 0  # received body bytes not yet granted back
        self._consumed = 0  # consumed body bytes not yet granted back
        self._ended = False
        self._end_error: Optional[Tuple[str, str]] = None

    @property
    def ended(self) -> bool:
        """True once the stream finished (done, fail, cancel or connection closed)."""
        return self._ended

    def _check_sendable(self) -> None:
        if self.conn._closing:
            raise StreamError("server_offline", self.conn.close_reason or "connection closed")
        if self._ended:
            code, message = self._end_error or ("invalid_request", "stream already ended")
            raise StreamError(code, message)

    async def _wait_credit(self) -> None:
        while True:
            self._check_sendable()
            if self._credit > 0:
                return
            if self._credit_event is None:
                self._credit_event = asyncio.Event()
            self._credit_event.clear()
            await self._credit_event.wait()

    def _add_credit(self, n: int) -> None:
        # Capped at the announced window: a peer granting more than it received must
        # not make us queue unbounded data for it.
        self._credit = min(self._credit + n, self.conn.peer_window)
        if self._credit_event is not None:
            self._credit_event.set()

    async def _send_body(
        self, header: Dict[str, Any], data: Union[bytes, bytearray, memoryview]
    ) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        offset = 0
        total = len(view)
        while offset < total:
            await self._wait_credit()
            n = min(total - offset, self.conn.peer_max_body, self._credit)
            self._credit -= n
            self.conn._enqueue_data(self.id, encode_frame(header, view[offset : offset + n]), n)
            offset += n

    def _mark_ended(self, code: Optional[str], message: str) -> None:
        self._ended = True
        if code is not None:
            self._end_error = (code, message)
        self.conn._streams.pop(self.id, None)
        if self._credit_event is not None:
            self._credit_event.set()  # wake senders so they raise StreamError


class ControllerStream(_Stream):
    """The controller's end of one operation; made by :meth:`Connection.open_stream`.

    Send request data with :meth:`send` / :meth:`send_eof` (for ``put``), read what
    the agent sends with :meth:`events` (one consumer), stop it with :meth:`cancel`.
    """

    def __init__(self, conn: Connection, stream_id: int, op: str, args: Dict[str, Any]) -> None:
        super().__init__(conn, stream_id, op, args)
        self._inbox: _Inbox[Event] = _Inbox()
        self._eof_sent = False
        self._got_meta = False
        self._finished = False  # the consumer has taken done/fail

    async def send(self, body: Union[bytes, bytearray, memoryview]) -> None:
        """Send ``body`` as ``data`` frames, split to the agent's ``max_body``.

        Waits while the agent has a full window of our bytes unconsumed, so a slow
        agent slows the caller down instead of growing a buffer. Raises
        :class:`StreamError` if the stream ended (the agent finished or failed, the
        stream was cancelled, the connection closed) or after :meth:`send_eof`.
        """
        if self._eof_sent:
            raise StreamError("invalid_request", "data after eof")
        await self._send_body({"t": "data", "s": self.id}, body)

    async def send_eof(self) -> None:
        """Mark the end of the request data; sent after every queued data frame."""
        self._check_sendable()
        if not self._eof_sent:
            self._eof_sent = True
            self.conn._enqueue_ordered(self.id, encode_frame({"t": "eof", "s": self.id}))

    async def events(self) -> AsyncIterator[Event]:
        """Yield the agent's events in order, ending after ``done`` or ``fail``.

        Taking a ``data``/``out`` event gives its bytes back to the agent as credit.
        If the connection closes, a ``fail`` event with code ``server_offline``
        arrives at once, so iterating never hangs on a dead agent. Only one task may
        iterate.
        """
        while not self._finished:
            yield await self.next_event()

    async def next_event(self) -> Event:
        """The next event, as :meth:`events` yields them, without an async generator.

        A generator left at ``done`` is finalized later by the event loop (a wake-up
        and a task for every command); a caller that stops at ``done`` uses this.
        Raises :class:`StreamError` once ``done`` or ``fail`` was taken.
        """
        if self._finished:
            raise StreamError("invalid_request", "the final event was already taken")
        event = await self._inbox.get()
        if event.kind in DATA_FRAME_TYPES:
            self.conn._consumed(self, len(event.body))
        elif event.kind in ("done", "fail"):
            self._finished = True
        return event

    async def final(self) -> Event:
        """Wait for the ``done`` or ``fail`` event and return it, dropping any before it.

        The cheap way to await an operation whose output nobody reads (ping, info):
        no async generator per call. Dropped ``data``/``out`` bytes are given back as
        credit like taken ones. Only one task may wait, and not beside :meth:`events`.
        """
        while True:
            event = await self.next_event()
            if event.kind in ("done", "fail"):
                return event

    def cancel(self) -> None:
        """Cancel the operation: the agent cancels its handler.

        The stream ends here at once with a ``fail`` event (code ``cancelled``); any
        late frames the agent sends for it are ignored. No-op if already ended.
        """
        if self._ended:
            return
        self.conn._drop_data(self.id)
        if not self.conn._closing:
            self.conn._enqueue_control(encode_frame({"t": "cancel", "s": self.id}))
        self._drain_inbox()
        self._finish_with(
            Event("fail", error={"code": "cancelled", "message": "cancelled by the controller"})
        )

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            event = self._inbox.get_nowait()
            self.conn._unbuffer(len(event.body))

    def _finish_with(self, event: Event) -> None:
        error = event.error or {}
        if event.kind == "fail":
            self._mark_ended(error.get("code", "internal"), error.get("message", ""))
        else:
            self._mark_ended("invalid_request", "stream already ended")
        self._inbox.put_nowait(event)

    # -- called by the connection's reader

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        h = frame.header
        if t in DATA_FRAME_TYPES:
            if not frame.body:
                return  # empty chunks cost no credit; dropping them bounds the inbox
            self.conn._account_received(self, len(frame.body))
            name = h.get("stream") if t == "out" else None
            self._inbox.put_nowait(
                Event(t, stream=peer_text(name, "stdout") if t == "out" else None, body=frame.body)
            )
        elif t == "meta":
            if self._got_meta:
                return  # one per stream; more would be an unbounded queue
            self._got_meta = True
            size, mode = h.get("size"), h.get("mode")
            self._inbox.put_nowait(
                Event(
                    "meta",
                    size=size if is_int(size) else None,
                    mode=mode if is_int(mode) else None,
                )
            )
        elif t == "done":
            result = h.get("result", {})
            if isinstance(result, dict):
                self._finish_with(Event("done", result=result))
            else:
                self._finish_with(
                    Event(
                        "fail",
                        error={"code": "internal", "message": "agent sent a malformed result"},
                    )
                )
        elif t == "fail":
            error = h.get("error")
            error = error if isinstance(error, dict) else {}
            self._finish_with(
                Event(
                    "fail",
                    error={
                        "code": peer_text(error.get("code"), "internal"),
                        "message": peer_text(error.get("message"), "operation failed"),
                    },
                )
            )
        # anything else (e.g. a future frame type) is ignored

    def _connection_closed(self, reason: str) -> None:
        if not self._ended:
            self._finish_with(Event("fail", error={"code": "server_offline", "message": reason}))


class AgentStream(_Stream):
    """The agent's end of one operation, handed to the connection's ``on_open`` callback.

    ``op`` and ``args`` are what the controller asked for. Send with
    :meth:`send_out` / :meth:`send_meta` / :meth:`send_data`, read uploaded data with
    :meth:`data`, finish with :meth:`done` or :meth:`fail` (or just return from the
    callback: see :class:`Connection`).
    """

    def __init__(
        self,
        conn: Connection,
        stream_id: int,
        op: str,
        args: Dict[str, Any],
        header: Dict[str, Any],
    ) -> None:
        super().__init__(conn, stream_id, op, args)
        self.header = header
        """The raw ``open`` header, for fields a later revision may add."""
        self._inbox: _Inbox[Optional[bytes]] = _Inbox()
        self._eof = False  # eof frame received
        self._eof_taken = False  # data() reached it
        self._cancel_requested = False
        self._task: Optional[asyncio.Task[None]] = None

    @property
    def cancelled(self) -> bool:
        """True once the controller sent ``cancel`` for this stream."""
        return self._cancel_requested

    async def send_out(self, stream_name: str, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send process output (``stream_name`` is ``"stdout"`` or ``"stderr"``).

        Split into frames of at most the controller's ``max_body``; waits for credit
        when the controller has a full window unconsumed.
        """
        if stream_name not in ("stdout", "stderr"):
            raise ValueError('stream_name must be "stdout" or "stderr"')
        await self._send_body({"t": "out", "s": self.id, "stream": stream_name}, data)

    async def send_meta(self, size: int, mode: Optional[int] = None) -> None:
        """Announce the size and permission bits of the file about to be sent (``get``)."""
        self._check_sendable()
        self.conn._enqueue_ordered(
            self.id, encode_frame({"t": "meta", "s": self.id, "size": size, "mode": mode})
        )

    async def send_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send file content as ``data`` frames; flow-controlled like :meth:`send_out`."""
        await self._send_body({"t": "data", "s": self.id}, data)

    async def data(self) -> AsyncIterator[bytes]:
        """Yield the chunks the controller sends, until its ``eof``.

        Taking a chunk gives its bytes back to the controller as credit, so reading
        slowly throttles the sender. Only one task may iterate.
        """
        while not self._eof_taken:
            chunk = await self._inbox.get()
            if chunk is None:
                self._eof_taken = True
                return
            self.conn._consumed(self, len(chunk))
            yield chunk

    async def done(self, result: Optional[Dict[str, Any]] = None) -> None:
        """Finish successfully with ``result``; sent after all queued output."""
        self._end({"t": "done", "s": self.id, "result": result or {}})

    async def fail(self, code: str, message: str) -> None:
        """Finish with an error (``code`` from the bus error codes); sent after queued output."""
        self._end({"t": "fail", "s": self.id, "error": {"code": code, "message": message}})

    def _end(self, header: Dict[str, Any]) -> None:
        self._check_sendable()
        frame = encode_frame(header)
        self._mark_ended("invalid_request", "stream already ended")
        self._drain_inbox()
        self._inbox.put_nowait(None)  # a data() still iterating ends instead of hanging
        self.conn._enqueue_ordered(self.id, frame)

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            chunk = self._inbox.get_nowait()
            if chunk is not None:
                self.conn._unbuffer(len(chunk))

    # -- called by the connection's reader

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t == "data":
            if not frame.body or self._eof:
                return
            self.conn._account_received(self, len(frame.body))
            self._inbox.put_nowait(frame.body)
        elif t == "eof":
            if not self._eof:
                self._eof = True
                self._inbox.put_nowait(None)
        elif t == "cancel":
            self._cancel_requested = True
            self.conn._drop_data(self.id)
            if self._task is not None and not self._task.done():
                self._task.cancel()

    def _connection_closed(self, reason: str) -> None:
        if not self._ended:
            self._mark_ended("server_offline", reason)
        if (
            self._task is not None
            and not self._task.done()
            and self._task is not asyncio.current_task()
        ):
            self._task.cancel()
