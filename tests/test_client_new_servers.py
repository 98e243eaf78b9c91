"""A server added a moment ago: workers serve it once the registry watch reaches them, so
the client retries a request that found nobody for a short while, and only then."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fleetbus import client as client_module
from fleetbus.client import Client, _NotServedYet
from fleetbus.connection import NatsSettings
from fleetbus.errors import ServerOffline
from support.processes import Fleet


@pytest.fixture
async def client(fleet: Fleet):
    c = await Client.connect(NatsSettings(url=fleet.nats_url, token=fleet.token), requester="test")
    yield c
    await c.close()


async def test_a_server_added_just_now_answers_its_first_command(client: Client) -> None:
    for i in range(20):  # each one races the workers' registry watch
        await client.add_server({"name": f"fresh-{i}", "transport": "local"})
        result = await client.exec(f"fresh-{i}", ["true"])
        assert result.exit_code == 0


async def test_nobody_serving_a_new_never_served_server_is_worth_a_retry(client: Client) -> None:
    await client.add_server({"name": "unborn", "transport": "agent-outbound"})  # no agent: never served
    assert isinstance(await client._nobody_serves("unborn"), _NotServedYet)


async def test_only_a_server_served_since_a_moment_ago_is_worth_a_retry(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    await client.add_server({"name": "was-here", "transport": "local"})
    await client.exec("was-here", ["true"])  # served: online since just now
    assert isinstance(await client._nobody_serves("was-here"), _NotServedYet)
    monkeypatch.setattr(client_module, "JUST_REGISTERED_S", 0.0)  # a while later: offline at once
    assert type(await client._nobody_serves("was-here")) is ServerOffline
    await client.add_server({"name": "old-unborn", "transport": "agent-outbound"})
    assert type(await client._nobody_serves("old-unborn")) is ServerOffline


async def test_the_retry_sends_again_until_served_and_gives_up_in_time(client: Client,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def not_yet_twice(subject: str, body: dict[str, Any], timeout: float,
                            server: str | None = None) -> dict[str, Any]:
        calls.append(subject)
        if len(calls) <= 2:
            raise _NotServedYet("nobody serves fresh right now")
        return {"ok": True}

    monkeypatch.setattr(client, "_request", not_yet_twice)
    assert await client._server("fresh", "ping", {}, 5) == {"ok": True}
    assert len(calls) == 3

    async def never(subject: str, body: dict[str, Any], timeout: float, server: str | None = None) -> dict[str, Any]:
        calls.append(subject)
        raise _NotServedYet("nobody serves fresh right now")

    monkeypatch.setattr(client_module, "NOT_YET_SERVED_WAIT_S", 0.2)
    monkeypatch.setattr(client, "_request", never)
    calls.clear()
    with pytest.raises(ServerOffline):
        await asyncio.wait_for(client._server("fresh", "ping", {}, 5), 10)
    assert len(calls) >= 2
