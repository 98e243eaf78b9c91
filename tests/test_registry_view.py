"""The job service's registry view: current as of the registry's last write, on any core.

A server registered through another connection (another core on the same NATS) a
moment ago must be in the view's answer at once, however far behind its watch is; a
removed or changed server must be gone or changed; and a view whose consumer was lost
still answers with the registry as it is.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import nats
import pytest
from fleetbus import registryview
from fleetbus.jetstream import State, open_state
from fleetbus.records import Server
from fleetbus.registry import Registry
from fleetbus.registryview import RegistryView
from fleetbus.replies import Replies
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from support.processes import NatsServer


@pytest.fixture
async def state(nc: NATS) -> AsyncIterator[State]:
    yield await open_state(nc, Names("t" + secrets.token_hex(4)))


@pytest.fixture
async def other(nats_server: NatsServer, state: State) -> AsyncIterator[Registry]:
    """The same registry through a connection of its own, as another core has it."""
    conn = await nats.connect(nats_server.url)
    theirs = await open_state(conn, state.names)
    yield Registry(theirs.servers, theirs.status)
    await conn.close()


@pytest.fixture(params=["reply inbox", "stream_info"])
async def view(request: pytest.FixtureRequest, nc: NATS, state: State) -> AsyncIterator[RegistryView]:
    """The view as the job service has it (its check sent through a reply inbox), and
    without one (nats-py's stream_info)."""
    requests = Replies(nc) if request.param == "reply inbox" else None
    made = RegistryView(state.js, Registry(state.servers, state.status), state.names.servers_bucket, requests)
    await made.start()
    yield made
    await made.aclose()
    if requests is not None:
        await requests.close()


def _names(servers: list[Server]) -> set[str]:
    return {s.name for s in servers}


async def test_a_burst_registered_elsewhere_is_seen_at_once(view: RegistryView, other: Registry) -> None:
    assert await view.servers() == []
    for round_ in range(3):
        batch = [f"r{round_}-{i:03d}" for i in range(150)]
        await asyncio.gather(*(other.add(Server(name=n, transport="local")) for n in batch))
        seen = _names(await view.servers())
        assert set(batch) <= seen, f"round {round_}: {len(set(batch) - seen)} missing"


async def test_a_lagging_watch_is_waited_for(view: RegistryView, other: Registry,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Every change reaches the view 50 ms late, as on a loaded core.
    apply = view._apply
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(view, "_apply", lambda msg: loop.call_later(0.05, apply, msg))
    for name in ("a", "b", "c"):
        await other.add(Server(name=name, transport="local"))
        assert name in _names(await view.servers())
    await other.remove("b")
    assert _names(await view.servers()) == {"a", "c"}


async def test_changes_and_removals_are_seen(view: RegistryView, other: Registry) -> None:
    await other.add(Server(name="web1", transport="local", roles=["web"]))
    await other.add(Server(name="db1", transport="local"))
    assert _names(await view.servers()) == {"web1", "db1"}
    await other.add(Server(name="web1", transport="local", roles=["db"]), replace=True)
    await other.remove("db1")
    servers = await view.servers()
    assert _names(servers) == {"web1"}
    assert servers[0].roles == ["db"]


async def test_a_lost_watch_still_answers_and_recovers(view: RegistryView, other: Registry, state: State,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registryview, "CATCH_UP_S", 0.2)
    await other.add(Server(name="a", transport="local"))
    assert _names(await view.servers()) == {"a"}
    stream = f"KV_{state.names.servers_bucket}"
    for consumer in await state.js.consumers_info(stream):  # as a server that dropped it
        await state.js.delete_consumer(stream, consumer.name)
    await other.add(Server(name="b", transport="local"))
    assert _names(await view.servers()) == {"a", "b"}
    await other.add(Server(name="c", transport="local"))
    assert _names(await view.servers()) == {"a", "b", "c"}
