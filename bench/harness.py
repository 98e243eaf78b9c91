"""Real parts for benchmarks: a `fleetbus up`, agent swarms, a client, process stats.

Reuses the test suite's process helpers (tests/support) so benchmarks and tests start
the stack the same way. Everything listens on loopback ports chosen at run time.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fleetbus.client import Client
from fleetbus.connection import NatsSettings
from support.agents import Agent, gateway_of, start_swarm
from support.processes import Fleet, stop_process

__all__ = [
    "Agent",
    "Fleet",
    "Stack",
    "cpu_seconds",
    "gateway_of",
    "metric_samples",
    "percentile",
    "rss_bytes",
    "shipped_agent",
    "start_swarm",
    "stop_process",
]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def metric_samples(url: str | None, prefix: str) -> dict[str, float]:
    """The samples of a Prometheus endpoint whose name starts with ``prefix`` ({} if none answers)."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def shipped_agent(workdir: Path) -> list[str]:
    """The agent as it is deployed: the zipapp `fleetbus agent build` writes, run the
    way ops/systemd runs it (``python3 -I -S``, isolated from site-packages)."""
    from fleetbus_agent.build import build_zipapp

    pyz = workdir / "fleetbus-agent.pyz"
    if not pyz.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        build_zipapp(pyz)
    return [sys.executable, "-I", "-S", str(pyz)]


@dataclass
class Stack:
    """A running `fleetbus up` and a connected Python client (the public client library)."""

    fleet: Fleet
    client: Client
    swarms: list[Any] = field(default_factory=list)

    @classmethod
    async def start(cls, workdir: Path, *extra: str, env: dict[str, str] | None = None) -> Stack:
        fleet = await asyncio.to_thread(
            lambda: Fleet(workdir / "home", extra_args=["--check-interval", "0", *extra],
                          env=dict(env or {})).start())
        settings = NatsSettings(url=fleet.nats_url, token=fleet.token)
        client = await Client.connect(settings, requester="bench")
        return cls(fleet, client)

    async def add_agents(self, names: list[str]) -> list[str]:
        keys = []
        for name in names:
            reply = await self.client.add_server({"name": name, "transport": "agent-outbound"})
            keys.append(reply["key"])
        return keys

    async def swarm(self, workdir: Path, keys: list[str], processes: int) -> None:
        gw = await asyncio.to_thread(gateway_of, self.fleet)
        for i in range(processes):
            part = keys[i::processes]
            if part:
                self.swarms.append(start_swarm(workdir / f"swarm{i}", gw["address"], gw["fingerprint"], part))

    def gateway_metrics(self, prefix: str) -> dict[str, float]:
        """The samples of `fleetbus up`'s /metrics whose name starts with ``prefix``."""
        return metric_samples(self.fleet.metrics_url, prefix)

    def agents_connected(self) -> int | None:
        """The gateway's own count of connected agents (its /metrics gauge), or None."""
        value = self.gateway_metrics("fleetbus_gateway_agents_connected ").get("fleetbus_gateway_agents_connected")
        return None if value is None else int(value)

    async def wait_answering(self, names: list[str], timeout: float = 300,
                             held: Callable[[], int | None] | None = None) -> None:
        """Until every one of ``names`` answers a ping; ``held`` counts the agents the
        gateway holding them has (default: `fleetbus up`'s own gateway)."""
        pending = set(names)
        deadline = time.monotonic() + timeout
        held = held or self.agents_connected
        # Ping only once the gateway holds them all. Pinging agents that are not connected
        # yet costs a no-responders reply and an admin lookup each, thousands a second in
        # the same process and JetStream the connecting agents need (key check, status):
        # the bench itself slowed the storm it measures. The pings below still decide.
        while time.monotonic() < deadline:
            count = await asyncio.to_thread(held)
            if count is None or count >= len(names):
                break
            await asyncio.sleep(0.5)
        sem = asyncio.Semaphore(512)

        async def ping(name: str) -> str | None:
            async with sem:
                try:
                    await self.client.ping(name, timeout_s=10)
                    return name
                except Exception:
                    return None

        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} agents never answered")
            done = await asyncio.gather(*(ping(n) for n in pending))
            pending -= {n for n in done if n}
            if pending:
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await self.client.close()
        for proc in self.swarms:
            stop_process(proc)
        await asyncio.to_thread(self.fleet.stop)

    @property
    def pid(self) -> int:
        return self.fleet.proc.pid  # type: ignore[union-attr]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": statistics.fmean(values) if values else float("nan"), "n": len(values)}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
