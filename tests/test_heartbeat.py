"""Liveness from protocol version 3: the agent pings, the controller only listens.

The wire-level tests run both ends of real TLS connections in this process (the
connection helpers of test_agent_protocol); the last ones run `fleetbus up` and a real
agent process and freeze one of them with SIGSTOP. Intervals are tiny so several pass
within a test; the only time limits are the documented bounds, with margin.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from fleetbus_base.wire import (
    Connection,
    agent_handshake,
)
from fleetbus_base.wire.connection import (
    AGENT_DEAD_AFTER_HEARTBEATS,
    DEAD_AFTER_HEARTBEATS,
    QUIET_PONG_HEARTBEATS,
)
from support.agents import Agent, add_agent_server, gateway_of, wait_online
from support.ops_helpers import wait_until
from support.processes import Fleet, wait_for
from test_agent_protocol import (
    KEY,
    Ops,
    Tls,
    agent_of_a_silent_controller,
    connected,
    dial,
    final_event,
    listener,
    make_tls,
    started_controllers,
)

MARGIN_S = 2.0
"""Added to every bound: a loaded machine runs timers late, never early."""


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


async def test_an_idle_link_stays_up_with_the_controller_only_listening(tls: Tls) -> None:
    interval = 0.1
    async with connected(tls, heartbeat_s=interval) as pair:
        assert pair.controller.version == pair.agent.version == 3
        started = time.monotonic()
        # Ten intervals with no traffic of its own: the agent's pings carry it.
        await wait_until(lambda: pair.agent.stats.pings_sent >= 10, timeout=10 * interval + 10)
        elapsed = time.monotonic() - started
        assert not pair.controller.closed and not pair.agent.closed
        assert pair.controller.stats.pings_sent == 0
        # Its only frames are pongs, at most one per QUIET_PONG_HEARTBEATS silent intervals,
        # and at least one: the agent's proof that the controller still runs.
        pongs = pair.controller.stats.frames_sent
        assert 1 <= pongs <= elapsed / (QUIET_PONG_HEARTBEATS * interval) + 1
        assert pair.agent.stats.frames_received == pongs
        assert (await final_event(pair.controller.open_stream("ping"))).kind == "done"


@pytest.mark.parametrize("old_side", ["controller", "agent"])
async def test_an_older_peer_keeps_the_old_rules(tls: Tls, old_side: str) -> None:
    # A controller speaking up to version 2, or an agent speaking only version 1: the
    # link runs the old rules, the controller pinging and the agent answering.
    versions = {"controller_versions": (1, 2)} if old_side == "controller" else {"agent_versions": (1,)}
    async with connected(tls, heartbeat_s=0.1, **versions) as pair:
        assert pair.controller.version == pair.agent.version == (2 if old_side == "controller" else 1)
        await wait_until(lambda: pair.controller.stats.pings_sent >= 6, timeout=10)
        assert not pair.controller.closed and not pair.agent.closed
        assert pair.agent.stats.pings_sent == 0
        assert pair.agent.stats.frames_sent >= 5  # pongs: every ping is answered
        assert (await final_event(pair.controller.open_stream("ping"))).kind == "done"


async def test_a_frozen_agent_is_dropped_within_the_bound_and_a_healthy_one_is_not(tls: Tls) -> None:
    interval = 0.2
    bound = DEAD_AFTER_HEARTBEATS * interval
    conns: asyncio.Queue[Connection] = asyncio.Queue()
    async with listener(tls, started_controllers(conns, heartbeat_s=interval)) as port:
        # A healthy agent, and one that handshakes and then neither reads nor writes.
        reader, writer = await dial(tls, port)
        welcome = await agent_handshake(reader, writer, {"method": "key", "key": KEY})
        healthy = Connection.from_welcome(reader, writer, welcome, Ops())
        healthy.start()
        healthy_controller = await asyncio.wait_for(conns.get(), 5)
        frozen_reader, frozen_writer = await dial(tls, port)
        await agent_handshake(frozen_reader, frozen_writer, {"method": "key", "key": KEY})
        frozen_writer.transport.pause_reading()
        frozen = await asyncio.wait_for(conns.get(), 5)
        assert frozen.version == 3
        stream = frozen.open_stream("exec", {"argv": ["x"]})
        started = time.monotonic()
        final = await asyncio.wait_for(final_event(stream), bound + MARGIN_S)
        elapsed = time.monotonic() - started
        assert final.error == {"code": "server_offline", "message": "agent connection lost: heartbeat timeout"}
        assert elapsed >= bound - interval  # waited out the bound (the open frame reset it)
        # The healthy idle link outlives several bounds.
        await asyncio.sleep(3 * bound)
        assert not healthy_controller.closed and not healthy.closed
        assert healthy_controller.stats.pings_sent == 0
        await healthy.close("test over")
        frozen_writer.close()


async def test_a_hung_controller_is_noticed_by_the_agent_within_its_bound(tls: Tls) -> None:
    interval = 0.2
    bound = AGENT_DEAD_AFTER_HEARTBEATS * interval
    agent, elapsed = await agent_of_a_silent_controller(tls, interval, bound + MARGIN_S)
    assert agent.close_reason == "controller connection lost: heartbeat timeout"
    assert elapsed >= bound - interval
    assert agent.stats.pings_sent >= AGENT_DEAD_AFTER_HEARTBEATS - 2  # one per silent interval


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")
async def test_both_ends_set_tcp_keepalive_as_a_belt(tls: Tls) -> None:
    interval = 2.0
    async with connected(tls, heartbeat_s=interval) as pair:
        for conn in (pair.controller, pair.agent):
            sock = conn._writer.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == conn.dead_after_s
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == conn.dead_after_s * 1000
        assert pair.controller.dead_after_s == DEAD_AFTER_HEARTBEATS * interval
        assert pair.agent.dead_after_s == AGENT_DEAD_AFTER_HEARTBEATS * interval


# ------------------------------------------------------------- real processes

HEARTBEAT_S = 0.5


@pytest.fixture
def quick_fleet(tmp_path: Path):
    fleet = Fleet(tmp_path / "home", extra_args=["--transport-setting", f"agent-outbound.heartbeat_s={HEARTBEAT_S}"])
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def _disconnects(fleet: Fleet, name: str) -> list[str]:
    return [line for line in fleet.output().splitlines() if f"agent {name} disconnected" in line]


def test_a_stopped_agent_process_is_dropped_by_the_gateway_within_the_bound(
        quick_fleet: Fleet, tmp_path: Path) -> None:
    gw = gateway_of(quick_fleet)
    agents = {name: Agent(tmp_path / name, gw["address"], gw["fingerprint"], add_agent_server(quick_fleet, name))
              for name in ("frozen", "idle")}
    try:
        for name, agent in agents.items():
            agent.start()
            wait_online(quick_fleet, name)
        frozen = agents["frozen"].proc
        assert frozen is not None
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            bound = DEAD_AFTER_HEARTBEATS * HEARTBEAT_S
            lines = wait_for(lambda: _disconnects(quick_fleet, "frozen"), timeout=bound + MARGIN_S,
                             what="the gateway dropping the stopped agent")
            assert "agent connection lost: heartbeat timeout" in lines[0]
            ping = quick_fleet.cli("ping", "frozen")
            assert ping.returncode != 0 and "its agent is not connected" in ping.stderr
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        # The idle one was never dropped, in all those intervals, and still answers.
        assert _disconnects(quick_fleet, "idle") == []
        assert agents["idle"].log().count("connected to ") == 1
        assert quick_fleet.cli("ping", "idle").returncode == 0
    finally:
        for agent in agents.values():
            agent.stop()


def test_a_stopped_gateway_is_noticed_by_the_agent_within_its_bound(quick_fleet: Fleet, tmp_path: Path) -> None:
    gw = gateway_of(quick_fleet)
    agent = Agent(tmp_path / "a1", gw["address"], gw["fingerprint"], add_agent_server(quick_fleet, "a1")).start()
    try:
        wait_online(quick_fleet, "a1")
        assert quick_fleet.proc is not None
        os.kill(quick_fleet.proc.pid, signal.SIGSTOP)  # a hung gateway: its kernel still answers
        try:
            bound = AGENT_DEAD_AFTER_HEARTBEATS * HEARTBEAT_S
            wait_for(lambda: "ended: controller connection lost: heartbeat timeout" in agent.log(),
                     timeout=bound + MARGIN_S, what="the agent giving the gateway up")
        finally:
            os.kill(quick_fleet.proc.pid, signal.SIGCONT)
    finally:
        agent.stop()
