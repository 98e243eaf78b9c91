"""One handshaken connection, for either role: a frame parser fed by the transport (no
reader task), a writer task with a control queue before round-robin data queues, and a
heartbeat timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    List,
    Optional,
    Tuple,
    Union,
)

from .frames import (
    DEFAULT_MAX_BODY,
    DEFAULT_WINDOW,
    STREAM_FRAME_TYPES,
    Frame,
    FrameParser,
    ProtocolError,
    encode_frame,
)
from .handshake import Accepted, Welcome
from .peer import LINGER_S, drop, is_int, peer_text
from .streams import AgentStream, ControllerStream, StreamError, _Stream

log = logging.getLogger(__name__)


DEAD_AFTER_HEARTBEATS = 3
"""A connection with no frame received for this many heartbeat intervals is dead: both
sides up to version 2, the controller from version 3. With the default 10 s interval a
gateway notices a dead or frozen agent within 30 s (plus one timer's lateness)."""

AGENT_PINGS_VERSION = 3
"""From this protocol version the agent keeps an idle link alive and the controller
only listens (see :meth:`Connection._heartbeat`)."""

QUIET_PONG_HEARTBEATS = 4
"""Version 3: the controller answers a heartbeat ping only once it has sent nothing to
that agent for this many intervals. The agent pings every interval it has been silent,
so an idle agent hears a pong about every fifth interval: its proof that the controller
process still runs, at a fifth of the writes of answering every ping."""

AGENT_DEAD_AFTER_HEARTBEATS = 6
"""Version 3: the agent takes the controller for dead after this many intervals with
nothing received. A live controller's silence ends by a pong within
``QUIET_PONG_HEARTBEATS + 1`` intervals (the next ping after its fourth silent interval),
so this leaves one interval of margin. With the default 10 s interval an agent notices a
hung controller within 60 s; a dead host or path is noticed sooner, by the TCP
keepalive and ``TCP_USER_TIMEOUT`` set on the socket (:func:`tune_socket`)."""

KEEPALIVE_PROBES = 3
"""TCP keepalive probes unanswered before the kernel drops an idle link."""


# Control frames up to this size go straight to an idle socket (see Connection._write_now).
_DIRECT_WRITE_MAX = 16 * 1024


ROLES = ("agent", "controller")


# Controls the per-stream grant: credit goes back once this fraction of the window was
# consumed, so a busy stream costs one small window frame per half window.
_GRANT_FRACTION = 2


@dataclass
class ConnectionStats:
    """Counters for metrics and for tests that check memory stays bounded."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    queued_data_bytes: int = 0
    """Body bytes waiting in this side's writer data queues right now."""
    max_queued_data_bytes: int = 0
    buffered_in_bytes: int = 0
    """Received body bytes not yet taken by a consumer right now."""
    max_buffered_in_bytes: int = 0
    pings_sent: int = 0
    """Heartbeat pings this side sent (only when the link was quiet)."""


class _FrameReader(asyncio.Protocol):
    """The transport's protocol once a :class:`Connection` starts: frames are parsed and
    dispatched in the transport's own callback.

    The handshake reads with asyncio's stream reader; after it, a reader task cost a
    loop iteration per received frame (the reader wakes the task, which runs in the
    next iteration), and a command is one frame each way. The stream writer stays in
    use: write-side flow control (``pause_writing``/``resume_writing``, behind
    ``drain()``) and the end of the connection (behind ``wait_closed()``) are passed on
    to the stream protocol the handshake used, so both keep working unchanged.
    """

    def __init__(self, conn: Connection, previous: asyncio.BaseProtocol) -> None:
        self._conn = conn
        self._previous = previous

    def data_received(self, data: bytes) -> None:
        self._conn._data_received(data)

    def eof_received(self) -> Optional[bool]:
        self._conn._eof_received()
        eof_received = getattr(self._previous, "eof_received", None)
        return eof_received() if eof_received is not None else None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._conn._connection_lost(exc)
        self._previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        self._previous.resume_writing()


OnOpen = Callable[[AgentStream], Awaitable[Optional[Dict[str, Any]]]]
"""``async on_open(stream) -> result or None``: runs one operation on the agent."""


class Connection:
    """One handshaken protocol connection, for either role.

    Build it with :meth:`from_welcome` (agent) or :meth:`from_accepted` (controller)
    right after the handshake, or with the constructor. Then :meth:`start` it (or use
    ``async with``), and :meth:`close` it when done; :meth:`wait_closed` returns when
    it closed for any reason, and :attr:`close_reason` says why.

    Controller role: :meth:`open_stream` starts an operation on the agent.

    Agent role: each ``open`` runs ``await on_open(stream)`` in its own task, unless
    ``on_open`` has an ``answer_now(stream)`` method that returns the result dict at
    once (it returns None for operations that need the task, and must not raise). The
    stream is finished for you when the callback does not: a returned dict (or None)
    becomes ``done``; an exception with string ``code`` and ``message`` attributes
    becomes ``fail`` with those; any other exception becomes ``fail`` ``internal``
    (logged here, never sent); a ``cancel`` from the controller cancels the task and
    answers ``fail`` ``cancelled``. When the connection closes every handler task is
    cancelled.

    All methods must be called from the event loop that runs the connection.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        role: str,
        heartbeat_s: float,
        peer_max_body: int,
        peer_window: int,
        max_body: int = DEFAULT_MAX_BODY,
        window: int = DEFAULT_WINDOW,
        on_open: Optional[OnOpen] = None,
        name: Optional[str] = None,
        version: int = 1,
    ) -> None:
        """``max_body``/``window`` are ours (as announced in the handshake),
        ``peer_*`` the other side's; ``name`` is the server name, for messages;
        ``version`` the negotiated protocol version."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if role == "controller" and on_open is not None:
            raise ValueError("only the agent role runs operations (on_open)")
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        self.role = role
        self.name = name
        self.version = version
        self.heartbeat_s = float(heartbeat_s)
        self.max_body = max_body
        self.window = window
        self.peer_max_body = peer_max_body
        self.peer_window = peer_window
        self.stats = ConnectionStats()
        self._reader = reader
        self._writer = writer
        self._on_open = on_open
        self._peer = "agent" if role == "controller" else "controller"
        self._streams: Dict[int, Union[ControllerStream, AgentStream]] = {}
        self._next_id = 1  # controller: next stream id to open
        self._last_open = 0  # agent: highest stream id opened so far
        self._handlers: Dict[int, asyncio.Task[None]] = {}
        # Writer queues. Control frames first, then one data frame per stream in turn.
        self._control: Deque[bytes] = deque()
        self._grants: Dict[int, int] = {}  # coalesced window frames, one per stream
        self._pong: Optional[int] = None  # coalesced: only the latest ping is answered
        self._ping: Optional[int] = None
        self._data: Dict[int, Deque[Tuple[bytes, int]]] = {}
        self._round: Deque[int] = deque()  # stream ids with queued data, in turn order
        self._wake = asyncio.Event()
        self._final: Optional[bytes] = None  # goaway/error to flush before closing
        self._final_sent = asyncio.Event()
        self._tasks: List[asyncio.Task[None]] = []  # the writer task, once started
        self._parser = FrameParser(max_body)
        self._last_rx = time.monotonic()
        self._write_blocked_since: Optional[float] = None
        self._ping_seq = 0
        self._next_ping = 0.0
        self._last_tx = 0.0  # when this side last wrote a frame (version 3's rules use it)
        self._agent_pings = version >= AGENT_PINGS_VERSION
        self._heartbeat_timer: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closing = False
        self._close_reason: Optional[str] = None
        self._close_code: Optional[str] = None
        self._close_task: Optional[asyncio.Task[None]] = None
        self._closed = asyncio.Event()

    @classmethod
    def from_welcome(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        welcome: Welcome,
        on_open: OnOpen,
    ) -> Connection:
        """The agent's connection after :func:`agent_handshake` returned ``welcome``."""
        return cls(
            reader,
            writer,
            role="agent",
            heartbeat_s=welcome.heartbeat_s,
            peer_max_body=welcome.peer_max_body,
            peer_window=welcome.peer_window,
            max_body=welcome.max_body,
            window=welcome.window,
            on_open=on_open,
            name=welcome.server,
            version=welcome.version,
        )

    @classmethod
    def from_accepted(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: Accepted
    ) -> Connection:
        """The controller's connection after :func:`controller_handshake` returned ``accepted``."""
        return cls(
            reader,
            writer,
            role="controller",
            heartbeat_s=accepted.heartbeat_s,
            peer_max_body=accepted.peer_max_body,
            peer_window=accepted.peer_window,
            max_body=accepted.max_body,
            window=accepted.window,
            name=accepted.server,
            version=accepted.version,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start reading, the writer task and the heartbeat timer (once, inside the event loop).

        Frames the handshake's reader already holds are dispatched before this returns.
        """
        if self._tasks or self._closing:
            raise RuntimeError("connection already started or closed")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_rx = self._last_tx = now = time.monotonic()
        label = self.name or "?"
        tune_socket(self._writer.get_extra_info("socket"), self.heartbeat_s, self.dead_after_s)
        self._tasks = [loop.create_task(self._write_loop(), name=f"fleetbus-proto-write-{label}")]
        self._next_ping = now + self.heartbeat_s
        self._heartbeat_timer = loop.call_at(self._next_ping, self._heartbeat)
        self._take_over_reading()

    async def close(
        self, reason: str = "connection closed", code: Optional[str] = None, goaway: bool = False
    ) -> None:
        """Close the connection; safe to call many times and from any task.

        Every open stream fails at once with ``server_offline`` and ``reason`` as its
        message. With ``goaway=True`` the peer is told first (``{"t": "goaway",
        "code": code, "message": reason}``, waited for at most a second) so its
        streams fail with the same message. Returns once the connection is closed;
        cancelling the caller does not stop the close.
        """
        final = None
        if goaway:
            final = encode_frame({"t": "goaway", "code": code or "closing", "message": reason})
        self._begin_close(reason, code, final)
        assert self._close_task is not None
        await asyncio.shield(self._close_task)

    @property
    def closed(self) -> bool:
        """True as soon as closing started (streams have failed; nothing more is sent)."""
        return self._closing

    @property
    def close_reason(self) -> Optional[str]:
        """Why the connection closed (the message streams failed with), or None if open."""
        return self._close_reason

    @property
    def close_code(self) -> Optional[str]:
        """The code given to :meth:`close` or received in the peer's goaway/error, if any."""
        return self._close_code

    async def wait_closed(self) -> None:
        """Return once the connection is fully closed (tasks stopped, socket closed)."""
        await self._closed.wait()

    @property
    def peer_address(self) -> Any:
        """The peer's socket address, as ``writer.get_extra_info("peername")`` gives it."""
        return self._writer.get_extra_info("peername")

    @property
    def open_streams(self) -> int:
        """How many streams are in flight."""
        return len(self._streams)

    async def __aenter__(self) -> Connection:  # noqa: PYI034 - typing.Self is 3.11+, the agent runs on 3.9
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close("connection closed")

    def _begin_close(
        self, reason: str, code: Optional[str], final: Optional[bytes], abort: bool = False
    ) -> None:
        """Synchronous first half of closing: fail streams now, then close in a task.

        ``abort`` skips the polite TLS close for a peer known to be dead, which would
        only sit out the linger time waiting for an answer that never comes.
        """
        if self._close_task is not None:
            return
        self._closing = True
        self._close_reason = reason
        self._close_code = code
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        for stream in list(self._streams.values()):
            stream._connection_closed(reason)
        self._streams.clear()
        # Nothing queued goes out any more, except the final goaway/error frame.
        self._control.clear()
        self._data.clear()
        self._round.clear()
        self._grants.clear()
        self._pong = self._ping = None
        self.stats.queued_data_bytes = 0
        self._final = final
        self._wake.set()
        self._close_task = asyncio.get_running_loop().create_task(
            self._finish_close(abort), name=f"fleetbus-proto-close-{self.name or '?'}"
        )

    async def _finish_close(self, abort: bool) -> None:
        writer_task = self._tasks[0] if self._tasks else None
        if self._final is not None:
            if writer_task is not None and not writer_task.done():
                # A peer that is not reading gets LINGER_S; closing matters more.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._final_sent.wait(), LINGER_S)
            elif writer_task is None:
                try:  # never started: write it directly
                    self._writer.write(self._final)
                    await asyncio.wait_for(self._writer.drain(), LINGER_S)
                except Exception:
                    pass
        for task in self._tasks:
            task.cancel()
        handlers = list(self._handlers.values())
        for task in handlers:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if handlers:
            # Bounded: a handler that swallows cancellation must not block closing.
            await asyncio.wait(handlers, timeout=LINGER_S)
        if abort:
            self._writer.transport.abort()
        else:
            await drop(self._writer)
        self._closed.set()

    # ----------------------------------------------------------------- controller

    def open_stream(self, op: str, args: Optional[Dict[str, Any]] = None) -> ControllerStream:
        """Open a stream running ``op`` (``exec``, ``put``, ``get``, ``info``, ``ping``)
        with ``args`` on the agent (controller role only).

        Raises :class:`StreamError` (``server_offline``) if the connection is closed
        and ValueError if the ``open`` header would exceed the 64 KiB limit.
        """
        if self.role != "controller":
            raise RuntimeError("only the controller opens streams")
        if self._closing:
            raise StreamError("server_offline", self._close_reason or "connection closed")
        args = dict(args or {})
        stream_id = self._next_id
        frame = encode_frame({"t": "open", "s": stream_id, "op": op, "args": args})
        self._next_id += 1
        stream = ControllerStream(self, stream_id, op, args)
        self._streams[stream_id] = stream
        self._enqueue_control(frame)
        return stream

    # ---------------------------------------------------------------------- agent

    def _on_open_frame(self, frame: Frame) -> None:
        stream_id = frame.stream
        assert stream_id is not None
        if stream_id <= self._last_open:
            raise ProtocolError("stream ids must increase")
        self._last_open = stream_id
        header = frame.header
        op, args = header.get("op"), header.get("args", {})
        stream = AgentStream(
            self,
            stream_id,
            op if isinstance(op, str) else "",
            args if isinstance(args, dict) else {},
            header,
        )
        self._streams[stream_id] = stream
        if not isinstance(op, str) or not isinstance(args, dict):
            self._finish_stream(
                stream, "fail", "invalid_request", "open needs a string op and an object args"
            )
            return
        if self._on_open is None:
            self._finish_stream(stream, "fail", "invalid_request", "this agent runs no operations")
            return
        answer_now = getattr(self._on_open, "answer_now", None)
        if answer_now is not None:
            # An operation that needs no waiting (ping) is answered here, without a task:
            # creating, running and reaping one was a third of an agent's CPU per ping.
            result = answer_now(stream)
            if result is not None:
                self._finish_stream(stream, "done", result=result)
                return
        task = asyncio.get_running_loop().create_task(
            self._run_handler(stream), name=f"fleetbus-op-{stream_id}-{op[:20]}"
        )
        stream._task = task
        self._handlers[stream_id] = task
        task.add_done_callback(lambda t, st=stream: self._handler_done(t, st))

    def _handler_done(self, task: asyncio.Task[None], stream: AgentStream) -> None:
        self._handlers.pop(stream.id, None)
        if task.cancelled() and stream._cancel_requested:
            # A cancel read with its open (one TCP read) cancels the task before its
            # first step: the handler never ran to answer it, and the stream would stay
            # in the table until the connection closes. Nothing if it was answered.
            self._finish_stream(stream, "fail", "cancelled", "cancelled by the controller")

    async def _run_handler(self, stream: AgentStream) -> None:
        assert self._on_open is not None
        try:
            result = await self._on_open(stream)
        except asyncio.CancelledError:
            if stream._cancel_requested and not self._closing:
                self._finish_stream(stream, "fail", "cancelled", "cancelled by the controller")
                return  # the cancel was ours to handle; the task ends normally
            raise
        except Exception as exc:
            code, message = getattr(exc, "code", None), getattr(exc, "message", None)
            if isinstance(code, str) and isinstance(message, str):
                self._finish_stream(stream, "fail", code, message)
            else:
                # Unexpected: log the traceback here, send nothing revealing.
                log.exception("operation %r on stream %d failed", stream.op, stream.id)
                self._finish_stream(stream, "fail", "internal", "internal error in the agent")
        else:
            if stream._cancel_requested:
                self._finish_stream(stream, "fail", "cancelled", "cancelled by the controller")
            elif isinstance(result, dict) or result is None:
                self._finish_stream(stream, "done", result=result)
            else:
                log.error("operation %r returned %s, not a dict", stream.op, type(result).__name__)
                self._finish_stream(stream, "fail", "internal", "internal error in the agent")

    def _finish_stream(
        self,
        stream: AgentStream,
        kind: str,
        code: str = "",
        message: str = "",
        result: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Send done/fail for a handler that did not; silently skipped if it cannot be sent."""
        if stream.ended or self._closing:
            return
        if kind == "done":
            stream._end({"t": "done", "s": stream.id, "result": result or {}})
        else:
            stream._end({"t": "fail", "s": stream.id, "error": {"code": code, "message": message}})

    # -------------------------------------------------------------- writer queues

    def _enqueue_control(self, frame: bytes) -> None:
        if self._closing:
            return
        if self._write_now(frame):
            return
        self._control.append(frame)
        self._wake.set()

    def _write_now(self, frame: bytes) -> bool:
        """Write ``frame`` at once when nothing waits ahead of it and the socket is idle.

        A command is a control frame each way (open, then done), and waking the writer
        task for each one was a loop iteration per frame on both ends; on a busy gateway
        that is a measurable part of every ping. Queue order is kept: the frame goes out
        directly only when every queue is empty. Larger frames and a socket with unsent
        bytes take the writer task, which waits for the peer and notices a stalled one,
        as does a write that fails here.
        """
        if (
            len(frame) > _DIRECT_WRITE_MAX
            or not self._tasks  # not started: the writer task sends everything in order
            or self._control
            or self._round
            or self._grants
            or self._pong is not None
            or self._ping is not None
        ):
            return False
        transport = self._writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        try:
            self._writer.write(frame)
        except Exception:  # the writer task meets the same error and closes
            return False
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(frame)
        self._last_tx = time.monotonic()
        return True

    def _enqueue_data(self, stream_id: int, frame: bytes, nbytes: int) -> None:
        if self._closing:
            return
        queue = self._data.get(stream_id)
        if queue is None:
            queue = self._data[stream_id] = deque()
            self._round.append(stream_id)
        queue.append((frame, nbytes))
        stats = self.stats
        stats.queued_data_bytes += nbytes
        stats.max_queued_data_bytes = max(stats.max_queued_data_bytes, stats.queued_data_bytes)
        self._wake.set()

    def _enqueue_ordered(self, stream_id: int, frame: bytes) -> None:
        """Queue a stream's control frame (meta/eof/done/fail) after its queued data.

        Control frames normally overtake data; these must not, or ``done`` would
        arrive before the output it ends.
        """
        queue = self._data.get(stream_id)
        if queue:
            queue.append((frame, 0))
            self._wake.set()
        else:
            self._enqueue_control(frame)

    def _drop_data(self, stream_id: int) -> None:
        queue = self._data.pop(stream_id, None)
        if queue:
            self.stats.queued_data_bytes -= sum(n for _, n in queue)
            with contextlib.suppress(ValueError):
                self._round.remove(stream_id)

    def _next_frame(self) -> Optional[bytes]:
        if self._control:
            return self._control.popleft()
        if self._pong is not None:
            frame = encode_frame({"t": "pong", "n": self._pong})
            self._pong = None
            return frame
        if self._grants:
            stream_id = next(iter(self._grants))
            n = self._grants.pop(stream_id)
            return encode_frame({"t": "window", "s": stream_id, "n": n})
        if self._ping is not None:
            frame = encode_frame({"t": "ping", "n": self._ping})
            self._ping = None
            self.stats.pings_sent += 1
            return frame
        while self._round:
            stream_id = self._round.popleft()
            queue = self._data.get(stream_id)
            if not queue:
                self._data.pop(stream_id, None)
                continue
            frame, nbytes = queue.popleft()
            if queue:
                self._round.append(stream_id)  # its next frame waits for the others
            else:
                del self._data[stream_id]
            self.stats.queued_data_bytes -= nbytes
            return frame
        return None

    async def _write_loop(self) -> None:
        writer = self._writer
        try:
            while True:
                if self._closing:
                    if self._final is not None:
                        writer.write(self._final)
                        await writer.drain()
                        self._final_sent.set()
                    return
                frame = self._next_frame()
                if frame is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                writer.write(frame)
                self.stats.frames_sent += 1
                self.stats.bytes_sent += len(frame)
                # Recorded so the heartbeat timer can drop a peer that stopped reading.
                self._write_blocked_since = self._last_tx = time.monotonic()
                await writer.drain()
                self._write_blocked_since = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ConnectionResetError, ssl errors, closed transport
            reason = f"{self._peer} connection lost: write failed: {exc or type(exc).__name__}"
            self._begin_close(reason, None, None, abort=True)

    # --------------------------------------------------------------------- reader

    def _take_over_reading(self) -> None:
        """Parse frames in the transport's callback from now on (see :class:`_FrameReader`)."""
        reader, transport = self._reader, self._writer.transport
        # What the stream reader holds already (frames sent right behind the handshake)
        # comes first. Private attributes, but the same from 3.9 to 3.13; StreamReader
        # has no public way to take its buffer without awaiting.
        buffered = reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)
        buffered.clear()
        transport.set_protocol(_FrameReader(self, transport.get_protocol()))
        if getattr(reader, "_paused", False):  # it had stopped reading for a full buffer
            reader._paused = False  # type: ignore[attr-defined]
            transport.resume_reading()
        if leftover:
            self._data_received(leftover)
        exc = reader.exception()
        if exc is not None:  # the connection broke before we took it over
            self._connection_lost(exc)
        elif reader.at_eof():
            self._eof_received()

    def _data_received(self, data: bytes) -> None:
        if self._closing:
            return  # as a cancelled reader task would: nothing read is acted on any more
        parser = self._parser
        parser.feed(data)
        stats = self.stats
        try:
            while not self._closing:
                frame = parser.next()
                if frame is None:
                    return
                self._last_rx = time.monotonic()
                stats.frames_received += 1
                stats.bytes_received += frame.size
                self._on_frame(frame)
        except ProtocolError as exc:
            final = encode_frame({"t": "error", "code": exc.code, "message": exc.message})
            self._begin_close(
                f"{self._peer} connection lost: protocol error: {exc.message}", exc.code, final
            )
        except Exception as exc:
            log.exception("protocol reader failed")
            self._begin_close(
                f"{self._peer} connection lost: internal error: {type(exc).__name__}",
                "internal",
                None,
            )

    def _eof_received(self) -> None:
        if self._closing:
            return
        what = "connection closed in the middle of a frame" if self._parser.pending else "connection closed by peer"
        self._begin_close(f"{self._peer} connection lost: {what}", None, None)

    def _connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._closing:
            return
        if exc is None:
            self._eof_received()
            return
        # A socket or TLS error (ssl.SSLError, ConnectionResetError): nobody to be polite to.
        reason = f"{self._peer} connection lost: {exc or type(exc).__name__}"
        self._begin_close(reason, None, None, abort=True)

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t == "goaway":
            code = peer_text(frame.header.get("code"), "closing")
            message = peer_text(frame.header.get("message")) or f"{self._peer} closed the connection ({code})"
            self._begin_close(message, code, None)
        elif t == "error":
            code = peer_text(frame.header.get("code"), "invalid_request")
            message = peer_text(frame.header.get("message"))
            self._begin_close(
                f"{self._peer} connection lost: {self._peer} reported {code}: {message}", code, None
            )
        else:
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        t = frame.type
        if t == "ping":
            if (self._agent_pings and self.role == "controller"
                    and self._last_rx - self._last_tx < QUIET_PONG_HEARTBEATS * self.heartbeat_s):
                # The ping proved the agent alive to us; the agent needs proof of us only
                # once we have been silent a while (_last_rx is now: this frame's arrival).
                return
            n = frame.header.get("n")
            n = n if is_int(n) else 0
            # Straight to an idle socket: waking the writer task for it was a loop
            # iteration per idle connection per interval.
            if not self._write_now(encode_frame({"t": "pong", "n": n})):
                self._pong = n
                self._wake.set()
            return
        if t not in STREAM_FRAME_TYPES:
            return  # pong (liveness is already noted) or a type from a later revision
        stream_id = frame.stream
        if stream_id is None:
            raise ProtocolError(f'"{t}" frame lacks a stream id')
        if t == "open":
            if self.role == "agent":
                self._on_open_frame(frame)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # finished or cancelled stream: late frames are expected
        if t == "window":
            n = frame.header.get("n")
            if not is_int(n) or n <= 0:
                raise ProtocolError('"window" needs a positive integer "n"')
            stream._add_credit(n)
            return
        stream._on_frame(frame)

    # ---------------------------------------------------------------- flow control

    def _account_received(self, stream: _Stream, nbytes: int) -> None:
        # Enforced, not trusted: a peer ignoring our window could otherwise fill memory.
        if stream._recv_unacked + nbytes > self.window:
            raise ProtocolError(f"stream {stream.id} exceeded its flow-control window")
        stream._recv_unacked += nbytes
        stats = self.stats
        stats.buffered_in_bytes += nbytes
        stats.max_buffered_in_bytes = max(stats.max_buffered_in_bytes, stats.buffered_in_bytes)

    def _unbuffer(self, nbytes: int) -> None:
        self.stats.buffered_in_bytes -= nbytes

    def _consumed(self, stream: _Stream, nbytes: int) -> None:
        """A consumer took ``nbytes``: grant them back once half a window piled up."""
        self._unbuffer(nbytes)
        if stream.ended or self._closing:
            return
        stream._consumed += nbytes
        if stream._consumed >= max(1, self.window // _GRANT_FRACTION):
            n = stream._consumed
            stream._consumed = 0
            stream._recv_unacked -= n
            self._grants[stream.id] = self._grants.get(stream.id, 0) + n
            self._wake.set()

    # ------------------------------------------------------------------ heartbeat

    @property
    def dead_after_s(self) -> float:
        """How long this side waits, with nothing received, before it closes the link."""
        if self._agent_pings and self.role == "agent":
            return AGENT_DEAD_AFTER_HEARTBEATS * self.heartbeat_s
        return DEAD_AFTER_HEARTBEATS * self.heartbeat_s

    def _heartbeat(self) -> None:
        """Check liveness and ping a quiet link; runs from a loop timer, not a task.

        One timer per connection, rescheduled for the next moment something can be
        due: a task sleeping in a loop cost a future and a task step per wake-up as
        well, and with thousands of idle agents on a gateway those wake-ups were a
        large part of its idle CPU.

        A ping is only needed where nothing else has arrived: any frame proves the peer
        alive. Up to version 2 only the controller pings an idle link (after one
        interval with nothing received) and the agent only once the controller has
        been silent for two; every ping is answered. From version 3 the agent pings
        once it has *sent* nothing for an interval, and the controller never pings: an
        idle gateway only receives, which costs it about half as much per agent. The
        controller answers a ping only after :data:`QUIET_PONG_HEARTBEATS` silent
        intervals of its own (see :attr:`dead_after_s` for each side's bound).
        """
        self._heartbeat_timer = None
        if self._closing:
            return
        interval = self.heartbeat_s
        dead_after = self.dead_after_s
        now = time.monotonic()
        last_rx = self._last_rx
        if now - last_rx >= dead_after:
            self._begin_close(f"{self._peer} connection lost: heartbeat timeout", None, None, True)
            return
        blocked = self._write_blocked_since
        if blocked is not None and now - blocked >= dead_after:
            self._begin_close(f"{self._peer} connection lost: write timeout", None, None, True)
            return
        if not self._agent_pings:
            quiet_for = interval if self.role == "controller" else 2 * interval
            if now >= self._next_ping:
                if now - last_rx >= quiet_for:
                    self._send_ping()
                    self._next_ping = now + interval
                else:
                    self._next_ping = last_rx + quiet_for  # heard from recently: wait until quiet
            wake_at = min(self._next_ping, last_rx + dead_after)
        elif self.role == "agent":
            due = self._last_tx + interval
            if now >= due:
                self._send_ping()
                due = now + interval  # also when the ping waits behind other frames
            wake_at = min(due, last_rx + dead_after)
        else:
            wake_at = last_rx + dead_after  # the controller only listens
        if blocked is not None:
            wake_at = min(wake_at, blocked + dead_after)
        assert self._loop is not None
        self._heartbeat_timer = self._loop.call_at(max(now, wake_at), self._heartbeat)

    def _send_ping(self) -> None:
        self._ping_seq += 1
        if self._write_now(encode_frame({"t": "ping", "n": self._ping_seq})):
            self.stats.pings_sent += 1
            return
        self._ping = self._ping_seq
        self._wake.set()


def tune_socket(sock: Any, heartbeat_s: float, dead_after_s: float) -> None:
    """TCP keepalive and ``TCP_USER_TIMEOUT`` on a link's socket: a belt under the heartbeat.

    The heartbeat notices a hung peer process; the kernel notices a vanished host or
    path without any work in this process: keepalive probes a link idle for
    ``dead_after_s`` (``KEEPALIVE_PROBES`` probes one ``heartbeat_s`` apart), and data
    left unacknowledged for ``dead_after_s`` fails the socket, as a stuck write does
    in the heartbeat. Options a platform lacks are skipped (the agent runs on other
    systems than Linux); ``sock`` None (not a socket transport) is ignored.
    """
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except (OSError, AttributeError):
        return
    idle = max(1, math.ceil(dead_after_s))
    options = (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPALIVE", idle),  # macOS's name for the idle time
        ("TCP_KEEPINTVL", max(1, math.ceil(heartbeat_s))),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", max(1000, math.ceil(dead_after_s * 1000))),
    )
    for name, value in options:
        option = getattr(socket, name, None)
        if option is None:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except (OSError, OverflowError):  # refused or out of this platform's range: a belt only
            pass
