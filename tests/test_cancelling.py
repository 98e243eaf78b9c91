"""cancel_and_wait ends a task that swallowed its cancellation, as a nats-py call under
Python 3.11's asyncio.wait_for can make a loop do (core/fleetbus/cancelling.py)."""

from __future__ import annotations

import asyncio

from fleetbus.cancelling import cancel_and_wait


async def test_a_task_that_swallows_one_cancel_is_cancelled_again_and_ends() -> None:
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what wait_for does when the cancel meets a finished wait
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task, None]), 10)
    assert task.cancelled() and swallowed == 1


async def test_finished_and_failed_tasks_are_waited_for_without_raising() -> None:
    async def boom() -> None:
        raise RuntimeError("x")

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(boom())
    await asyncio.sleep(0.01)
    await cancel_and_wait([done, failed])
    assert done.done() and isinstance(failed.exception(), RuntimeError)
