"""The client's request/reply (fleetbus.replies) against a real nats-server."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from fleetbus import dispatch, tuning
from fleetbus.connection import publish_now, send_now
from fleetbus.replies import Replies
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.ops_helpers import wait_until

# Direct writes are a patch: with FLEETBUS_TUNING=off nats-py's flusher sends everything.
TUNED = pytest.mark.skipif(not tuning.enabled(), reason="FLEETBUS_TUNING=off: nats_direct_writes not applied")


async def _responder(nc: NATS, subject: str, delays: dict[bytes, float]) -> list[bytes]:
    """Answers each request with its own payload reversed, after its delay; returns the
    list of what it has answered so far."""
    answered: list[bytes] = []

    async def answer(msg: Msg) -> None:
        await asyncio.sleep(delays.get(msg.data, 0))
        await msg.respond(msg.data[::-1] + b"|" + (msg.headers or {}).get("Who", "").encode())
        answered.append(msg.data)

    async def on_msg(msg: Msg) -> None:
        asyncio.ensure_future(answer(msg))

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return answered


async def test_each_request_gets_its_own_reply_whatever_the_order(nc: NATS, prefix: str) -> None:
    # The first request is answered last: replies are matched by token, not by order.
    await _responder(nc, f"{prefix}.svc", {b"slow": 0.3})
    replies = Replies(nc)
    tasks_before = len(asyncio.all_tasks())
    got = await asyncio.gather(
        replies.request(f"{prefix}.svc", b"slow", 5, {"Who": "a"}),
        *(replies.request(f"{prefix}.svc", f"r{i}".encode(), 5, {"Who": "b"}) for i in range(20)),
    )
    assert [m.data for m in got] == [b"wols|a"] + [f"r{i}"[::-1].encode() + b"|b" for i in range(20)]
    if tuning.enabled():  # nats_direct_dispatch: replies come straight from the read loop, no task
        assert replies._inbox.reader is None
        assert len(asyncio.all_tasks()) <= tasks_before
    else:  # one reader task for all of them, through nats-py's public iterator
        assert replies._inbox.reader is not None
    assert replies._waiting == {}
    await replies.close()


async def test_no_responders_and_timeouts_raise_what_nats_py_raises(nc: NATS, prefix: str) -> None:
    replies = Replies(nc)
    with pytest.raises(nats.errors.NoRespondersError):
        await replies.request(f"{prefix}.nobody", b"x", 5)
    answered = await _responder(nc, f"{prefix}.late", {b"late": 0.5})
    with pytest.raises(nats.errors.TimeoutError):
        await replies.request(f"{prefix}.late", b"late", 0.1)
    assert replies._waiting == {}  # the timed-out request left nothing behind
    await wait_until(lambda: b"late" in answered)
    await nc.flush()  # its reply came back before the flush's PONG, and was dropped quietly
    assert (await replies.request(f"{prefix}.late", b"ok", 5)).data == b"ko|"
    await replies.close()


async def test_without_the_internals_replies_come_through_a_reader_task(
        nc: NATS, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_direct_possible", lambda sub: False)
    await _responder(nc, f"{prefix}.svc", {})
    replies = Replies(nc)
    assert (await replies.request(f"{prefix}.svc", b"abc", 5)).data == b"cba|"
    reader = replies._inbox.reader
    assert reader is not None and not reader.done()
    await replies.close()
    assert reader.done()


async def _collect(nc: NATS, subject: str) -> list[bytes]:
    """The payloads that arrive on ``subject``, in order, as a list that fills up."""
    got: list[bytes] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg.data)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return got


@TUNED
async def test_send_now_hands_a_publish_to_the_socket_without_the_flusher(nc: NATS, prefix: str) -> None:
    got = await _collect(nc, f"{prefix}.now")
    await nc.publish(f"{prefix}.now", b"one")
    assert nc._pending_data_size > 0  # nats-py only queued it for its flusher task
    send_now(nc)
    assert nc._pending_data_size == 0 and nc._pending == []  # written in place
    await wait_until(lambda: bool(got))
    assert got == [b"one"]
    # Once per loop turn: what is published after it in the same turn goes out
    # together through nats-py's flusher, as under load it should.
    await nc.publish(f"{prefix}.now", b"two")
    send_now(nc)
    await nc.publish(f"{prefix}.now", b"three")
    send_now(nc)
    assert nc._pending_data_size > 0  # left for the flusher
    await nc.flush()
    await asyncio.sleep(0)  # a new turn
    await nc.publish(f"{prefix}.now", b"four")
    send_now(nc)
    assert nc._pending_data_size == 0
    await wait_until(lambda: len(got) >= 4)
    assert got == [b"one", b"two", b"three", b"four"]


@TUNED
async def test_publish_now_writes_a_reply_in_order_and_falls_back_when_it_must(nc: NATS, prefix: str) -> None:
    got = await _collect(nc, f"{prefix}.direct")
    await asyncio.sleep(0)  # a turn of our own
    out_before = nc.stats["out_msgs"]
    assert publish_now(nc, f"{prefix}.direct", b"one")  # straight to the socket
    assert nc._pending == [] and nc.stats["out_msgs"] == out_before + 1
    # In the same turn, or behind bytes nats-py still holds, it declines: writing
    # then would put this message before those.
    assert not publish_now(nc, f"{prefix}.direct", b"x")
    await asyncio.sleep(0)
    await nc.publish(f"{prefix}.direct", b"two")
    assert nc._pending and not publish_now(nc, f"{prefix}.direct", b"x")
    await nc.publish(f"{prefix}.direct", b"three")
    await nc.flush()
    await asyncio.sleep(0)
    for bad in ("", "has space", "new\r\nline", "ünïcode"):
        assert not publish_now(nc, bad, b"x")  # left to nats-py's own checks
    assert not publish_now(nc, f"{prefix}.direct", b"x" * (nc._max_payload + 1))
    assert publish_now(nc, f"{prefix}.direct", b"four")
    await wait_until(lambda: len(got) >= 4)
    assert got == [b"one", b"two", b"three", b"four"]
