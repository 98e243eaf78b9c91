"""The relay of the floor benchmarks: the bus and the transports, none of fleetbus's host.

Started by ``bench/floors.py`` as its own process (as ``fleetbus up`` is), it answers
requests on ``bench.floor.*`` with the same bus primitives the plugin host uses
(:func:`fleetbus.dispatch.subscribe_direct` to take requests from nats-py's read loop,
:func:`fleetbus.connection.send_now` to write replies at once), and does the work with
the same parts fleetbus uses (``ChildProcess`` for a spawn, asyncio TLS for the agents'
side, the real ``ssh`` transport's session for SFTP). Left out on purpose: request
validation, server lookup, sessions, limits, deduplication, metrics, audit records,
content digests and the agent protocol. What it reaches is the most the design's
fixed layers (nats-py, NATS, asyncio, TLS, paramiko) allow on this machine.

    python bench/floor_relay.py CONFIG.json   # NATS token in FLOOR_NATS_TOKEN

Prints ``ready <tls port>`` once it serves. Frames on the TLS side (to
``bench/floor_peers.py``): a 4-byte big-endian length, a kind byte, the payload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
from fleetbus.connection import send_now
from fleetbus.dispatch import subscribe_direct
from fleetbus.replies import Replies
from fleetbus_base.ops.child import ChildProcess
from nats.aio.msg import Msg

HEADER = struct.Struct(">IB")
HELLO, PING, OPEN, DATA, END, DONE = (ord(c) for c in "HPODEK")
WINDOW = 4  # chunks in flight on a stream, as fleetbus's 4 MiB stream window of 1 MiB chunks


def write_chunk(fd: int, data: bytes, dropper: Any) -> None:
    """Write all of ``data`` to ``fd`` and tell ``dropper`` (a ``DropBehind``), as
    fleetbus's writers do."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    dropper.wrote(len(data))


class FramedProtocol(asyncio.Protocol):
    """Length-prefixed frames over one connection; ``on_frame(kind, payload)`` per frame."""

    def __init__(self, on_frame: Any, on_lost: Any = None) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= HEADER.size:
            size, kind = HEADER.unpack_from(buf)
            end = HEADER.size + size
            if len(buf) < end:
                return
            payload = bytes(buf[HEADER.size:end])
            del buf[:end]
            self.on_frame(self, kind, payload)

    def send(self, kind: int, payload: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.writelines((HEADER.pack(len(payload), kind), payload))

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost(self)


class _SshContext:
    """What the ssh transport asks of the plugin host: a thread pool, one server."""

    transport_name = "ssh"

    def __init__(self, server: Any, credential: Any) -> None:
        self.settings: dict[str, Any] = {}
        self.logger = logging.getLogger("floor.ssh")
        self.services = None
        self._server, self._credential = server, credential
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="floor-ssh")

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def lookup_server(self, name: str) -> Any:
        return self._server

    async def credential(self, name: str) -> Any:
        return self._credential


class Relay:
    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.replies = Replies(nc)
        self.peers: dict[int, FramedProtocol] = {}
        self.peer_index: dict[FramedProtocol, int] = {}
        self.sink: FramedProtocol | None = None
        self.sink_done: asyncio.Future[None] | None = None
        self.ping_waiting: dict[int, deque[asyncio.Future[bytes]]] = {}
        self.session: Any = None
        self.put_chunks: asyncio.Queue[bytes | None] | None = None
        self.put_result: asyncio.Future[Any] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    # the bus side ------------------------------------------------------------------
    # Each request is handled in a task of its own, as the plugin host does.
    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reply(self, subject: str, body: bytes = b"{}") -> None:
        await self.nc.publish(subject, body)
        send_now(self.nc)

    def on_peers(self, msg: Msg) -> None:
        self.spawn(self.reply(msg.reply, b"%d %d" % (len(self.peers), self.sink is not None)))

    def on_exec(self, msg: Msg) -> None:
        self.spawn(self._exec(msg))

    async def _exec(self, msg: Msg) -> None:
        exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        child = ChildProcess.start(["true"], cwd=None, env=None, stdin=None,
                                   on_output=lambda fd, data: None, on_eof=lambda fd: None,
                                   on_exit=lambda: exited.set_result(None))
        await exited
        await self.reply(msg.reply, b'{"ok":true,"exit_code":%d}' % (child.returncode or 0))

    def on_ping(self, msg: Msg) -> None:
        self.spawn(self._ping(msg))

    async def _ping(self, msg: Msg) -> None:
        index = int(msg.subject.rsplit(".", 1)[1])
        answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.ping_waiting.setdefault(index, deque()).append(answered)
        self.peers[index].send(PING, msg.data)
        await self.reply(msg.reply, await answered)

    def on_put(self, msg: Msg) -> None:
        self.spawn(self._put(msg))

    async def _put(self, msg: Msg) -> None:
        # bench.floor.put.{open,data,end}: on to the sink peer over TLS, each chunk
        # acknowledged once the TLS transport takes more (under its high-water mark).
        op = msg.subject.rsplit(".", 1)[1]
        sink = self.sink
        assert sink is not None
        if op == "open":
            sink.send(OPEN, msg.data)
        elif op == "data":
            sink.send(DATA, msg.data)
            await sink.can_write.wait()
        else:
            self.sink_done = asyncio.get_running_loop().create_future()
            sink.send(END)
            await self.sink_done
        await self.reply(msg.reply)

    def on_sshput(self, msg: Msg) -> None:
        self.spawn(self._sshput(msg))

    async def _sshput(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[1]
        if op == "open":
            from fleetbus.transport import PutSpec

            self.put_chunks = asyncio.Queue(WINDOW)
            spec = PutSpec(path=msg.data.decode(), mode=None, make_parents=False)
            self.put_result = asyncio.ensure_future(self.session.put(spec, self._queued()))
        elif op == "data":
            assert self.put_chunks is not None
            await self.put_chunks.put(msg.data)
        else:
            assert self.put_chunks is not None and self.put_result is not None
            await self.put_chunks.put(None)
            await self.put_result
        await self.reply(msg.reply)

    async def _queued(self) -> AsyncIterator[bytes]:
        assert self.put_chunks is not None
        while (chunk := await self.put_chunks.get()) is not None:
            yield chunk

    def on_sshget(self, msg: Msg) -> None:
        self.spawn(self._get(msg))

    async def _get(self, msg: Msg) -> None:
        # Chunks go to the requester's subject, each a request it answers once written:
        # at most WINDOW unanswered, as fleetbus's stream credit.
        request = json.loads(msg.data)
        remote = await self.session.get(request["path"])
        window = asyncio.Semaphore(WINDOW)
        pending: set[asyncio.Task[Any]] = set()

        async def one(chunk: bytes) -> None:
            try:
                await self.replies.request(request["deliver"], chunk, 30)
            finally:
                window.release()

        async for chunk in remote.chunks:
            await window.acquire()
            task = asyncio.ensure_future(one(chunk))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        await self.reply(msg.reply, json.dumps({"size": remote.size}).encode())

    # the TLS side ------------------------------------------------------------------
    def on_frame(self, peer: FramedProtocol, kind: int, payload: bytes) -> None:
        if kind == PING:
            self.ping_waiting[self.peer_index[peer]].popleft().set_result(payload)
        elif kind == HELLO:
            if payload == b"sink":
                self.sink = peer
            else:
                self.peer_index[peer] = int(payload)
                self.peers[int(payload)] = peer
        elif kind == DONE and self.sink_done is not None:
            self.sink_done.set_result(None)



async def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    token = os.environ.get("FLOOR_NATS_TOKEN")  # the embedded NATS's: owner's password
    nc = await nats.connect(config["nats_url"], **({"user": "owner", "password": token} if token else {}),
                            max_reconnect_attempts=0)
    relay = Relay(nc)
    for name, handler in (("peers", relay.on_peers), ("exec", relay.on_exec), ("ping.*", relay.on_ping), ("put.*", relay.on_put),
                          ("sshput.*", relay.on_sshput), ("sshget", relay.on_sshget)):
        await subscribe_direct(nc, f"bench.floor.{name}", handler)
    if config.get("ssh"):
        from fleetbus.records import Server
        from fleetbus.transport import Credential
        from fleetbus_ssh.transport import SshTransport

        ssh = config["ssh"]
        credential = Credential(name="k", type="ssh-key", user="root",
                                secret=Path(ssh["key_file"]).read_bytes())
        server = Server(name="floor", transport="ssh", host=ssh["host"], port=ssh["port"], credential="k",
                        options={"host_key": ssh["host_key"]})
        relay.session = await SshTransport(_SshContext(server, credential)).open(server, credential)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(config["cert"], config["key"])
    server = await asyncio.get_running_loop().create_server(
        lambda: FramedProtocol(relay.on_frame), "127.0.0.1", 0, ssl=tls, backlog=1024)
    await nc.flush()
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    from fleetbus import tuning

    tuning.apply(tuning.TRANSFER)  # nats-py and the heap as in a worker
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
