"""Messages handed to a plain function from nats-py's read loop (fleetbus.dispatch),
against a real nats-server."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fleetbus import dispatch, tuning
from fleetbus.dispatch import subscribe_direct
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

# The direct path is a patch (nats_direct_dispatch): with FLEETBUS_TUNING=off every
# subscription reads through the public iterator, which the last test covers.
DIRECT = pytest.mark.skipif(not tuning.enabled(), reason="FLEETBUS_TUNING=off: nats_direct_dispatch not applied")


async def _until(check, what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@DIRECT
async def test_every_message_reaches_dispatch_with_no_task_in_between(nc: NATS, prefix: str) -> None:
    got: list[bytes] = []
    tasks_before = len(asyncio.all_tasks())
    sub, reader = await subscribe_direct(nc, f"{prefix}.direct", lambda m: got.append(m.data))
    assert reader is None  # the direct path, not the fallback
    assert len(asyncio.all_tasks()) == tasks_before  # nats-py started no task for it
    for i in range(50):
        await nc.publish(f"{prefix}.direct", str(i).encode())
    await nc.flush()
    await _until(lambda: len(got) == 50, "50 messages")
    assert got == [str(i).encode() for i in range(50)]
    await sub.unsubscribe()


@DIRECT
async def test_nothing_stays_pending_so_no_message_is_dropped_as_slow(nc: NATS, prefix: str) -> None:
    """nats-py counts each message as pending until its consumer takes it; counted and
    never taken off, a 1 KiB limit would drop everything after the tenth message."""
    got: list[Msg] = []
    sub, _ = await subscribe_direct(nc, f"{prefix}.limit", got.append, pending_bytes_limit=1024)
    for _ in range(100):
        await nc.publish(f"{prefix}.limit", b"x" * 100)
    await nc.flush()
    await _until(lambda: len(got) == 100, "100 messages")
    assert sub.pending_bytes == 0 and sub.pending_msgs == 0
    await sub.drain()  # waits for nothing: nothing is pending


async def test_a_failing_dispatch_is_logged_and_the_next_message_still_arrives(
        nc: NATS, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    got: list[bytes] = []

    def fussy(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("no")
        got.append(msg.data)

    sub, _ = await subscribe_direct(nc, f"{prefix}.fussy", fussy)
    with caplog.at_level(logging.ERROR, logger="fleetbus.dispatch"):
        for data in (b"bad", b"good"):
            await nc.publish(f"{prefix}.fussy", data)
        await nc.flush()
        await _until(lambda: got == [b"good"], "the message after the failing one")
    assert "dispatching a message" in caplog.text
    assert nc.is_connected  # the read loop survived
    await sub.unsubscribe()


async def test_without_the_internals_it_reads_through_the_public_iterator(
        nc: NATS, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_direct_possible", lambda sub: False)
    got: list[bytes] = []
    sub, reader = await subscribe_direct(nc, f"{prefix}.fallback", lambda m: got.append(m.data))
    assert reader is not None
    for i in range(5):
        await nc.publish(f"{prefix}.fallback", str(i).encode())
    await nc.flush()
    await _until(lambda: len(got) == 5, "5 messages")
    await sub.unsubscribe()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
