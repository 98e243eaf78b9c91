"""Issue 22's gateway figures, each against its baseline in the same process tree and run.

- **gateway CPU per ping over N agents vs the floor relay's**: one `fleetbus up` whose
  gateway holds N swarm agents, and beside it on the same nats-server the floor relay
  (bench/floor_relay.py) with N bare TLS peers. Windows of pings through each, in an
  order shuffled every round (a fixed alternation favours one slot: see
  /work/notes/issue22-research.md), CPU from /proc. Each round gives one pair and its
  ratio; the row's ratio is their median (target <= 1.3).
- **ping/s over N agents, one gateway**, from the same windows, against the floor rate
  (target >= 5,000/s and >= 0.7 of the floor).
- **ping/s over 2N agents split over two gateway processes vs one gateway**: three
  `fleetbus worker --transports agent-outbound` gateways on the run's NATS, one holding
  2N agents, two holding N each; windows over the one and over the pair, shuffled
  (target >= 1.6x). On two cores every process of the run shares the same CPU, so the
  CPU per ping of each part is printed: what the split can gain is bounded by it.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from figures import Row, Sizes, _children, request_rate
from floors import NOTE, Floor
from harness import Stack, start_swarm, stop_process
from scalebench import GatewayProcess

ROUNDS = {"smoke": 1, "quick": 2, "full": 3}


def _median_parts(windows: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Each part's median CPU per ping over a variant's windows."""
    return {k: statistics.median(per[k] for _, per in windows) for k in windows[0][1]}


def _spent(per: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e6:.0f}" for k, v in per.items()) + f"; all {sum(per.values()) * 1e6:.0f}"


async def _shuffled_windows(variants: dict[str, Callable[[], Awaitable[tuple[float, dict[str, float]]]]],
                            rounds: int) -> dict[str, list[tuple[float, dict[str, float]]]]:
    """Each variant's window once per round, the order shuffled every round."""
    results: dict[str, list[tuple[float, dict[str, float]]]] = {k: [] for k in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            results[name].append(await variants[name]())
    return results


async def gateway_rows(stack: Stack, sizes: Sizes, work: Path, mode: str) -> list[Row]:
    """Gateway vs floor relay CPU per ping, and ping/s vs the floor rate (see the module doc)."""
    count = sizes.agents_ping_rate
    names = [f"gwb-{i:05d}" for i in range(count)]
    keys = await stack.add_agents(names)
    before = len(stack.swarms)
    await stack.swarm(work / "gwb-swarms", keys, processes=max(1, min(2, count // 250)))
    floor = await Floor(stack, work / "gwb-floor").start()
    try:
        await stack.wait_answering(names)
        processes = max(1, min(2, count // 250))
        for i in range(processes):
            first = i * count // processes
            await floor.add_peers("echo", str(first), str((i + 1) * count // processes - first))
        await floor.wait_peers(count, sink=False)
        for i in range(count):  # warm every link once, on both sides
            await floor.request(f"bench.floor.ping.{i}", b"{}")
        for _ in range(2):
            await asyncio.gather(*(stack.client.ping(n, timeout_s=30) for n in names))
        assert floor.relay is not None
        gparts = {"gateway": [stack.pid], "nats-server": _children(stack.pid),
                  "agents": [p.pid for p in stack.swarms[before:]]}
        fparts = {"relay": [floor.relay.pid], "nats-server": _children(stack.pid),
                  "peers": [p.pid for p in floor.peers]}

        async def gping(i: int) -> None:
            await stack.client.ping(names[i], timeout_s=30)

        async def fping(i: int) -> None:
            await floor.request(f"bench.floor.ping.{i}", b"{}")

        load = os.getloadavg()[0]
        windows = await _shuffled_windows(
            {"gateway": lambda: request_rate(gping, count, sizes.ping_seconds, gparts),
             "floor": lambda: request_rate(fping, count, sizes.ping_seconds, fparts)}, ROUNDS[mode])
    finally:
        floor.stop()
        for proc in stack.swarms[before:]:
            stop_process(proc)
        del stack.swarms[before:]
    g_cpu = [per["gateway"] for _, per in windows["gateway"]]
    f_cpu = [per["relay"] for _, per in windows["floor"]]
    ratios = [g / f for g, f in zip(g_cpu, f_cpu, strict=True)]
    ratio = statistics.median(ratios)
    pairs = "; ".join(f"{g * 1e6:.0f}/{f * 1e6:.0f} = {g / f:.2f}" for g, f in zip(g_cpu, f_cpu, strict=True))
    g_rate = statistics.median(r for r, _ in windows["gateway"])
    f_rate = statistics.median(r for r, _ in windows["floor"])
    g_all = sum(_median_parts(windows["gateway"]).values())
    cores = os.cpu_count() or 1
    return [
        Row(f"gateway CPU per ping over {count} agents vs the floor relay", statistics.median(g_cpu) * 1e6,
            statistics.median(f_cpu) * 1e6, "us/ping", "ratio <= 1.3 (median of pairs)", ratio <= 1.3, ratio=ratio,
            note=(f"pairs gateway/relay us: {pairs}; {sizes.ping_seconds:g} s windows, order shuffled each "
                  f"round, one process tree; load {load:.2f}")),
        Row(f"ping/s over {count} agents, one gateway, vs the floor rate", g_rate, f_rate, "cmd/s",
            ">= 5000/s and ratio >= 0.7", g_rate >= 5000 and g_rate / f_rate >= 0.7,
            note=(f"median of the same windows; median CPU us per ping, gateway windows: "
                  f"{_spent(_median_parts(windows['gateway']))}; floor windows: {_spent(_median_parts(windows['floor']))}; "
                  f"all processes {g_all * 1e6:.0f} us per ping through the gateway, so at most "
                  f"{cores / g_all:,.0f}/s on {cores} cores; floor: {NOTE}")),
    ]


async def split_rows(stack: Stack, sizes: Sizes, work: Path, mode: str) -> list[Row]:
    """ping/s over 2N agents on two gateway processes against the same on one."""
    half = sizes.agents_ping_rate
    total = 2 * half
    one = GatewayProcess(stack, work / "split-one")
    pair = [GatewayProcess(stack, work / f"split-{i}") for i in (1, 2)]
    swarms: dict[str, list[subprocess.Popen[bytes]]] = {"one": [], "two": []}
    try:
        records = []
        for gw in (one, *pair):  # one at a time: each starts as a worker joining a running deployment
            records.append(await gw.start().record())
        one_names = [f"split-one-{i:05d}" for i in range(total)]
        two_names = [f"split-two-{i:05d}" for i in range(total)]
        one_keys = await stack.add_agents(one_names)
        two_keys = await stack.add_agents(two_names)
        per_swarm = max(1, min(2, total // 500))
        for i in range(per_swarm):
            swarms["one"].append(start_swarm(work / f"split-one-swarm{i}", one.listen,
                                             str(records[0]["ca_fingerprint"]), one_keys[i::per_swarm]))
        for j, gw in enumerate(pair):  # agents 0..half-1 on the first, the rest on the second
            part = two_keys[j * half:(j + 1) * half]
            swarms["two"].append(start_swarm(work / f"split-two-swarm{j}", gw.listen,
                                             str(records[j + 1]["ca_fingerprint"]), part))
        await stack.wait_answering(one_names, held=one.connected)

        def held_by_pair() -> int | None:
            counts = [gw.connected() for gw in pair]
            return None if None in counts else sum(c or 0 for c in counts)

        await stack.wait_answering(two_names, held=held_by_pair)
        for names in (one_names, two_names):  # warm: sessions opened in each host
            await asyncio.gather(*(stack.client.ping(n, timeout_s=30) for n in names))

        def window(names: list[str], gateways: list[GatewayProcess],
                   agents: list[subprocess.Popen[bytes]]) -> Callable[[], Awaitable[tuple[float, dict[str, float]]]]:
            parts = {"gateways": [gw.pid for gw in gateways], "nats-server": _children(stack.pid),
                     "agents": [p.pid for p in agents]}

            async def ping(i: int) -> None:
                await stack.client.ping(names[i], timeout_s=30)

            return lambda: request_rate(ping, len(names), sizes.ping_seconds, parts)

        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        windows = await _shuffled_windows({"one": window(one_names, [one], swarms["one"]),
                                           "two": window(two_names, pair, swarms["two"])}, ROUNDS[mode])
        elapsed = time.perf_counter() - t0
    finally:
        for procs in swarms.values():
            for proc in procs:
                stop_process(proc)
        for gw in (one, *pair):
            gw.stop()
    one_rate = statistics.median(r for r, _ in windows["one"])
    two_rate = statistics.median(r for r, _ in windows["two"])
    cores = os.cpu_count() or 1
    return [Row(f"ping/s over {total} agents split over two gateway processes vs one gateway", two_rate, one_rate,
                "cmd/s", "ratio >= 1.6", two_rate / one_rate >= 1.6,
                note=(f"median of {ROUNDS[mode]} windows each, order shuffled ({elapsed:.0f} s, load {load:.2f}); "
                      f"CPU us per ping, two: {_spent(_median_parts(windows['two']))}; one: {_spent(_median_parts(windows['one']))}; "
                      f"{cores} cores shared by every process"))]
