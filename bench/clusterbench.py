"""Issue 20's figures: fleetbus on a 3-node NATS cluster, and gateways that die.

- **commands failing while one of three NATS nodes is killed**: callers run `exec` with
  ids on a `local` server, retrying a retryable answer with the same id; the node leading
  the commands KV is killed with SIGKILL and restarted. The figure is the time from the
  sending of the first attempt that failed to the end of the last (0 when none failed),
  and how many were `internal`.
- **`exec true` with an id on a 3-node cluster (R3), p50**, against the same on the run's
  `fleetbus up` (one embedded NATS), alternating.
- **agents of a killed gateway answering through the other**: bench/gatewayhabench.py's
  measurement, unchanged, at this run's size.

The cluster is the test suite's (tests/support/natscluster.py: three nats-servers on
loopback, JetStream, a token); bench/harness.py already puts tests/ on the import path,
so it is imported, not copied. The core and worker are separate processes started with
`--replicas 3`, as docs/operations.md runs them.

    .venv/bin/python bench/run.py --only cluster [--quick | --smoke]
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from figures import MS, Row, _interleaved
from fleetbus.client import Client
from fleetbus.connection import NatsSettings, connect
from fleetbus.errors import FleetbusError
from fleetbus.subjects import Names
from gatewayhabench import measure as gateway_ha
from harness import Stack, percentile
from support.natscluster import NatsCluster
from support.processes import Daemon, own_user, until

# Codes a caller retries with the same id (docs/bus-api.md, "Error codes").
RETRYABLE = {"server_offline", "transport_error", "timeout", "busy"}


@dataclass(frozen=True)
class ClusterSizes:
    exec_n: int
    lanes: int  # callers running commands through the node loss
    down_s: float  # how long the killed node stays down (an election takes 4-9 s)
    ha_agents: int
    ha_processes: int

    @classmethod
    def of(cls, mode: str) -> ClusterSizes:
        if mode == "smoke":
            return cls(exec_n=20, lanes=2, down_s=2.0, ha_agents=10, ha_processes=1)
        if mode == "quick":
            return cls(exec_n=200, lanes=3, down_s=8.0, ha_agents=200, ha_processes=2)
        return cls(exec_n=2000, lanes=3, down_s=10.0, ha_agents=1000, ha_processes=4)


@dataclass
class ClusterFleet:
    cluster: NatsCluster
    client: Client
    names: Names
    daemons: list[Daemon]


@contextlib.asynccontextmanager
async def cluster_fleet(work: Path) -> AsyncIterator[ClusterFleet]:
    """Three NATS nodes, `fleetbus core --replicas 3`, one `fleetbus worker --replicas 3
    --transports local` and a registered `local` server c1, served."""
    cluster = NatsCluster(work / "cluster")
    daemons: list[Daemon] = []
    client: Client | None = None
    try:
        await asyncio.to_thread(cluster.start)
        names = Names("bc" + secrets.token_hex(4))
        env = cluster.fleet_env(names.prefix, work / "cluster-home")
        for args, ready in ((["core", "--replicas", "3", "--check-interval", "0"], "fleetbus core"),
                            (["worker", "--replicas", "3", "--transports", "local", "--local-user", own_user()],
                             "serving local")):
            daemons.append(Daemon(args, env, work / f"cluster-{args[0]}.log", ready))
            await _start(daemons[-1])
        # Reconnecting forever, as a long-running caller does, to ride out the node loss.
        settings = NatsSettings(url=cluster.urls, token=cluster.token, prefix=names.prefix)
        client = Client(await connect(settings, "fleetbus-bench"), names, "bench")
        await client.add_server({"name": "c1", "transport": "local"})
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.ping("c1", timeout_s=5)
                break
            except FleetbusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        yield ClusterFleet(cluster, client, names, daemons)
    finally:
        if client is not None:
            await client.close()
        for daemon in reversed(daemons):
            await asyncio.to_thread(daemon.stop)
        await asyncio.to_thread(cluster.stop)


async def _start(daemon: Daemon, tries: int = 5) -> None:
    """Start ``daemon``; again, a second later, when JetStream could not place R3 state
    yet: a cluster whose meta leader was just elected can still count a peer offline
    for a moment, and the first process to start creates the state."""
    for attempt in range(tries):
        try:
            await asyncio.to_thread(daemon.start)
            return
        except RuntimeError as exc:
            if "no suitable peers" not in str(exc) or attempt == tries - 1:
                raise
            await asyncio.sleep(1)


async def exec_p50_rows(fleet: ClusterFleet, stack: Stack, n: int) -> list[Row]:
    async def on_cluster() -> None:
        result = await fleet.client.exec("c1", ["true"], command_id=uuid.uuid4().hex)
        assert result.exit_code == 0

    async def on_embedded() -> None:
        result = await stack.client.exec("local", ["true"], command_id=uuid.uuid4().hex)
        assert result.exit_code == 0

    ours, theirs = await _interleaved(on_cluster, on_embedded, n)
    p50, base = percentile(ours, 50) * MS, percentile(theirs, 50) * MS
    return [Row("exec true with an id on a 3-node cluster (R3), p50", p50, base, "ms", "<= 1.5x",
                p50 <= 1.5 * base, note="baseline: the same on one embedded NATS (fleetbus up)")]


@dataclass
class _Loop:
    ended: list[tuple[float, str, float]] = field(default_factory=list)  # (end, outcome, took)
    commands: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def oks_since(self, index: int) -> int:
        return sum(outcome == "ok" for _, outcome, _ in self.ended[index:])


async def _lane(client: Client, loop: _Loop) -> None:
    while not loop.stop.is_set():
        command_id = uuid.uuid4().hex
        loop.commands += 1
        for _ in range(100):  # retried with the same id, as a careful caller does
            sent = time.monotonic()
            try:
                await client.exec("c1", ["true"], timeout_s=30, command_id=command_id)
                outcome = "ok"
            except FleetbusError as exc:
                outcome = exc.code
            loop.ended.append((time.monotonic(), outcome, time.monotonic() - sent))
            if outcome not in RETRYABLE:
                break
            await asyncio.sleep(0.05)


async def node_loss_rows(fleet: ClusterFleet, sizes: ClusterSizes) -> list[Row]:
    loop = _Loop()
    lanes = [asyncio.create_task(_lane(fleet.client, loop)) for _ in range(sizes.lanes)]
    try:
        await until(lambda: loop.oks_since(0) >= 20, 60, "commands before the node loss")
        # The node leading the commands KV: its loss forces an election there.
        info = await fleet.client.nc.jetstream().stream_info(f"KV_{fleet.names.commands_bucket}")
        leader = next(n for n in fleet.cluster.nodes if n.name == info.cluster.leader)
        await asyncio.to_thread(fleet.cluster.kill, leader)
        await asyncio.sleep(sizes.down_s)
        await asyncio.to_thread(fleet.cluster.restart, leader)
        after = len(loop.ended)
        await until(lambda: loop.oks_since(after) >= 20, 90, "commands after the restart")
    finally:
        loop.stop.set()
        await asyncio.wait_for(asyncio.gather(*lanes), 120)
    # From the moment the first failing attempt was sent to the end of the last: a caller
    # whose attempt waited 60 s and then failed saw 60 s of failure, not none.
    failed = [(end - took, end) for end, outcome, took in loop.ended if outcome != "ok"]
    internal = sum(outcome == "internal" for _, outcome, _ in loop.ended)
    window = max(end for _, end in failed) - min(start for start, _ in failed) if failed else 0.0
    _, slowest_outcome, slowest = max(loop.ended, key=lambda e: e[2])
    codes = ", ".join(sorted({outcome for _, outcome, _ in loop.ended} - {"ok"})) or "none"
    return [Row("commands failing while one of three NATS nodes is killed", window, None, "s",
                "<= 2 s window, 0 internal", window <= 2.0 and internal == 0,
                note=f"{internal} internal; {len(failed)} failed attempts ({codes}) of {loop.commands} "
                     f"commands; slowest attempt {slowest:.1f} s ({slowest_outcome})")]


async def gateway_ha_rows(work: Path, sizes: ClusterSizes) -> list[Row]:
    result = await gateway_ha(work / "gatewayha", sizes.ha_agents, sizes.ha_processes)
    seconds = float(result["all_answer_through_b_after_kill_s"])
    return [Row(f"agents of a killed gateway answering through the other ({result['agents']} agents)", seconds,
                None, "s", "<= 10 s for 1,000", seconds <= 10.0,
                note=f"{result['on_gateway_a_when_killed']} on the killed one; gateway info dropped it after "
                     f"{result['gateway_info_drops_a_after_s']} s")]


async def cluster_rows(stack: Stack, work: Path, mode: str) -> list[Row]:
    """Every figure of this module; ``stack`` is the run's `fleetbus up` (the baseline)."""
    sizes = ClusterSizes.of(mode)
    rows: list[Row] = []
    async with cluster_fleet(work) as fleet:
        rows += await exec_p50_rows(fleet, stack, sizes.exec_n)
        rows += await node_loss_rows(fleet, sizes)
    rows += await gateway_ha_rows(work, sizes)
    return rows
