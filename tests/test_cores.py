"""Several `fleetbus core` processes on one NATS: all serve the admin API, one (the
leader of the `leader.checks` lease) runs the server checks, and another takes over when
it dies (SIGKILL: once its lease expired) or stops (SIGTERM: at once)."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from pathlib import Path

import nats
from fleetbus.subjects import HDR_CHECKER
from nats.aio.msg import Msg
from support.processes import Daemon, NatsServer, own_user, shared_env


def pid_of(checker: str) -> int:
    return int(checker.rsplit(":", 1)[1])


async def test_one_core_checks_servers_and_another_takes_over_when_it_dies(
        nats_server: NatsServer, tmp_path: Path) -> None:
    prefix = "k" + secrets.token_hex(4)
    env = shared_env(nats_server.url, prefix, tmp_path / "home")

    def core(n: int) -> Daemon:
        return Daemon(["core", "--check-interval", "0.3"], env, tmp_path / f"core{n}.log", "fleetbus core").start()

    cores = {d.proc.pid: d for d in (core(1), core(2)) if d.proc is not None}
    worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], env,
                    tmp_path / "worker.log", "serving local").start()
    nc = await nats.connect(nats_server.url)
    checks: list[tuple[float, str]] = []

    async def seen(msg: Msg) -> None:
        if msg.headers and HDR_CHECKER in msg.headers:
            checks.append((time.monotonic(), msg.headers[HDR_CHECKER]))

    async def admin(endpoint: str, body: dict) -> dict:
        return json.loads((await nc.request(f"{prefix}.v1.admin.{endpoint}", json.dumps(body).encode(),
                                            timeout=10)).data)

    async def checkers_after(since: float, count: int, timeout: float = 60) -> set[str]:
        deadline = time.monotonic() + timeout
        while len([c for t, c in checks if t > since]) < count:
            assert time.monotonic() < deadline, f"fewer than {count} checks since then: {checks[-5:]}"
            await asyncio.sleep(0.05)
        return {c for t, c in checks if t > since}

    try:
        # Every ping of c1 is seen here too: a plain subscription beside the worker's queue group.
        sub = await nc.subscribe(f"{prefix}.v1.servers.c1.ping", cb=seen)
        assert (await admin("servers.add", {"server": {"name": "c1", "transport": "local"}}))["ok"]

        leaders = await checkers_after(0, 8)
        assert len(leaders) == 1, leaders  # two cores, one checking
        first = leaders.pop()
        assert pid_of(first) in cores

        killed_at = time.monotonic()
        cores[pid_of(first)].stop(signal.SIGKILL)
        # The survivor serves the admin API at once, and the checks after the lease expired.
        assert (await admin("servers.get", {"name": "c1"}))["ok"]
        await checkers_after(killed_at, 1)
        took_over = next(t for t, c in checks if t > killed_at) - killed_at
        after = await checkers_after(killed_at + took_over, 6)
        assert len(after) == 1 and first not in after, after
        second = after.pop()

        # A clean stop hands the checks over without waiting for the lease to expire.
        third = core(3)
        assert third.proc is not None
        stopped_at = time.monotonic()
        cores[pid_of(second)].stop()
        deadline = time.monotonic() + 30
        # (A check the stopping core sent just before it stopped may still arrive.)
        while not [t for t, c in checks if t > stopped_at and c != second]:
            assert time.monotonic() < deadline, checks[-5:]
            await asyncio.sleep(0.05)
        handed_over = next(t for t, c in checks if t > stopped_at and c != second) - stopped_at
        last = await checkers_after(stopped_at + handed_over, 6)
        assert {pid_of(c) for c in last} == {third.proc.pid}, last
        print(f"\nchecks resumed {took_over:.1f} s after SIGKILL of the leading core, "
              f"{handed_over:.1f} s after SIGTERM")
        await sub.unsubscribe()
        third.stop()
    finally:
        await nc.close()
        worker.stop()
        for daemon in cores.values():
            daemon.stop()
