"""Command-id claims of commands that never started, with a real outbound agent and
across a restart of `fleetbus up`.

A server allows one command at a time. A first command runs (and keeps the slot); a
second, with an id, waits for the slot. Then the agent is killed, or the waiting
command is cancelled, or the worker stops: the first was interrupted on the server,
the second never reached it. A retry of the second runs it; a retry of the first gets
its stored reply and runs nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families
from support.agents import Agent, gateway_of, wait_online
from support.processes import Fleet

DEADLINE_S = 30.0


def queued(fleet: Fleet, transport: str) -> float:
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "fleetbus_commands_queued":
            for sample in family.samples:
                if sample.labels.get("transport") == transport:
                    return sample.value
    return 0.0


async def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def exec_(nc: NATS, server: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(f"fleetbus.v1.servers.{server}.exec", json.dumps(body).encode(),
                           timeout=DEADLINE_S + 30)
    return json.loads(msg.data)


@pytest.fixture
def pids_to_kill() -> Iterator[list[Path]]:
    """Processes a killed agent leaves behind, by the pid files their commands wrote."""
    files: list[Path] = []
    yield files
    for file in files:
        try:
            os.kill(int(file.read_text().strip()), signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass


class OneSlot:
    """An agent-outbound server with max_concurrency 1, its agent, and two commands:
    ``first`` (runs until stopped) and ``second`` (waits for the slot), each leaving a
    line in its log file each time it runs."""

    def __init__(self, fleet: Fleet, tmp_path: Path, pids_to_kill: list[Path]) -> None:
        self.fleet = fleet
        self.tmp_path = tmp_path
        self.server = "claims-" + secrets.token_hex(3)
        added = fleet.cli("servers", "add", self.server, "--transport", "agent-outbound",
                          "--max-concurrency", "1", "--json")
        assert added.returncode == 0, added.stderr
        self.key = json.loads(added.stdout)["key"]
        self.gateway = gateway_of(fleet)
        self.agents: list[Agent] = []
        self.first_log, self.second_log = tmp_path / "first.log", tmp_path / "second.log"
        pid_file = tmp_path / "first.pid"
        pids_to_kill.append(pid_file)
        self.first = {"id": "first-" + secrets.token_hex(4), "timeout_s": 120,
                      "shell": f"echo $$ > {pid_file}; echo ran >> {self.first_log}; exec sleep 120"}
        self.second = {"id": "second-" + secrets.token_hex(4), "timeout_s": 60,
                       "shell": f"echo ran >> {self.second_log}"}

    async def agent(self) -> Agent:
        agent = Agent(self.tmp_path / f"agent{len(self.agents)}", self.gateway["address"],
                      self.gateway["fingerprint"], self.key).start()
        self.agents.append(agent)
        await asyncio.to_thread(wait_online, self.fleet, self.server)
        return agent

    async def first_running_second_waiting(self, nc: NATS) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
        first = asyncio.create_task(exec_(nc, self.server, self.first))
        await until(self.first_log.exists, "the first command to start on the agent")
        second = asyncio.create_task(exec_(nc, self.server, self.second))
        await until(lambda: queued(self.fleet, "agent-outbound") == 1, "the second to wait for the slot")
        return first, second

    async def retries_run_only_what_never_started(self, nc: NATS, interrupted: dict[str, Any]) -> None:
        # The second never reached the server: its claim was dropped, so the retry runs it.
        retried = await exec_(nc, self.server, self.second)
        assert retried["ok"] and retried["exit_code"] == 0, retried
        assert self.second_log.read_text() == "ran\n"
        # ... once: a further retry is answered from the stored reply.
        assert await exec_(nc, self.server, self.second) == retried
        assert self.second_log.read_text() == "ran\n"
        # The first started on the server: its retry gets the stored error and runs nothing.
        assert await exec_(nc, self.server, self.first) == interrupted
        assert self.first_log.read_text() == "ran\n"

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()


@pytest.fixture
def one_slot(fleet: Fleet, tmp_path: Path, pids_to_kill: list[Path]) -> Iterator[OneSlot]:
    setup = OneSlot(fleet, tmp_path, pids_to_kill)
    yield setup
    setup.stop()


async def test_after_the_agent_drops_the_waiting_command_runs_on_retry_and_the_running_one_does_not(
        one_slot: OneSlot, fleet_nc: NATS) -> None:
    agent = await one_slot.agent()
    first_reply, second_reply = await one_slot.first_running_second_waiting(fleet_nc)
    agent.stop(signal.SIGKILL)
    interrupted, never_started = await asyncio.wait_for(asyncio.gather(first_reply, second_reply), DEADLINE_S)
    assert not interrupted["ok"] and not never_started["ok"]
    assert never_started["error"]["code"] in ("cancelled", "server_offline"), never_started
    assert not one_slot.second_log.exists()
    await one_slot.agent()
    await one_slot.retries_run_only_what_never_started(fleet_nc, interrupted)


async def test_a_command_cancelled_while_waiting_for_its_slot_runs_on_retry(
        one_slot: OneSlot, fleet_nc: NATS) -> None:
    await one_slot.agent()
    first_reply, second_reply = await one_slot.first_running_second_waiting(fleet_nc)
    cancel = f"fleetbus.v1.servers.{one_slot.server}.cancel"
    await fleet_nc.request(cancel, json.dumps({"id": one_slot.second["id"]}).encode(), timeout=10)
    never_started = await asyncio.wait_for(second_reply, DEADLINE_S)
    assert never_started["error"]["code"] == "cancelled", never_started
    await fleet_nc.request(cancel, json.dumps({"id": one_slot.first["id"]}).encode(), timeout=10)
    interrupted = await asyncio.wait_for(first_reply, DEADLINE_S)
    assert interrupted["error"]["code"] == "cancelled", interrupted
    assert not one_slot.second_log.exists()
    await one_slot.retries_run_only_what_never_started(fleet_nc, interrupted)


async def test_a_command_queued_when_the_worker_stops_runs_on_retry_after_the_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fleet = await asyncio.to_thread(Fleet(home).start)
    marker, second_log = tmp_path / "first-started", tmp_path / "second.log"
    script = f"open({str(marker)!r}, 'a').write('x'); import time; time.sleep(120)"
    first = {"id": "first-" + secrets.token_hex(4), "timeout_s": 150, "argv": [sys.executable, "-c", script]}
    second = {"id": "second-" + secrets.token_hex(4), "timeout_s": 10, "shell": f"echo ran >> {second_log}"}
    try:
        added = await asyncio.to_thread(fleet.cli, "servers", "add", "one-slot", "--transport", "local",
                                        "--max-concurrency", "1")
        assert added.returncode == 0, added.stderr
        await until(lambda: fleet.cli("ping", "one-slot").returncode == 0, "one-slot served")
        nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
        try:
            first_reply = asyncio.create_task(exec_(nc, "one-slot", first))
            await until(lambda: marker.exists() or first_reply.done(), "the first command to start")
            assert not first_reply.done(), first_reply.result()
            second_reply = asyncio.create_task(exec_(nc, "one-slot", second))
            await until(lambda: queued(fleet, "local") == 1, "the second to wait for the slot")
            await asyncio.to_thread(fleet.stop)
            never_started = await asyncio.wait_for(second_reply, DEADLINE_S)
            assert never_started["error"]["code"] == "cancelled", never_started
            first_reply.cancel()
        finally:
            await nc.close()
        assert not second_log.exists()

        # The claim was dropped, not left "running": after the restart a retry runs it.
        fleet = await asyncio.to_thread(Fleet(home).start)
        nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
        try:
            await until(lambda: fleet.cli("ping", "one-slot").returncode == 0, "one-slot served again")
            retried = await exec_(nc, "one-slot", second)
            assert retried["ok"] and retried["exit_code"] == 0, retried
            assert second_log.read_text() == "ran\n"
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(fleet.stop)
