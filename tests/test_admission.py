"""Admission's bookkeeping on its own: the bound, its fair shares, and parse turns.

The whole path (a flood against a real `fleetbus up`) is in test_overload.py; these pin
down the rules that path relies on, which a flood shows only in aggregate.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from fleetbus.admission import MAX_DEFER_S, Admission, AdmissionSettings, requester_of
from fleetbus.limits import MAX_REQUEST_BYTES

MIB = 1024 * 1024


def test_the_requester_is_the_reply_subject_without_its_last_token() -> None:
    assert requester_of("_INBOX.abc123.7") == "_INBOX.abc123"
    assert requester_of("_INBOX.abc123") == "_INBOX.abc123"  # an old-style inbox per request
    assert requester_of("") == ""


def test_one_requester_alone_takes_half_and_a_newcomer_still_gets_in() -> None:
    admission = Admission(AdmissionSettings(max_waiting=100))
    flood = [admission.admit("flood", 10) for _ in range(60)]
    assert sum(t is not None for t in flood) == 50  # 1/(1+1) of the bound
    assert admission.admit("other", 10) is not None
    # Two holders now: each may hold a third. The flood holds 50, so it waits its turn.
    assert admission.admit("flood", 10) is None
    for ticket in flood[:20]:
        assert ticket is not None
        ticket.release()
    assert admission.waiting == 31
    assert admission.admit("flood", 10) is not None  # 31 of its own, under 100 // 3
    flood[0].release()  # type: ignore[union-attr]  # idempotent: counted once
    assert admission.waiting == 32


def test_greedy_holders_leave_room_for_someone_new() -> None:
    admission = Admission(AdmissionSettings(max_waiting=100))
    taken = {name: sum(admission.admit(name, 10) is not None for _ in range(60)) for name in "abc"}
    # Shares of 1/2, 1/3 and 1/4 as each joined would be 108; holders stop at 7/8 of 100.
    assert taken == {"a": 50, "b": 33, "c": 5}  # its first as a newcomer, then up to 88
    assert admission.admit("d", 10) is not None


def test_bytes_are_shared_the_same_way_and_one_request_always_fits() -> None:
    admission = Admission(AdmissionSettings(max_waiting_bytes=8 * MIB))
    held = [admission.admit("flood", MIB) for _ in range(5)]
    assert [t is not None for t in held] == [True] * 4 + [False]
    # A requester holding nothing may send one request of any size the total allows.
    assert admission.admit("other", MAX_REQUEST_BYTES) is not None
    assert admission.admit("third", 3 * MIB + 1) is None  # the total: 5 MiB + 3 MiB + 1
    assert admission.waiting_bytes == 5 * MIB
    assert admission.requesters == 2


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_waiting_bytes"):
        AdmissionSettings(max_waiting_bytes=MAX_REQUEST_BYTES - 1)
    with pytest.raises(ValueError, match="parse_share"):
        AdmissionSettings(parse_share=0)


async def test_large_bodies_take_turns_round_robin_and_small_ones_never_wait() -> None:
    admission = Admission(AdmissionSettings(large_body_bytes=100, parse_share=1.0))
    order: list[str] = []

    async def parse(requester: str, size: int, hold: asyncio.Event | None = None) -> None:
        ticket = admission.admit(requester, size)
        assert ticket is not None
        async with admission.parse_turn(ticket):
            order.append(requester)
            if hold is not None:
                await hold.wait()

    holding = asyncio.Event()
    first = asyncio.create_task(parse("a", 100, holding))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(parse(name, 100)) for name in ("a", "a", "a", "b", "c")]
    await asyncio.sleep(0)
    await parse("small", 99)  # not paced: goes while a large one holds the turn
    holding.set()
    await asyncio.gather(first, *waiting)
    # The flood's queued bodies do not go before the others' first ones.
    assert order == ["a", "small", "a", "b", "c", "a", "a"]


async def test_turns_leave_the_rest_of_the_time_and_wait_while_reading_is_behind() -> None:
    behind = True
    admission = Admission(AdmissionSettings(large_body_bytes=1, parse_share=0.5),
                          behind=lambda: behind)
    ticket = admission.admit("a", 1)
    assert ticket is not None
    started = time.monotonic()
    async with admission.parse_turn(ticket):  # reading stays behind: goes after MAX_DEFER_S
        waited = time.monotonic() - started
        time.sleep(0.05)  # noqa: ASYNC251  (a parse: 50 ms holding the loop)
    assert waited >= MAX_DEFER_S * 0.9
    behind = False
    started = time.monotonic()
    async with admission.parse_turn(ticket):  # half the time: 50 ms of rest first
        waited = time.monotonic() - started
    assert waited >= 0.045


async def test_a_waiter_cancelled_keeps_no_turn() -> None:
    admission = Admission(AdmissionSettings(large_body_bytes=1))
    tickets = [admission.admit(name, 1) for name in ("a", "b", "c")]
    hold = asyncio.Event()

    async def parse(i: int) -> None:
        async with admission.parse_turn(tickets[i]):  # type: ignore[arg-type]
            if i == 0:
                await hold.wait()

    holder = asyncio.create_task(parse(0))
    await asyncio.sleep(0)
    cancelled, last = asyncio.create_task(parse(1)), asyncio.create_task(parse(2))
    await asyncio.sleep(0)
    cancelled.cancel()
    hold.set()
    await asyncio.wait_for(asyncio.gather(holder, last), 5)
    assert cancelled.cancelled()
