"""Issue 20's combined test: a NATS node and then a gateway die under a stream of commands.

Real processes throughout: a 3-node JetStream cluster (tests/support/natscluster.py),
`fleetbus core --replicas 3`, two `fleetbus worker --transports local,agent-outbound`
with a gateway each (their own homes, as on two machines), and `fleetbus-agent connect`
processes given both gateways. Three callers run `exec` with ids on `c1` (local, served
by both workers) and on every agent; each command appends a line to its own file. The
node leading the commands KV is killed and restarted; then the first gateway's worker
is killed with SIGKILL.

What must hold: no command ran twice; every attempt is `ok` or a code a caller can act
on (retried with the same id, or `lost`), never `internal`; the node loss's failing
window is bounded; every agent answers through the surviving gateway; the audit trail
has exactly one `ok` record for each command answered `ok` (and none for any other that
did not run), including those the killed worker answered while the audit stream could not
store them:
restarted on its home as systemd would, it sends them from its spool (auditspool.py).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fleetbus.client import Client
from fleetbus.errors import FleetbusError
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from support.agents import Agent
from support.auditread import audit_records
from support.natscluster import NatsCluster
from support.processes import Daemon, own_user, until, wait_for
from test_failover import RETRYABLE
from test_gateway_ha import Deployment, free_port, pings

# Answers a caller acts on without guessing: RETRYABLE ones it retries with the same id;
# `lost` (the worker running it died) it reads as "maybe ran" and never retries.
ACCEPTED = RETRYABLE | {"lost"}
LANES = 3
AGENTS = 4


@dataclass
class Attempt:
    command_id: str
    server: str
    at: float  # monotonic time the attempt ended
    outcome: str
    took: float


@dataclass
class Loop:
    servers: list[str]
    attempts: list[Attempt] = field(default_factory=list)
    finals: dict[str, Attempt] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def oks_since(self, index: int, server: str | None = None) -> int:
        return sum(a.outcome == "ok" and server in (None, a.server) for a in self.attempts[index:])


async def lane(fb: Client, lane_no: int, marks: Path, loop: Loop) -> None:
    n = 0
    while not loop.stop.is_set():
        server = loop.servers[(lane_no + n) % len(loop.servers)]
        n += 1
        command_id = f"ha-{lane_no}-{n}"
        argv = ["sh", "-c", f"echo ran >> {marks / command_id}"]
        for _ in range(60):  # retried with the same id, as a careful caller does
            sent = time.monotonic()
            try:
                await fb.exec(server, argv, timeout_s=10, command_id=command_id)
                outcome = "ok"
            except FleetbusError as exc:
                outcome = exc.code
            attempt = Attempt(command_id, server, time.monotonic(), outcome, time.monotonic() - sent)
            loop.attempts.append(attempt)
            if outcome not in RETRYABLE:
                break
            await asyncio.sleep(0.2)
        loop.finals[command_id] = attempt


async def ok_records(nc: NATS, prefix: str, wanted: set[str], timeout: float = 60) -> dict[str, int]:
    """How many `ok` exec records (not replays) the audit stream holds per command id,
    read until every wanted id has one."""
    records = await audit_records(nc, Names(prefix).audit_stream, f"{prefix}.v1.audit.*.exec", wanted, timeout)
    return {cid: n for cid, recs in records.items()
            if (n := sum(r["outcome"] == "ok" and not r["replayed"] for r in recs))}


async def test_a_node_and_a_gateway_die_and_no_command_runs_twice_or_fails_as_internal(
        cluster: NatsCluster, tmp_path: Path) -> None:
    prefix = "ha" + secrets.token_hex(4)
    env = cluster.fleet_env(prefix, tmp_path / "core-home")
    core = Daemon(["core", "--replicas", "3"], env, tmp_path / "core.log", "fleetbus core").start()
    dep = Deployment(env, tmp_path, core, [], [f"127.0.0.1:{free_port()}" for _ in range(2)])
    for i, listen in enumerate(dep.listens):  # two machines: each its own home and gateway
        dep.started.append(Daemon(
            ["worker", "--replicas", "3", "--transports", "local,agent-outbound", "--local-user", own_user(),
             "--gateway-listen", listen], {**env, "FLEETBUS_HOME": str(tmp_path / f"worker{i}")},
            tmp_path / f"worker{i}.log", "serving local"))
    agents: list[Agent] = []
    nc = await cluster.connect(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        with ThreadPoolExecutor(2) as pool:  # both at once: the deployment CA's race too
            list(pool.map(Daemon.start, dep.started))
        records = wait_for(lambda: (r := dep.records()) and len(r) == 2 and r, timeout=30, what="two gateways")
        by_address = {r["address"]: r for r in records}
        first, second = (by_address[listen] for listen in dep.listens)
        dep.cli("servers", "add", "c1", "--transport", "local", check=True)
        names = [f"ag{i}" for i in range(AGENTS)]
        agents = [Agent(tmp_path / f"agent-{name}", first["address"], first["ca_fingerprint"], dep.add(name),
                        more_gateways=[second["address"]]).start() for name in names]
        wait_for(lambda: all(pings(dep, ["c1", *names]).values()), timeout=60, what="c1 and every agent answering")

        fb = Client(nc, Names(prefix))
        loop = Loop(["c1", *names])
        lanes = [asyncio.create_task(lane(fb, i, marks, loop)) for i in range(LANES)]
        try:
            await until(lambda: loop.oks_since(0) >= 20, 60, "commands before the node loss")
            # The node leading the commands KV: its loss forces an election there.
            info = await nc.jetstream().stream_info(f"KV_{Names(prefix).commands_bucket}")
            leader = next(n for n in cluster.nodes if n.name == info.cluster.leader)
            node_killed = time.monotonic()
            await asyncio.to_thread(cluster.kill, leader)
            await asyncio.sleep(5)  # an election's length (4-9 s) of commands without the node
            await asyncio.to_thread(cluster.restart, leader)
            node_back = time.monotonic()
            after_node = len(loop.attempts)
            await until(lambda: all(loop.oks_since(after_node, s) >= 2 for s in loop.servers), 90,
                         "commands on every server after the restart")

            gateway_killed = time.monotonic()
            dep.started[0].stop(signal.SIGKILL)
            answered = await asyncio.to_thread(
                wait_for, lambda: all(pings(dep, names).values()) and time.monotonic(), 60,
                "every agent answering through the surviving gateway")
            after_gateway = len(loop.attempts)
            await until(lambda: all(loop.oks_since(after_gateway, s) >= 2 for s in loop.servers), 60,
                         "commands on every server after the gateway's death")
            loop_stopped = time.monotonic()
        finally:
            loop.stop.set()
            await asyncio.wait_for(asyncio.gather(*lanes), 120)

        def window(start: float, end: float) -> tuple[float, list[Attempt]]:
            """From the sending of the first attempt that failed to the end of the last."""
            failed = [a for a in loop.attempts if a.outcome != "ok" and start <= a.at < end]
            return (max(a.at for a in failed) - min(a.at - a.took for a in failed) if failed else 0.0), failed

        node_window, node_failed = window(node_killed, gateway_killed)
        gw_window, gw_failed = window(gateway_killed, float("inf"))
        codes = {a.outcome for a in loop.attempts} - {"ok"}
        print(f"\n{len(loop.finals)} commands, {len(loop.attempts)} attempts; node loss: {len(node_failed)} "
              f"failed attempts within {node_window:.2f} s; gateway kill: {len(gw_failed)} failed attempts "
              f"within {gw_window:.2f} s ({', '.join(sorted(codes)) or 'none'}); every agent answered "
              f"through the other gateway {answered - gateway_killed:.1f} s after the kill; the node was back "
              f"after {node_back - node_killed:.1f} s, commands ran everywhere again "
              f"{gateway_killed - node_back:.1f} s later; the lanes ended "
              f"{time.monotonic() - loop_stopped:.1f} s after being told to")

        assert "internal" not in codes, [a for a in loop.attempts if a.outcome == "internal"][:5]
        assert codes <= ACCEPTED, codes
        # The target is 2 s; asserted only bounded, generously: one attempt was seen to
        # wait its client's whole wait (40 s here) in a node loss, likely a request lost
        # with the worker's NATS node (docs/operations.md, "When a NATS node dies").
        assert node_window <= 45, node_window
        # No command ran twice; each answered `ok` ran exactly once; only a `lost` one may
        # have run without its caller knowing.
        runs = {p.name: p.read_text().count("ran") for p in marks.iterdir()}
        assert all(count == 1 for count in runs.values()), {k: v for k, v in runs.items() if v != 1}
        finals = {cid: a.outcome for cid, a in loop.finals.items()}
        ok_ids = {cid for cid, outcome in finals.items() if outcome == "ok"}
        assert ok_ids <= set(runs), ok_ids - set(runs)
        assert set(runs) <= {cid for cid, outcome in finals.items() if outcome in ("ok", "lost")}
        # The agents live on through the second gateway.
        assert all(pings(dep, names).values())
        # A status is written just after the subscription that answers the ping: waited for.
        wait_for(lambda: {dep.statuses()[n].get("served_by") for n in names} == {second["worker"]}, timeout=20,
                 what="every agent's status naming the surviving gateway")
        # Restarted as systemd would (Restart=on-failure): it sends the audit records of the
        # commands it answered that the stream had not stored when it was killed.
        dep.started[0].start()

        # One `ok` record for every command answered `ok`, none twice, none for others.
        found = await ok_records(nc, prefix, ok_ids)
        assert all(count == 1 for count in found.values()), {k: v for k, v in found.items() if v != 1}
        # A `lost` command may have one too: it ran and ended while its worker lived, and
        # the worker died before its caller (or a retry) had the reply; the record, kept in
        # the worker's spool, tells what the caller could not.
        lost_that_ran = {cid for cid, outcome in finals.items() if outcome == "lost"} & set(runs)
        assert set(found) <= ok_ids | lost_that_ran, set(found) - ok_ids
        assert ok_ids <= set(found), sorted(ok_ids - set(found))
    finally:
        await nc.close()
        for agent in agents:
            agent.stop()
        for daemon in dep.started:
            daemon.stop()
        core.stop()
