"""connection.py's helpers for the plugin host's overload handling, on a real nats-server:
answering from code that cannot await, and hearing nats-py's slow-consumer errors."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
from fleetbus.connection import publish_soon, watch_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.ops_helpers import wait_until
from support.processes import NatsServer


async def test_publish_soon_from_a_plain_callback_delivers_every_message_in_order(
        nats_server: NatsServer, nc: NATS, prefix: str) -> None:
    got: list[bytes] = []

    async def collect(msg: Msg) -> None:
        got.append(msg.data)

    await nc.subscribe(f"{prefix}.soon", cb=collect)
    await nc.flush()
    sender = await nats.connect(nats_server.url)
    try:
        def burst() -> None:  # as from a dispatch callback: no await possible
            for i in range(500):
                assert publish_soon(sender, f"{prefix}.soon", b"%d" % i)

        asyncio.get_running_loop().call_soon(burst)
        await wait_until(lambda: len(got) == 500)
        assert got == [b"%d" % i for i in range(500)]
    finally:
        await sender.close()


async def test_watch_errors_hears_a_slow_consumer_and_keeps_the_original_callback(
        nats_server: NatsServer, prefix: str) -> None:
    original: list[Exception] = []
    heard: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        original.append(exc)

    conn = await nats.connect(nats_server.url, error_cb=on_error)
    try:
        watch_errors(conn, heard.append)
        stuck = asyncio.Event()

        async def never_done(msg: Msg) -> None:
            await stuck.wait()

        await conn.subscribe(f"{prefix}.slow", cb=never_done, pending_msgs_limit=2)
        for _ in range(20):
            await conn.publish(f"{prefix}.slow", b"x")
        await wait_until(lambda: any(isinstance(e, nats.errors.SlowConsumerError) for e in heard))
        assert [type(e) for e in heard] == [type(e) for e in original]
        stuck.set()
    finally:
        await conn.close()
