"""What idle connected agents cost one gateway: CPU of `fleetbus up` over a window, from /proc.

N agents from the bench's swarm (real agent connect loops, 4 processes) connect to one
`fleetbus up`, answer a ping each, then sit idle; the gateway's CPU over a window is
reported as % of a core, as microseconds per agent per heartbeat interval, and
extrapolated linearly to 15,000 agents (the base cost of an idle `fleetbus up` is
included, so the extrapolation errs high).

    idlebench.py [--agents 3000] [--heartbeat 10] [--window 40] [--rounds 2]
    idlebench.py --ab /work/main ...   this checkout against another one (its .venv),
                                       both stacks up at once, windows in a shuffled order
                                       every round

:func:`idle_row` is the function bench/run.py can call for one row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import Row, _children
from harness import Stack, cpu_seconds, rss_bytes
from scalebench import raise_fd_limit

TARGET_AGENTS = 15_000
"""The fleet size issue 22 asks about: the row extrapolates to it."""


async def hold(workdir: Path, agents: int, heartbeat_s: float) -> Stack:
    """A `fleetbus up` with ``agents`` connected agents, each having answered a ping."""
    stack = await Stack.start(workdir, "--transport-setting", f"agent-outbound.heartbeat_s={heartbeat_s:g}")
    await connect(stack, workdir, agents)
    return stack


async def connect(stack: Stack, workdir: Path, agents: int) -> None:
    """``agents`` agents added, connected and each having answered a ping."""
    names = [f"idle-{i:05d}" for i in range(agents)]
    keys = await stack.add_agents(names)
    await stack.swarm(workdir / "swarms", keys, processes=max(1, min(4, agents // 250)))
    await stack.wait_answering(names, timeout=900)


async def release(stack: Stack) -> None:
    """Stop the stack, and its nats-server should `fleetbus up` not have stopped it in
    time (at 15,000 agents its own stop can outlast the harness's patience)."""
    nats = _children(stack.pid)
    await stack.stop()
    for pid in nats:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def groups(stack: Stack) -> dict[str, list[int]]:
    return {"gateway": [stack.pid], "nats": _children(stack.pid), "agents": [p.pid for p in stack.swarms]}


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


async def window(pids: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """% of one core each group of processes used over ``seconds``."""
    before = {k: _cpu(v) for k, v in pids.items()}
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    return {k: 100 * (_cpu(v) - before[k]) / elapsed for k, v in pids.items()}


def figures(pct: dict[str, float], agents: int, heartbeat_s: float, base: float = 0.0) -> dict[str, float]:
    """``base``: the same gateway's % with no agents, which does not grow with them."""
    gateway = pct["gateway"]
    per_agent = max(0.0, gateway - base) / agents
    return {
        "gateway_pct": round(gateway, 2),
        "nats_pct": round(pct["nats"], 2),
        "agents_pct": round(pct["agents"], 2),
        "us_per_agent_interval": round(per_agent / 100 * heartbeat_s * 1e6, 1),
        "gateway_pct_at_15000": round(base + per_agent * TARGET_AGENTS, 1),
    }


async def idle_row(workdir: Path, agents: int = 3000, heartbeat_s: float = 10.0,
                   window_s: float = 40.0, settle_s: float | None = None) -> dict[str, Any]:
    """The gateway's idle CPU with ``agents`` idle agents, as a dict of figures."""
    raise_fd_limit()
    stack = await Stack.start(workdir, "--transport-setting", f"agent-outbound.heartbeat_s={heartbeat_s:g}")
    try:
        # What the gateway costs with no agent at all, so only the growth is extrapolated.
        base = (await window(groups(stack), max(2.0, window_s / 2)))["gateway"]
        await connect(stack, workdir, agents)
        # Connects and status writes settle first (not a readiness wait: a quiet period).
        await asyncio.sleep(max(10.0, 2 * heartbeat_s) if settle_s is None else settle_s)
        pct = await window(groups(stack), window_s)
        return {"agents": agents, "heartbeat_s": heartbeat_s, "window_s": window_s, "base_pct": round(base, 2),
                "load": round(os.getloadavg()[0], 2), "gateway_rss_mib": rss_bytes(stack.pid) >> 20,
                **figures(pct, agents, heartbeat_s, base)}
    finally:
        await release(stack)


IDLE_SIZES = {"smoke": (20, 1.0, 3.0, 2.0), "quick": (1000, 10.0, 20.0, 20.0), "full": (3000, 10.0, 40.0, None)}
"""agents, heartbeat_s, window_s, settle_s per bench mode."""


async def idle_rows(workdir: Path, mode: str, agents: int | None = None) -> list[Row]:
    """`bench/run.py --only idle`: the row issue 22's idle target is judged by."""
    size, heartbeat_s, window_s, settle_s = IDLE_SIZES[mode]
    got = await idle_row(workdir, agents or size, heartbeat_s, window_s, settle_s)
    at = got["gateway_pct_at_15000"]
    return [Row(f"idle CPU of one gateway, {got['agents']} idle agents at heartbeat {heartbeat_s:g} s",
                got["gateway_pct"], None, "% of a core", "15,000 idle agents <= 10% (extrapolated here)",
                at <= 10, note=(f"{got['us_per_agent_interval']:.0f} us per agent per interval over the "
                                f"{got['base_pct']:.2f}% of the gateway alone, so {at:.1f}% at 15,000 at this "
                                f"heartbeat; agent swarms {got['agents_pct']:.1f}%, nats-server "
                                f"{got['nats_pct']:.1f}%; window {window_s:g} s at load {got['load']}; "
                                f"gateway RSS {got['gateway_rss_mib']} MiB"))]


async def serve(args: argparse.Namespace) -> None:
    """``--serve``: hold a stack, print its pids as one JSON line, stop at stdin's end."""
    raise_fd_limit()
    stack = await hold(Path(tempfile.mkdtemp(prefix="idlebench-")), args.agents, args.heartbeat)
    try:
        print(json.dumps(groups(stack)), flush=True)
        await asyncio.to_thread(sys.stdin.read)
    finally:
        await release(stack)


def _line(label: str, pct: dict[str, float], args: argparse.Namespace, seconds: float) -> str:
    f = figures(pct, args.agents, args.heartbeat)
    return (f"  {label:6s}: gateway {f['gateway_pct']:.2f}% of a core ({f['us_per_agent_interval']:.0f} us per "
            f"agent-interval, {f['gateway_pct_at_15000']:.1f}% at 15,000), nats-server {f['nats_pct']:.2f}%, "
            f"agents {f['agents_pct']:.2f}% (window {seconds:.0f} s, load {os.getloadavg()[0]:.2f}, "
            f"{time.strftime('%H:%M:%S')})")


def _spawn(python: str, script: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [python, str(script), "--serve", "--agents", str(args.agents), "--heartbeat", str(args.heartbeat)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def ab(args: argparse.Namespace) -> None:
    """This checkout against ``args.ab`` (another checkout with its own .venv)."""
    here = Path(__file__).resolve()
    trees = {"this": sys.executable, "other": str(Path(args.ab) / ".venv" / "bin" / "python")}
    procs: dict[str, subprocess.Popen[str]] = {}
    held: dict[str, dict[str, list[int]]] = {}
    raise_fd_limit()
    try:
        for tag, python in trees.items():  # one connect storm at a time
            procs[tag] = await asyncio.to_thread(_spawn, python, here, args)
            line = await asyncio.to_thread(procs[tag].stdout.readline)  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"{tag}: the stack did not come up")
            held[tag] = json.loads(line)
        await asyncio.sleep(max(10.0, 2 * args.heartbeat))
        print(f"{args.agents} idle agents per gateway, heartbeat {args.heartbeat:g} s; this = "
              f"{here.parent.parent}, other = {args.ab}", flush=True)
        results: dict[str, list[float]] = {tag: [] for tag in trees}
        for _ in range(args.rounds):
            order = list(trees)
            random.shuffle(order)  # a fixed alternation favours one slot
            for tag in order:
                pct = await window(held[tag], args.window)
                results[tag].append(pct["gateway"])
                print(_line(tag, pct, args, args.window), flush=True)
        for tag, values in results.items():
            med = statistics.median(values)
            print(f"  median {tag}: gateway {med:.2f}% of a core, "
                  f"{med / 100 * args.heartbeat / args.agents * 1e6:.0f} us per agent-interval, "
                  f"{med * TARGET_AGENTS / args.agents:.1f}% at 15,000", flush=True)
    finally:
        for proc in procs.values():
            if proc.stdin:
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=3000)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ab", help="another checkout to compare against, windows alternated")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve(args)
    elif args.ab:
        await ab(args)
    else:
        print(json.dumps(await idle_row(Path(tempfile.mkdtemp(prefix="idlebench-")), args.agents,
                                        args.heartbeat, args.window)))


if __name__ == "__main__":
    asyncio.run(main())
