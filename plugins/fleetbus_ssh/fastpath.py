"""Bulk channel data with fewer Python steps per SSH packet (the SFTP ``put`` path).

Why this exists
---------------
An SFTP upload is cut into SSH ``CHANNEL_DATA`` packets no larger than the server
allows on that channel: OpenSSH's sshd advertises 32 KiB for session channels and
*drops* larger packets (``channels.c: channel_input_data``, "rcvd big packet"), so the
packet count is not ours to lower. paramiko spends most of an upload's CPU around each
packet rather than on the bytes: ``Channel.send`` builds a :class:`~paramiko.Message`,
``Transport._send_user_message`` takes the rekey gate, ``Packetizer.send_message``
copies the payload four times, encrypts it and makes one socket write (a ``poll`` plus a
``send``, because the socket has a timeout) per packet. Measured on a 2-core machine,
that was about 130 us of CPU per 32 KiB packet, 4.2 ms per MiB.

:func:`send_data` instead takes window for several packets at once and has
:class:`BatchPacketizer` encrypt all of them under one write lock and hand them to
the socket in one write, with one copy of the data on the way. Only the AEAD case
(``aes*-gcm@openssh.com``, which we prefer; see :mod:`.connection`) takes this path: its
packet format is simple and has no separate MAC. Anything else (another cipher,
compression, packet dumps while debugging, a rekey in progress) goes through paramiko's
own ``Channel.send`` unchanged.

paramiko internals used, all present from 3.x to 5.x: the name-mangled ``Packetizer``
state the stock ``send_message`` uses (cipher engine, IV, sequence number, counters
that trigger a rekey, write lock), ``Channel._wait_for_send_window`` (window
accounting under ``Channel.lock``) and the transport's ``clear_to_send`` gate that
holds user data back during a key exchange. Should any of it be missing, the
fallback is paramiko's own path.
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from typing import Any

import paramiko
from paramiko.buffered_pipe import BufferedPipe
from paramiko.common import cMSG_CHANNEL_DATA, xffffffff
from paramiko.packet import NeedRekeyException

# Packets per socket write: 8 x 32 KiB is one 255 KiB SFTP write request.
_BATCH_PACKETS = 8
# Room for the packet's own headers within the peer's maximum (paramiko uses 64 too).
_PACKET_OVERHEAD = 64
_CHANNEL_DATA = cMSG_CHANNEL_DATA[0]
_DATA_HEADER = struct.Struct(">BII")  # message type, recipient channel, string length
_LENGTH = struct.Struct(">I")
_COUNTER_MASK = (1 << 64) - 1
# Largest socket read; a few SSH packets at OpenSSH's usual 32 KiB.
_READ_SIZE = 256 * 1024


class BatchPacketizer(paramiko.Packetizer):
    """paramiko's packetizer plus :meth:`send_channel_data` (many packets, one write)
    and a buffered :meth:`read_all` (many packets, one read)."""

    def __init__(self, socket: Any) -> None:
        super().__init__(socket)
        # Bytes read from the socket and not yet taken: _rbuf[_rpos:].
        self._rbuf = b""
        self._rpos = 0

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        """``Packetizer.read_all`` reading up to 256 KiB per ``recv``.

        paramiko reads each packet with two ``recv`` calls (the first block, then the
        rest), each a ``poll`` plus a ``recv`` because the socket has a timeout, and each
        a release and re-take of the GIL; on a ``get`` that is the transport thread's
        largest cost after decryption. Timeouts, the rekey check and keepalives behave
        as in paramiko's loop.
        """
        have = len(self._rbuf) - self._rpos
        if have >= n:
            start = self._rpos
            self._rpos += n
            return self._rbuf[start:self._rpos]
        if self._Packetizer__remainder:  # type: ignore[attr-defined]
            # Left over from reading the banner, before any packet: paramiko's own path.
            return super().read_all(n, check_rekey)
        parts = [self._rbuf[self._rpos:]] if have else []
        self._rbuf, self._rpos = b"", 0
        sock = self._Packetizer__socket  # type: ignore[attr-defined]
        while have < n:
            if self.handshake_timed_out():
                raise EOFError()
            try:
                x = sock.recv(max(n - have, _READ_SIZE))
            except TimeoutError:
                x = None
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    if self._Packetizer__closed:  # type: ignore[attr-defined]
                        raise EOFError() from None
                    raise
                x = None
            if x is None:
                if self._Packetizer__closed:  # type: ignore[attr-defined]
                    raise EOFError()
                if check_rekey and have == 0 and self._Packetizer__need_rekey:  # type: ignore[attr-defined]
                    raise NeedRekeyException()
                self._check_keepalive()
                continue
            if not x:
                raise EOFError()
            parts.append(x)
            have += len(x)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if have > n:
            self._rbuf, self._rpos = data, n
            return data[:n]
        return data

    def batch_ready(self) -> bool:
        """Whether :meth:`send_channel_data` can be used (AEAD cipher, nothing unusual)."""
        try:
            return bool(self._Packetizer__aead_out  # type: ignore[attr-defined]
                        and self._Packetizer__block_engine_out is not None  # type: ignore[attr-defined]
                        and self._Packetizer__compress_engine_out is None  # type: ignore[attr-defined]
                        and not self._Packetizer__dump_packets  # type: ignore[attr-defined]
                        and not self.need_rekey())
        except AttributeError:  # a paramiko whose internals moved: use its own path
            return False

    def send_channel_data(self, recipient: int, chunks: list[memoryview]) -> None:
        """Send each chunk as one ``CHANNEL_DATA`` packet to ``recipient``, in one write.

        Mirrors ``Packetizer.send_message`` for an AEAD cipher: padding to the block
        size with random bytes, the length as associated data, one IV step and one
        sequence number per packet, and the same rekey trigger. Should the cipher have
        changed since :meth:`batch_ready` (a key exchange in between), the chunks go
        out one by one through ``send_message``.
        """
        with self._Packetizer__write_lock:  # type: ignore[attr-defined]
            if not self.batch_ready():
                for chunk in chunks:
                    m = paramiko.Message()
                    m.add_byte(cMSG_CHANNEL_DATA)
                    m.add_int(recipient)
                    m.add_string(chunk.tobytes())
                    self.send_message(m)
                return
            block = self._Packetizer__block_size_out  # type: ignore[attr-defined]
            engine = self._Packetizer__block_engine_out  # type: ignore[attr-defined]
            iv = self._Packetizer__iv_out  # type: ignore[attr-defined]
            seq = self._Packetizer__sequence_number_out  # type: ignore[attr-defined]
            out: list[bytes] = []
            sent = 0
            for chunk in chunks:
                payload_len = _DATA_HEADER.size + len(chunk)
                # As _build_packet: at least 4 bytes, up to the block size; the length
                # field is outside the encrypted part under AEAD.
                padding = 3 + block - ((payload_len + 4) % block)
                length = _LENGTH.pack(payload_len + padding + 1)
                body = b"".join((bytes((padding,)),
                                 _DATA_HEADER.pack(_CHANNEL_DATA, recipient, len(chunk)),
                                 chunk, os.urandom(padding)))
                sealed = engine.encrypt(iv, body, length)
                out += (length, sealed)
                # RFC 5647 7.1: the IV's last 8 bytes count packets.
                iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & _COUNTER_MASK).to_bytes(8, "big")
                seq = (seq + 1) & xffffffff
                sent += 4 + len(sealed)
            self._Packetizer__iv_out = iv  # type: ignore[attr-defined]
            self._Packetizer__sequence_number_out = seq  # type: ignore[attr-defined]
            self.write_all(memoryview(b"".join(out)))
            self._Packetizer__sent_bytes += sent  # type: ignore[attr-defined]
            self._Packetizer__sent_packets += len(chunks)  # type: ignore[attr-defined]
            if ((self._Packetizer__sent_packets >= self.REKEY_PACKETS  # type: ignore[attr-defined]
                 or self._Packetizer__sent_bytes >= self.REKEY_BYTES)  # type: ignore[attr-defined]
                    and not self._Packetizer__need_rekey):  # type: ignore[attr-defined]
                self._Packetizer__received_bytes_overflow = 0  # type: ignore[attr-defined]
                self._Packetizer__received_packets_overflow = 0  # type: ignore[attr-defined]
                self._trigger_rekey()


def _take_window(chan: paramiko.Channel, view: memoryview) -> list[memoryview]:
    """Up to a batch of packet-sized pieces of ``view`` that the send window allows.

    Blocks for window only while nothing is taken yet: window taken but not sent would
    never come back as a window adjust, so waiting for more then could deadlock.
    """
    pieces: list[memoryview] = []
    offset = 0
    with chan.lock:
        if chan.closed:
            raise OSError("Socket is closed")  # what Channel.send raises
        while offset < len(view) and len(pieces) < _BATCH_PACKETS:
            if pieces and chan.out_window_size == 0:
                break
            size = chan._wait_for_send_window(len(view) - offset)
            if size == 0:
                break  # closed or EOF sent
            pieces.append(view[offset:offset + size])
            offset += size
    return pieces


def send_data(chan: paramiko.Channel, data: bytes) -> None:
    """Send all of ``data`` on ``chan``, batching packets when the transport allows.

    Blocking, like ``Channel.sendall``; raises ``EOFError`` or ``OSError`` as paramiko's
    SFTP client does when the channel is gone.
    """
    transport: Any = chan.get_transport()
    packetizer = getattr(transport, "packetizer", None)
    view = memoryview(data)
    while view:
        if not (isinstance(packetizer, BatchPacketizer) and packetizer.batch_ready()):
            sent = chan.send(view[:chan.out_max_packet_size].tobytes())
            if sent <= 0:
                raise EOFError()
            view = view[sent:]
            continue
        pieces = _take_window(chan, view)
        if not pieces:
            raise EOFError()
        # The gate paramiko's _send_user_message waits at: no user data during a key
        # exchange. Taken after the window, as paramiko does (never both locks at once).
        gate = transport.clear_to_send_lock
        while True:
            transport.clear_to_send.wait(0.1)
            if not transport.active:
                raise EOFError()
            gate.acquire()
            if transport.clear_to_send.is_set():
                break
            gate.release()
        try:
            packetizer.send_channel_data(chan.remote_chanid, pieces)  # EOFError when the socket fails
        finally:
            gate.release()
        view = view[sum(len(p) for p in pieces):]


class _Chunks:
    """The byte store behind :class:`ChunkPipe`: received pieces kept as they came.

    Supports exactly what ``BufferedPipe`` does with its ``array('B')``: ``len``,
    ``frombytes``, ``[:n].tobytes()`` and ``del [:n]``.
    """

    def __init__(self) -> None:
        self._parts: deque[bytes] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def frombytes(self, data: bytes) -> None:
        if data:
            self._parts.append(bytes(data))
            self._len += len(data)

    def __getitem__(self, index: slice) -> _Taken:
        limit = self._len if index.stop is None else min(index.stop, self._len)
        first = self._parts[0] if self._parts else b""
        if len(first) >= limit:
            return _Taken(first[:limit] if len(first) > limit else first)
        out: list[bytes] = []
        need = limit
        for part in self._parts:
            out.append(part if len(part) <= need else part[:need])
            need -= len(out[-1])
            if not need:
                break
        return _Taken(b"".join(out))

    def __delitem__(self, index: slice) -> None:
        n = self._len if index.stop is None else min(index.stop, self._len)
        self._len -= n
        parts = self._parts
        while n:
            part = parts[0]
            if len(part) <= n:
                parts.popleft()
                n -= len(part)
            else:
                parts[0] = part[n:]
                n = 0


class _Taken:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def tobytes(self) -> bytes:
        return self.data


class ChunkPipe(BufferedPipe):  # type: ignore[misc]
    """paramiko's channel input buffer without its per-read ``memmove``.

    ``BufferedPipe`` appends every received packet to one ``array('B')`` and deletes
    what is read from its front, which moves everything behind it: with a 16 MiB
    window and an SFTP reader taking one 255 KiB reply at a time, that was the
    largest item in the transport thread's profile on a ``get`` (a quarter of its
    samples). Keeping the pieces in a deque makes a read cost what it returns. The
    locking, waiting and close logic are paramiko's, unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _Chunks()


def use_chunk_pipe(chan: paramiko.Channel) -> None:
    """Give ``chan`` a :class:`ChunkPipe` for its stdout; call before any data arrives."""
    with chan.lock:
        if len(chan.in_buffer) == 0:
            chan.in_buffer = ChunkPipe()
