"""Framing for the fleetbus agent wire protocol (v1): constants, errors, one frame.

Every frame on the wire is::

    u32 big-endian N      number of bytes that follow
    u16 big-endian H      length of the JSON header
    H bytes               UTF-8 JSON object, always with a string "t" (frame type)
    N - 2 - H bytes       raw binary body, possibly empty

This module knows nothing about handshakes, streams or connections (see
:mod:`fleetbus_base.wire`). It is standard library only and runs on Python 3.9+,
because both the agent (shipped as one zipapp to any server) and the gateway use it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from json.encoder import c_make_encoder as _c_make_encoder  # None without the C accelerator
from json.encoder import encode_basestring as _encode_str
from typing import Any, Callable, Dict, Optional, Union

PROTOCOL_VERSION = 3
"""The newest protocol version this module speaks. Version 2 adds one thing: an
``exec`` may send its stdin as ``data`` frames (``stdin_size`` in its args) instead of
base64 in the open frame's header, whose 64 KiB limit capped stdin near 48 KiB.
Version 3 changes only who keeps an idle link alive: the agent pings, the controller
listens and answers rarely (see ``Connection._heartbeat``), so an idle agent costs its
gateway one received frame per interval instead of a ping sent and a pong received."""

SUPPORTED_VERSIONS = (1, 2, 3)
"""Every protocol version this module can speak, announced in ``hello``."""

MAX_HEADER = 0xFFFF
"""Largest JSON header (H) in bytes: 64 KiB - 1, all a u16 can say. Not negotiable."""

DEFAULT_MAX_BODY = 1024 * 1024
"""Default largest frame body a side accepts; each side announces its own."""

DEFAULT_WINDOW = 4 * 1024 * 1024
"""Default per-stream, per-direction flow-control window; each side announces its own."""

MIN_LIMIT = 1024
"""Smallest ``max_body`` / ``window`` a peer may announce (tiny values only waste frames)."""

MAX_ANNOUNCED_BODY = 16 * 1024 * 1024
"""Largest ``max_body`` a peer may announce; bounds the chunks we build for it."""

MAX_ANNOUNCED_WINDOW = 1024 * 1024 * 1024
"""Largest ``window`` a peer may announce; bounds what we may queue for it per stream."""

_PREFIX = struct.Struct(">IH")
_unpack_prefix = _PREFIX.unpack_from

def _make_json_encoder() -> Callable[[Any], str]:
    """The header encoder: compact, UTF-8 as is, no NaN/Infinity (not JSON; another
    implementation may reject them).

    json.dumps with any option builds a JSONEncoder per call, and JSONEncoder.encode
    builds its C encoder (and a dict for cycle checks) per call; for the two small
    frames of every command that was most of encoding them. One C encoder built here
    gives the same bytes in about half the time. Headers are ours and never circular,
    so there is no cycle check (a bug making one would end in RecursionError).
    """
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if _c_make_encoder is None:  # no C accelerator in this Python
        return encoder.encode
    c_encode = _c_make_encoder(None, encoder.default, _encode_str, None, ":", ",", False, False, False)

    def encode(header: Any) -> str:
        return "".join(c_encode(header, 0))

    return encode


_encode_json = _make_json_encoder()
_decoder = json.JSONDecoder()

# Frame types that belong to a stream and so must carry a positive integer "s".
STREAM_FRAME_TYPES = frozenset(
    {"open", "out", "data", "eof", "meta", "done", "fail", "cancel", "window"}
)

# Frame types whose body counts against flow control and that the writer sends
# round-robin after every control frame (see docs/agent-protocol.md, "Fairness").
DATA_FRAME_TYPES = frozenset({"out", "data"})


class ProtocolError(Exception):
    """The peer broke the protocol, or a protocol exchange failed.

    ``code`` is a bus error code (most often ``invalid_request``) and ``message`` a
    human-readable explanation that is safe to log and to send to the peer: it never
    contains header contents, so it can never leak a secret key.
    """

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Frame:
    """One decoded frame: the JSON ``header`` object and the raw ``body`` bytes."""

    # repr=False: a hello header carries the secret key; a Frame must be safe to log.
    header: Dict[str, Any] = field(repr=False)
    body: bytes = field(default=b"", repr=False)
    size: int = field(default=0, repr=False, compare=False)
    """Bytes this frame took on the wire, prefix included (0 if not read from one)."""

    @property
    def type(self) -> str:
        """The frame type, header field ``"t"`` (always a string once decoded)."""
        return str(self.header["t"])

    @property
    def stream(self) -> Optional[int]:
        """The stream id, header field ``"s"``, or None for connection-level frames."""
        s = self.header.get("s")
        return s if _is_stream_id(s) else None

    def __repr__(self) -> str:
        return f"Frame(type={self.type!r}, stream={self.stream!r}, body={len(self.body)} bytes)"


def _is_stream_id(value: Any) -> bool:
    # bool is an int subclass; True must not pass for stream 1.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def encode_frame(
    header: Dict[str, Any], body: bytes = b"", max_body: Optional[int] = None
) -> bytes:
    """Encode one frame: length prefix, compact UTF-8 JSON header, raw body.

    ``header`` must be a JSON-serialisable dict with a string ``"t"``. Raises
    ValueError when the header is missing ``"t"``, is larger than :data:`MAX_HEADER`
    after encoding, or when ``max_body`` is given and the body is larger.
    """
    if not isinstance(header.get("t"), str):
        raise ValueError('a frame header needs a string "t"')  # noqa: TRY004 - callers catch ValueError
    hbytes = _encode_json(header).encode("utf-8")
    if len(hbytes) > MAX_HEADER:
        raise ValueError(f"frame header is {len(hbytes)} bytes, limit {MAX_HEADER}")
    if max_body is not None and len(body) > max_body:
        raise ValueError(f"frame body is {len(body)} bytes, limit {max_body}")
    return b"".join((_PREFIX.pack(2 + len(hbytes) + len(body), len(hbytes)), hbytes, body))


def max_frame_size(max_body: int) -> int:
    """Largest N (bytes after the u32 prefix) a receiver with ``max_body`` accepts."""
    return 2 + MAX_HEADER + max_body


async def read_frame(reader: asyncio.StreamReader, max_body: int = DEFAULT_MAX_BODY) -> Frame:
    """Read and validate one frame from ``reader``.

    Every length is checked before anything is read into memory for it, so a peer
    announcing a 4 GiB frame costs nothing: at most ``2 + MAX_HEADER + max_body`` bytes
    are ever buffered for one frame.

    Raises :class:`ProtocolError` (code ``invalid_request``) when the frame is too
    large, the header is not a UTF-8 JSON object with a string ``"t"``, or ``"s"`` is
    present but not a positive integer; ``EOFError`` when the peer closed the
    connection (cleanly between frames or in the middle of one). Transport errors
    (``ConnectionError``, ``ssl.SSLError``) propagate unchanged.
    """
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise EOFError("connection closed in the middle of a frame") from None
        raise EOFError("connection closed by peer") from None
    n, h = _PREFIX.unpack(prefix)
    _check_prefix(n, h, max_body)
    body_len = n - 2 - h
    try:
        hbytes = await reader.readexactly(h)
        body = await reader.readexactly(body_len) if body_len else b""
    except asyncio.IncompleteReadError:
        raise EOFError("connection closed in the middle of a frame") from None
    return Frame(decode_header(hbytes), body, 4 + n)


def _check_prefix(n: int, h: int, max_body: int) -> None:
    """Validate a frame's length prefix before anything is buffered for it."""
    if n > max_frame_size(max_body):
        raise ProtocolError(f"frame of {n} bytes exceeds the limit of {max_frame_size(max_body)}")
    if h > n - 2 or n < 2:
        raise ProtocolError("frame header length exceeds the frame length")
    if h == 0:
        raise ProtocolError("frame has no header")
    body_len = n - 2 - h
    if body_len > max_body:
        raise ProtocolError(f"frame body of {body_len} bytes exceeds the limit of {max_body}")


class FrameParser:
    """Frames cut out of a byte stream as it arrives: no task, no await.

    A connection feeds it every chunk its transport delivers and takes frames with
    :meth:`next` in the same callback. Reading with :func:`read_frame` in a task cost a
    loop iteration per received frame (the stream reader wakes the task, which runs in
    the next iteration), on both ends of every command.

    The same limits as :func:`read_frame`: a prefix is checked as soon as its six bytes
    are in, so a peer announcing a 4 GiB frame is refused before anything is kept for
    it, and at most one frame (``2 + MAX_HEADER + max_body`` bytes) plus one chunk is
    ever buffered. :meth:`next` raises :class:`ProtocolError` for a bad frame; frames
    before it have been returned already, as a reader task would have dispatched them.
    """

    __slots__ = ("_buf", "_limit", "_pos", "max_body")

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_body = max_body
        self._limit = max_frame_size(max_body)
        # Unparsed bytes are _buf[_pos:]. A chunk that arrives with nothing pending is
        # parsed where it lies (no copy); only an incomplete frame's bytes are copied.
        self._buf: Union[bytes, bytearray] = b""
        self._pos = 0

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add bytes from the connection; take the frames with :meth:`next`."""
        buf = self._buf
        if not buf:
            self._buf = data
            return
        if isinstance(buf, bytearray):
            if self._pos:
                del buf[: self._pos]  # bytearray drops a prefix without moving the rest
            buf += data
        else:
            buf = bytearray(memoryview(buf)[self._pos :])
            buf += data
            self._buf = buf
        self._pos = 0

    def next(self) -> Optional[Frame]:
        """The next complete frame, or None until more bytes arrive."""
        buf = self._buf
        if not buf:
            return None
        pos = self._pos
        avail = len(buf) - pos
        if avail < 6:
            return None
        n, h = _unpack_prefix(buf, pos)
        if n > self._limit or not 0 < h <= n - 2 or n - 2 - h > self.max_body:
            _check_prefix(n, h, self.max_body)  # raises, with the reason
        if avail < 4 + n:
            return None
        start = pos + 6
        split = start + h
        end = pos + 4 + n
        if isinstance(buf, bytes):
            hbytes = buf[start:split]
            body = buf[split:end] if end > split else b""
        else:
            with memoryview(buf) as view:  # released at once: a viewed bytearray cannot grow
                hbytes = bytes(view[start:split])
                body = bytes(view[split:end]) if end > split else b""
        if end >= len(buf):
            self._buf, self._pos = b"", 0  # nothing pending: hold no buffer while idle
        else:
            self._pos = end
        return Frame(decode_header(hbytes), body, 4 + n)


def decode_header(data: bytes) -> Dict[str, Any]:
    """Decode and validate a frame header; raises :class:`ProtocolError` when invalid."""
    try:
        text = data.decode("utf-8")
        try:
            # Headers we and the gateway write have no surrounding whitespace: decode
            # them without the two regex scans json.loads adds for it.
            header, end = _decoder.raw_decode(text)
        except ValueError:
            end = -1
        if end != len(text):
            header = json.loads(text)  # whitespace or trailing data: the full rules decide
    except (UnicodeDecodeError, ValueError, RecursionError):
        # The error text would quote the header; it may hold a secret, so say less.
        raise ProtocolError("frame header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    if not isinstance(header.get("t"), str):
        raise ProtocolError('frame header lacks a string "t"')
    if "s" in header and not _is_stream_id(header["s"]):
        raise ProtocolError('frame header has an "s" that is not a positive integer')
    return header
