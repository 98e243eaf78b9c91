"""A NATS node dies under a stream of commands: a real 3-node JetStream cluster
(tests/support/natscluster.py), `fleetbus core --replicas 3`, a worker, and commands
with ids that each leave a side-effect file, while the node leading the commands KV is
killed and restarted.

What must hold: no attempt is answered `internal`; every attempt is `ok` or a code a
caller retries; retried with the same id, no command runs twice; the audit trail has a
record for exactly the commands that ran. The window in which attempts failed is
printed (measured, not asserted).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetbus.client import Client
from fleetbus.errors import FleetbusError
from fleetbus.subjects import Names
from support.auditread import audit_records
from support.natscluster import NatsCluster
from support.processes import Daemon, own_user, until

# Codes a caller retries with the same id: nothing ran, or it is safe to ask again.
RETRYABLE = {"server_offline", "transport_error", "timeout", "busy"}
LANES = 3


@dataclass
class Attempt:
    command_id: str
    at: float  # monotonic time the attempt ended
    outcome: str  # "ok" or an error code
    took: float


@dataclass
class Loop:
    attempts: list[Attempt] = field(default_factory=list)
    finals: dict[str, str] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def lane(fb: Client, lane_no: int, marks: Path, loop: Loop) -> None:
    n = 0
    while not loop.stop.is_set():
        n += 1
        command_id = f"fo-{lane_no}-{n}"
        argv = ["sh", "-c", f"echo ran >> {marks / command_id}"]
        for _ in range(40):  # retried with the same id, as a careful caller does
            sent = time.monotonic()
            try:
                await fb.exec("c1", argv, timeout_s=10, command_id=command_id)
                outcome = "ok"
            except FleetbusError as exc:
                outcome = exc.code
            loop.attempts.append(Attempt(command_id, time.monotonic(), outcome, time.monotonic() - sent))
            if outcome not in RETRYABLE:
                break
            await asyncio.sleep(0.1)
        loop.finals[command_id] = outcome


async def test_a_nats_node_loss_fails_no_command_as_internal_and_runs_none_twice(
        cluster: NatsCluster, tmp_path: Path) -> None:
    prefix = "f" + secrets.token_hex(4)
    env = cluster.fleet_env(prefix, tmp_path / "home")
    core = Daemon(["core", "--replicas", "3"], env, tmp_path / "core.log", "fleetbus core").start()
    worker = Daemon(["worker", "--replicas", "3", "--transports", "local", "--local-user", own_user()],
                    env, tmp_path / "worker.log", "serving local").start()
    nc = await cluster.connect(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        added = json.loads((await nc.request(f"{prefix}.v1.admin.servers.add", json.dumps(
            {"server": {"name": "c1", "transport": "local"}}).encode(), timeout=10)).data)
        assert added["ok"], added
        fb = Client(nc, Names(prefix))

        async def served() -> bool:
            try:
                return (await fb.ping("c1", timeout_s=5))["ok"]
            except FleetbusError:
                return False

        deadline = time.monotonic() + 30
        while not await served():
            assert time.monotonic() < deadline, "c1 never served"
            await asyncio.sleep(0.1)

        loop = Loop()
        lanes = [asyncio.create_task(lane(fb, i, marks, loop)) for i in range(LANES)]
        try:
            await until(lambda: sum(a.outcome == "ok" for a in loop.attempts) >= 30, 60, "commands before")
            # The node leading the commands KV: its loss forces a leader election there.
            info = await nc.jetstream().stream_info(f"KV_{Names(prefix).commands_bucket}")
            leader = next(n for n in cluster.nodes if n.name == info.cluster.leader)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill, leader)
            await until(lambda: time.monotonic() > killed_at + 10, 20, "ten seconds of commands")
            await asyncio.to_thread(cluster.restart, leader)
            restarted_at = time.monotonic()
            after = len(loop.attempts)
            await until(lambda: sum(a.outcome == "ok" for a in loop.attempts[after:]) >= 30, 90,
                         "commands after the restart")
        finally:
            loop.stop.set()
            await asyncio.wait_for(asyncio.gather(*lanes), 300)

        failed = [a for a in loop.attempts if a.outcome != "ok"]
        codes = sorted({a.outcome for a in failed})
        window = (failed[-1].at - failed[0].at) if failed else 0.0
        first_fail = (failed[0].at - killed_at) if failed else 0.0
        print(f"\n{len(loop.finals)} commands, {len(loop.attempts)} attempts; {len(failed)} failed "
              f"attempts ({', '.join(codes) or 'none'}) within a window of {window:.2f} s starting "
              f"{first_fail:.2f} s after the kill; slowest attempt {max(a.took for a in loop.attempts):.2f} s "
              f"(commands wait through the election); node back after {restarted_at - killed_at:.1f} s")

        assert "internal" not in codes, [a for a in failed if a.outcome == "internal"][:5]
        assert set(codes) <= RETRYABLE, codes
        assert set(loop.finals.values()) == {"ok"}, {k: v for k, v in loop.finals.items() if v != "ok"}
        runs = {p.name: p.read_text().count("ran") for p in marks.iterdir()}
        assert runs == dict.fromkeys(loop.finals, 1), {k: v for k, v in runs.items() if v != 1}

        # One audit record that says it ran for every command that ran, and none for others.
        records = await audit_records(nc, Names(prefix).audit_stream, f"{prefix}.v1.audit.c1.exec", set(runs))
        ran_records = {cid: [r for r in recs if r["outcome"] == "ok" and not r["replayed"]]
                       for cid, recs in records.items()}
        assert {cid for cid, recs in ran_records.items() if recs} == set(runs)
        assert all(len(recs) == 1 for recs in ran_records.values()), {
            cid: len(recs) for cid, recs in ran_records.items() if len(recs) > 1}
    finally:
        await nc.close()
        worker.stop()
        core.stop()


