"""The far side of the floor benchmarks' TLS links: bare peers for ``bench/floor_relay.py``.

    python bench/floor_peers.py echo PORT CAFILE FIRST COUNT   # COUNT connections echoing pings
    python bench/floor_peers.py sink PORT CAFILE                # one connection writing files

Each connection dials the relay (as an outbound agent dials the gateway), says hello with
its index (or ``sink``), then echoes every ping frame, or writes the file it is sent the
way the agent does (drop-behind every 8 MiB, fsync at the end). No protocol beyond the
frames: what an agent adds on top (its handshake, JSON headers, credit, digests) is
left out, so the figures are the floor under it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor

from fleetbus_base.pagecache import DropBehind
from floor_relay import DATA, DONE, END, HELLO, OPEN, PING, FramedProtocol, write_chunk


class Sink:
    """Writes in one thread, as the agent does, so decrypting the next chunk overlaps
    writing this one; reading pauses while 4 writes wait."""

    def __init__(self) -> None:
        self.fd = -1
        self.dropper: DropBehind | None = None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sink")
        self.queued = 0

    def on_frame(self, peer: FramedProtocol, kind: int, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        if kind == OPEN:
            self.fd = os.open(payload.decode(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self.dropper = DropBehind(self.fd)
        elif kind == DATA:
            self.queued += 1
            if self.queued == 4:
                assert peer.transport is not None
                peer.transport.pause_reading()
            self.writer.submit(self._write, payload).add_done_callback(
                lambda _: loop.call_soon_threadsafe(self._written, peer))
        elif kind == END:
            self.writer.submit(self._finish).add_done_callback(
                lambda _: loop.call_soon_threadsafe(peer.send, DONE))

    def _written(self, peer: FramedProtocol) -> None:
        self.queued -= 1
        if self.queued == 3:
            assert peer.transport is not None
            peer.transport.resume_reading()

    def _write(self, payload: bytes) -> None:
        assert self.dropper is not None
        write_chunk(self.fd, payload, self.dropper)

    def _finish(self) -> None:
        os.fsync(self.fd)
        assert self.dropper is not None
        self.dropper.finish()
        os.close(self.fd)


def echo(peer: FramedProtocol, kind: int, payload: bytes) -> None:
    if kind == PING:
        peer.send(PING, payload)


async def main() -> None:
    mode, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tls = ssl.create_default_context(cafile=cafile)
    loop = asyncio.get_running_loop()
    if mode == "sink":
        sink = Sink()
        _, peer = await loop.create_connection(lambda: FramedProtocol(sink.on_frame), "127.0.0.1", port,
                                               ssl=tls, server_hostname="127.0.0.1")
        peer.send(HELLO, b"sink")
    else:
        first, count = int(sys.argv[4]), int(sys.argv[5])
        for index in range(first, first + count):
            _, peer = await loop.create_connection(lambda: FramedProtocol(echo), "127.0.0.1", port,
                                                   ssl=tls, server_hostname="127.0.0.1")
            peer.send(HELLO, b"%d" % index)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
