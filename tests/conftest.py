"""Shared fixtures: a real nats-server, a real `fleetbus up`, and NATS clients for them."""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from support.natscluster import NatsCluster
from support.ops_helpers import stray_pids  # noqa: F401  (a fixture)
from support.processes import Fleet, NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture
def master_key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("FLEETBUS_MASTER_KEY", key)
    return key


@pytest.fixture
def prefix() -> str:
    """A fresh subject prefix per test, so tests sharing a nats-server never collide."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One `fleetbus up` (embedded NATS, core, every transport) shared by a test module."""
    stack = Fleet(tmp_path_factory.mktemp("fleet") / "home").start()
    yield stack
    stack.stop()


@pytest.fixture
async def fleet_nc(fleet: Fleet) -> AsyncIterator[NATS]:
    """A plain NATS client on the fleet's embedded NATS, as another system would use."""
    conn = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    yield conn
    await conn.close()


async def bus_request(nc: NATS, subject: str, body: Any, timeout: float = 30) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, data, timeout=timeout)
    return json.loads(msg.data)


@pytest.fixture
def bus():
    return bus_request


def pytest_configure(config: pytest.Config) -> None:
    # Tests must not pick up a developer's real fleet. FLEETBUS_TUNING stays, for this
    # process and the fleetbus processes the tests start: CI runs the suite once with it off.
    for key in list(os.environ):
        if key.startswith("FLEETBUS_") and key != "FLEETBUS_TUNING":
            del os.environ[key]
    # The plugin hosts, gateways and agent connections that tests run in this process are
    # tuned as in `fleetbus up` (the child watcher is left to pytest's event loops).
    from fleetbus import tuning

    tuning.apply(tuple(name for name in tuning.SERVER if name != "pidfd_child_watcher"))
    os.environ["HOME"] = os.environ.get("HOME", str(Path.home()))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster of real nats-servers on loopback (support/natscluster.py)."""
    nodes = NatsCluster(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()
