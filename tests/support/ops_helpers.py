"""Helpers shared by the tests of fleetbus_base.ops and the local transport."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from fleetbus_base.ops import READ_CHUNK, TEMP_PREFIX

DEADLINE_S = 5.0


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def stray_pids() -> Iterator[list[int]]:
    """Pids of background processes a test started; killed at teardown if still there."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class RecordingSink:
    """An output callback/sink that records every write and lets a test wait for what arrived.

    Every write is checked against the chunk contract (a known stream name, 1 to
    READ_CHUNK bytes). ``fail`` is raised from each write; ``delay_s`` makes a slow
    consumer.
    """

    def __init__(self, delay_s: float = 0.0, fail: BaseException | None = None) -> None:
        self.writes: list[tuple[str, bytes]] = []
        self._delay_s = delay_s
        self._fail = fail
        self._changed = asyncio.Event()

    async def write(self, stream: str, data: bytes) -> None:
        assert stream in ("stdout", "stderr")
        assert isinstance(data, bytes) and 0 < len(data) <= READ_CHUNK
        self.writes.append((stream, data))
        self._changed.set()
        if self._fail is not None:
            raise self._fail
        if self._delay_s:
            await asyncio.sleep(self._delay_s)  # a slow consumer, not a readiness wait

    def data(self, stream: str) -> bytes:
        return b"".join(chunk for name, chunk in self.writes if name == stream)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
