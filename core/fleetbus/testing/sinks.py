"""Output sinks that check and record what a session writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..transport import StreamName


class CollectingSink:
    """An ``OutputSink`` that records every chunk and checks the chunk contract.

    Each write must name ``stdout`` or ``stderr`` and carry non-empty ``bytes``; writes
    must not overlap (a transport awaits one before reading the next chunk) and must not
    come after :meth:`close` (the test calls it once ``exec`` returned). A breach is
    recorded in ``violations`` (and raised from the write), so a test can assert the list
    is empty even when the transport swallowed the error.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[StreamName, bytes]] = []
        self.violations: list[str] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._closed = False
        self._changed = asyncio.Event()

    async def write(self, stream: StreamName, data: bytes) -> None:
        problem = None
        if stream not in ("stdout", "stderr"):
            problem = f"unknown stream {stream!r}"
        elif not isinstance(data, bytes) or not data:
            problem = f"a chunk must be non-empty bytes, got {type(data).__name__} of {len(data)}"
        elif self._closed:
            problem = "write after exec returned"
        if problem is not None:
            self.violations.append(problem)
            raise AssertionError(problem)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self.writes.append((stream, data))
            self._changed.set()
            await self.consume(stream, data)
        finally:
            self._in_flight -= 1

    async def consume(self, stream: StreamName, data: bytes) -> None:
        """What the consumer does with a chunk; nothing here, slower in :class:`SlowSink`."""

    def close(self) -> None:
        """Mark that ``exec`` returned: any later write is a violation."""
        self._closed = True

    def data(self, stream: StreamName) -> bytes:
        """Everything written to ``stream``, joined."""
        return b"".join(chunk for name, chunk in self.writes if name == stream)

    def text(self, stream: StreamName) -> str:
        return self.data(stream).decode(errors="replace")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after each write; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"output condition not met within {timeout} s; "
                                     f"stdout so far ends {self.data('stdout')[-200:]!r}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


class SlowSink(CollectingSink):
    """A consumer that yields to the loop ``delay_s`` after each chunk (a slow requester).

    With it, a transport that ignores back-pressure shows up as overlapping writes
    (``max_in_flight`` above 1) or as lost or reordered bytes.
    """

    def __init__(self, delay_s: float = 0.001) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def consume(self, stream: StreamName, data: bytes) -> None:
        await asyncio.sleep(self.delay_s)  # the consumer's own pace, not a readiness wait
