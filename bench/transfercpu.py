"""Issue 22's transfer figures: the put via an outbound agent against its floor, and the
CPU it costs against scp's.

Three ways of moving the same file, in an order shuffled every round, each copy removed
at once (as figures._alternating_transfers does):

- **fleetbus**: `put` from this process (the client) through `fleetbus up` (its gateway
  and nats-server) to an outbound agent (the shipped zipapp);
- **floor**: the same bytes through nats-py, nats-server and asyncio TLS to a bare sink
  (bench/floors.py), none of fleetbus's own work;
- **scp** to the run's sshd (bench/sshbench.py).

CPU seconds come from /proc (user + system, every thread): for fleetbus the client
process, `fleetbus up` and its nats-server, and the agent; for scp, the scp client and
the ssh it runs (this process's reaped children) and sshd, whose per-connection
processes are counted once the listening sshd has reaped them (its cutime/cstime).
"""

from __future__ import annotations

import asyncio
import random
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from figures import Row, Sizes, _children, source_file
from floors import Floor, _send_file
from harness import Agent, Stack, cpu_seconds, gateway_of, shipped_agent

GiB = 1024 ** 3
MiB = 1024 ** 2


def _with_reaped(pid: int) -> float:
    """CPU seconds of ``pid`` and of the children it has reaped (fields 14-17 of stat)."""
    from os import sysconf

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / sysconf("SC_CLK_TCK")


def _reaped_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _quiet_children(pid: int, timeout: float = 10) -> None:
    """Until ``pid`` has no children left (sshd has reaped the session that just ended)."""
    deadline = time.monotonic() + timeout
    while _children(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


Parts = Callable[[], dict[str, float]]


async def _measured(move: Callable[[Path], Awaitable[None]], dest: Path, parts: Parts,
                    settle: Callable[[], Awaitable[None]] | None = None) -> tuple[float, dict[str, float]]:
    """Seconds ``move`` takes, and the CPU seconds each part spent meanwhile."""
    before = parts()
    t0 = time.perf_counter()
    await move(dest)
    elapsed = time.perf_counter() - t0
    if settle is not None:
        await settle()
    after = parts()
    dest.unlink()
    return elapsed, {k: after[k] - before[k] for k in before}


def _per_gib(cpu: dict[str, float], mib: int) -> dict[str, float]:
    return {k: v * 1024 / mib for k, v in cpu.items()}


def _spent(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in parts.items())


async def put_cpu_rows(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    try:
        from sshbench import _sshd, scp_baseline
    except ImportError:
        return []
    server, _ = _sshd()
    assert server.proc is not None
    sshd_pid = server.proc.pid
    mib = sizes.put_mib
    src, digest = await source_file(work, mib)
    key = (await stack.add_agents(["bench-put-cpu"]))[0]
    gw = await asyncio.to_thread(gateway_of, stack.fleet)
    agent = Agent(work / "agent-put-cpu", gw["address"], gw["fingerprint"], key, command=shipped_agent(work)).start()
    floor = await Floor(stack, work / "floor-put-cpu").start()
    try:
        await floor.add_peers("sink")
        await floor.wait_peers(0, sink=True)
        await stack.wait_answering(["bench-put-cpu"])
        assert agent.proc is not None and floor.relay is not None
        agent_pid, relay_pid, peers = agent.proc.pid, floor.relay.pid, [p.pid for p in floor.peers]

        def fleetbus_parts() -> dict[str, float]:
            return {"client": time.process_time(), "fleetbus up": cpu_seconds(stack.pid),
                    "nats-server": sum(cpu_seconds(p) for p in _children(stack.pid)),
                    "agent": cpu_seconds(agent_pid)}

        def floor_parts() -> dict[str, float]:
            return {"client": time.process_time(), "relay": cpu_seconds(relay_pid),
                    "nats-server": sum(cpu_seconds(p) for p in _children(stack.pid)),
                    "sink": sum(cpu_seconds(p) for p in peers)}

        def scp_parts() -> dict[str, float]:
            return {"scp+ssh": _reaped_children(), "sshd": _with_reaped(sshd_pid)}

        async def put(dest: Path) -> None:
            reply = await stack.client.put("bench-put-cpu", src, str(dest))
            assert reply["sha256"] == digest

        async def floor_put(dest: Path) -> None:
            await _send_file(floor, "bench.floor.put", src, dest)

        async def scp(dest: Path) -> None:
            await asyncio.to_thread(scp_baseline, src, dest)

        variants = {
            "fleetbus": lambda: _measured(put, work / "cpu-put.bin", fleetbus_parts),
            "floor": lambda: _measured(floor_put, work / "cpu-floor.bin", floor_parts),
            "scp": lambda: _measured(scp, work / "cpu-scp.bin", scp_parts, lambda: _quiet_children(sshd_pid)),
        }
        await variants["fleetbus"]()  # warm: the agent's session, the sink's first file
        await variants["floor"]()
        results: dict[str, list[tuple[float, dict[str, float]]]] = {k: [] for k in variants}
        for _ in range(sizes.transfer_rounds):
            order = list(variants)
            random.shuffle(order)
            for name in order:
                results[name].append(await variants[name]())
    finally:
        floor.stop()
        agent.stop()
    seconds = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    cpu = {k: {p: statistics.median(c[p] for _, c in v) for p in v[0][1]} for k, v in results.items()}
    total = {k: sum(_per_gib(c, mib).values()) for k, c in cpu.items()}
    rate = {k: mib / s for k, s in seconds.items()}
    rounds = f"median of {sizes.transfer_rounds}, order shuffled each round"
    return [
        Row(f"{mib} MiB put via outbound agent vs its floor", rate["fleetbus"], rate["floor"], "MiB/s",
            "ratio >= 0.95 (vs floor)", rate["fleetbus"] / rate["floor"] >= 0.95,
            note=(f"scp {rate['scp']:.0f} MiB/s: the put is {rate['fleetbus'] / rate['scp']:.2f} of scp, the floor "
                  f"{rate['floor'] / rate['scp']:.2f}; {rounds}")),
        Row(f"CPU seconds per GiB, {mib} MiB put via outbound agent vs scp + sshd", total["fleetbus"], total["scp"],
            "CPU s/GiB", "ratio <= 1.5", total["fleetbus"] / total["scp"] <= 1.5,
            note=(f"fleetbus: {_spent(_per_gib(cpu['fleetbus'], mib))}; scp: {_spent(_per_gib(cpu['scp'], mib))}; "
                  f"floor {total['floor']:.2f} ({_spent(_per_gib(cpu['floor'], mib))}); {rounds}")),
    ]
