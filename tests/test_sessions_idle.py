"""SessionPool.close_idle: idle sessions closed, used ones kept, and a tick that looks
only at the front of the least-recently-used order (15,000 agents on one gateway)."""

from __future__ import annotations

import asyncio
import os

import pytest
from fleetbus import testing
from fleetbus.records import Server
from fleetbus.sessions import SessionPool
from fleetbus.transport import Credential
from fleetbus_local.transport import LocalTransport
from support.processes import own_user

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local transport is POSIX only")


def make_pool() -> SessionPool:
    transport = LocalTransport(testing.FakeContext("local", {"user": own_user()}))

    async def credentials(name: str) -> Credential:
        raise AssertionError("local servers have no credential")

    return SessionPool(transport, credentials)


def server(name: str) -> Server:
    return Server(name=name, transport="local")


async def test_close_idle_closes_released_sessions_and_keeps_those_in_use() -> None:
    pool = make_pool()
    a, b, c = server("a"), server("b"), server("c")
    async with pool.use(a) as held:
        async with pool.use(b) as first_b:
            pass
        async with pool.use(c) as first_c:
            pass
        await pool.close_idle(3600)  # nothing idle that long
        assert set(pool.entries) == {"a", "b", "c"}
        await pool.close_idle(0)  # every released session is idle: b and c, not a
        assert set(pool.entries) == {"a"}
        async with pool.use(a) as again:
            assert again is held  # shared, still open
    async with pool.use(b) as second_b:
        assert second_b is not first_b  # reopened after the close
    await pool.close_idle(3600)
    assert set(pool.entries) == {"a", "b"}
    await pool.close_idle(0)
    assert pool.entries == {}
    async with pool.use(c) as second_c:
        assert second_c is not first_c
    await pool.close_all()


async def test_close_idle_stops_at_the_first_recent_session() -> None:
    pool = make_pool()
    for i in range(3):
        async with pool.use(server(f"old{i}")):
            pass
    await asyncio.sleep(1.0)  # the old ones idle 1 s longer than the new ones
    for i in range(3):
        async with pool.use(server(f"new{i}")):
            pass
    # Re-using old1 makes it recent: it moves behind the new ones.
    async with pool.use(server("old1")):
        pass
    await pool.close_idle(0.5)
    assert set(pool.entries) == {"old1", "new0", "new1", "new2"}
    await pool.close_all()
