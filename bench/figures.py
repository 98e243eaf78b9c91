"""The benchmark figures of issue 8: each measures fleetbus and its baseline side by side.

Every function returns one or more :class:`Row`. Sizes scale with the mode: ``smoke``
(seconds, for the test suite), ``quick`` (under two minutes in all) and ``full``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Agent, Stack, cpu_seconds, gateway_of, percentile, rss_bytes, shipped_agent, stop_process

MS = 1000.0
MiB = 1024 * 1024


@dataclass
class Row:
    figure: str
    fleetbus: float
    baseline: float | None
    unit: str
    target: str
    holds: bool | None
    ratio: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.fleetbus / self.baseline


@dataclass(frozen=True)
class Sizes:
    exec_n: int
    agents_ping_rate: int
    ping_seconds: float
    agents_held: int
    put_mib: int
    sftp_mib: int
    transfer_rounds: int
    # Each ssh exec logs in a shell (~0.15 s here, twice per sample with its baseline):
    # the quick run's 200 took half of its two minutes.
    ssh_exec_n: int
    # Agents running `exec true` as one job, against as many single requests (issue 18).
    job_agents: int

    @classmethod
    def of(cls, mode: str) -> Sizes:
        if mode == "smoke":
            return cls(exec_n=20, agents_ping_rate=10, ping_seconds=1, agents_held=10,
                       put_mib=8, sftp_mib=8, transfer_rounds=1, ssh_exec_n=10, job_agents=10)
        if mode == "quick":
            return cls(exec_n=200, agents_ping_rate=100, ping_seconds=3, agents_held=300,
                       put_mib=128, sftp_mib=64, transfer_rounds=2, ssh_exec_n=60, job_agents=200)
        return cls(exec_n=2000, agents_ping_rate=500, ping_seconds=10, agents_held=5000,
                   put_mib=1024, sftp_mib=256, transfer_rounds=3, ssh_exec_n=200,
                   job_agents=1000)


Timed = Callable[[], Awaitable[Any]]


async def _interleaved(fleetbus: Timed, baseline: Timed, n: int) -> tuple[list[float], list[float]]:
    """Latencies of ``fleetbus`` and ``baseline``, run alternately after a warm-up.

    Alternating means a burst of load from anything else on the machine lands on both
    series alike, so their ratio holds even where the absolute times drift.
    """
    for _ in range(max(5, n // 10)):  # warm sessions and caches on both sides
        await fleetbus()
        await baseline()
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fleetbus()
        t1 = time.perf_counter()
        await baseline()
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        theirs.append(t2 - t1)
    return ours, theirs


async def _alternating_transfers(fleetbus: Callable[[Path], Awaitable[None]],
                                 baseline: Callable[[Path], float], dest: Path,
                                 rounds: int) -> tuple[float, float]:
    """Median seconds of ``fleetbus`` and ``baseline`` moving a file to ``dest``, run
    alternately, which goes first swapping each round; each copy is removed at once.

    A transfer's speed here depends on what else the machine does and on the state of
    its memory (a VM backs freshly used pages lazily; see docs/performance.md), which
    drifts over seconds: one sample of each, one after the other, gave ratios 30% apart
    between two runs of the same code. Removing each copy keeps the page cache and the
    disk from filling with them.
    """
    ours: list[float] = []
    theirs: list[float] = []

    async def ours_once() -> None:
        t0 = time.perf_counter()
        await fleetbus(dest)
        ours.append(time.perf_counter() - t0)
        dest.unlink()

    async def theirs_once() -> None:
        theirs.append(await asyncio.to_thread(baseline, dest))
        dest.unlink()

    for i in range(rounds):
        for step in ((ours_once, theirs_once) if i % 2 == 0 else (theirs_once, ours_once)):
            await step()
    return statistics.median(ours), statistics.median(theirs)


def _exec_true(stack: Stack, server: str, with_id: bool = False) -> Timed:
    import uuid

    async def run() -> None:
        result = await stack.client.exec(server, ["true"], command_id=uuid.uuid4().hex if with_id else None)
        assert result.exit_code == 0

    return run


async def _latencies(run: Timed, n: int) -> list[float]:
    """Latencies of ``run`` alone after a warm-up, for figures with nothing to alternate with."""
    for _ in range(max(5, n // 10)):
        await run()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await run()
        out.append(time.perf_counter() - t0)
    return out


async def _spawn_true() -> None:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()


# A responder that answers every request at once: the least any command over NATS costs.
_ECHO = """
import asyncio, os, sys
import nats

async def main():
    token = os.environ.get("ECHO_TOKEN")
    nc = await nats.connect(sys.argv[1], **({"user": "owner", "password": token} if token else {}))
    async def answer(msg):
        await msg.respond(b'{"ok":true}')
    await nc.subscribe("bench.echo", cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def _nats_round_trip(stack: Stack, n: int) -> list[float]:
    """Round trips of a bare nats-py request to a responder in another process."""
    env = {**os.environ, "ECHO_TOKEN": stack.fleet.token or ""}  # env, never argv
    proc = await asyncio.to_thread(lambda: subprocess.Popen(
        [os.sys.executable, "-c", _ECHO, stack.fleet.nats_url], env=env,
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
    try:
        assert proc.stdout is not None
        if (await asyncio.to_thread(proc.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the NATS echo responder did not start")
        nc = stack.client.nc

        async def echo() -> None:
            await nc.request("bench.echo", b"{}", timeout=10)

        return await _latencies(echo, n)
    finally:
        stop_process(proc)


async def exec_local(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    fb, base = await _interleaved(_exec_true(stack, "local"), _spawn_true, sizes.exec_n)
    echo = percentile(await _nats_round_trip(stack, sizes.exec_n), 50) * MS
    rows = [Row("NATS request/reply to an echo responder, p50", echo, None, "ms", "(floor under every command)",
                None, note="bare nats-py in two processes: the bus's share of any command's overhead")]
    for p in (50, 99):
        f, b = percentile(fb, p) * MS, percentile(base, p) * MS
        holds = (f - b) < 1.0 if p == 50 else None
        rows.append(Row(f"exec true on local, p{p}", f, b, "ms", "p50 overhead < 1 ms" if p == 50 else "-",
                        holds, note=f"overhead {f - b:.2f} ms"))
    try:
        import uvloop  # noqa: F401  (the fast extra)

        uv = await Stack.start(work / "uvloop", env={"FLEETBUS_LOOP": "uvloop"})
        try:
            uv_lat, asyncio_lat = await _interleaved(_exec_true(uv, "local"), _exec_true(stack, "local"),
                                                     sizes.exec_n)
        finally:
            await uv.stop()
        f, b = percentile(uv_lat, 50) * MS, percentile(asyncio_lat, 50) * MS
        rows.append(Row("exec true on local, p50, uvloop vs asyncio", f, b, "ms", "(uvloop where it helps)",
                        None, note="uvloop is opt-in: FLEETBUS_LOOP=uvloop"))
    except ImportError:
        pass
    with_id, base = await _interleaved(_exec_true(stack, "local", with_id=True), _spawn_true, sizes.exec_n)
    f, b = percentile(with_id, 50) * MS, percentile(base, 50) * MS
    rows.append(Row("exec true on local with a command id, p50", f, b, "ms", "(at-most-once: +1 KV claim)",
                    None, note=f"overhead {f - b:.2f} ms"))
    return rows


async def exec_agent(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    keys = await stack.add_agents(["bench-agent", "bench-agent-dev"])
    gw = await asyncio.to_thread(gateway_of, stack.fleet)
    agent = Agent(work / "agent1", gw["address"], gw["fingerprint"], keys[0],
                  command=shipped_agent(work)).start()
    # The same agent code started from the development venv's console script, for
    # comparison: its interpreter also loads the venv's site-packages hooks.
    dev = Agent(work / "agent-dev", gw["address"], gw["fingerprint"], keys[1]).start()
    try:
        await stack.wait_answering(["bench-agent", "bench-agent-dev"])
        agent_lat, local = await _interleaved(_exec_true(stack, "bench-agent"), _exec_true(stack, "local"),
                                              sizes.exec_n)
        await _latencies(_exec_true(stack, "bench-agent-dev"), sizes.exec_n)  # the same work as the other
        await asyncio.sleep(1.0)  # let the agents settle to idle before reading their memory
        idle_rss = rss_bytes(agent.proc.pid) / MiB  # type: ignore[union-attr]
        dev_rss = rss_bytes(dev.proc.pid) / MiB  # type: ignore[union-attr]
    finally:
        agent.stop()
        dev.stop()
    f, b = percentile(agent_lat, 50) * MS, percentile(local, 50) * MS
    return [
        Row("exec true via outbound agent, p50", f, b, "ms", "ratio <= 1.3 (vs local)", f / b <= 1.3),
        Row("idle agent resident memory", idle_rss, None, "MiB", "<= 25 MiB", idle_rss <= 25,
            note="the zipapp, run as ops/systemd runs it"),
        Row("idle agent from the dev venv's console script", dev_rss, None, "MiB", "-", None,
            note="same code, venv site-packages loaded"),
    ]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


async def request_rate(request: Callable[[int], Awaitable[Any]], count: int, seconds: float,
                       parts: dict[str, list[int]], window: int = 512) -> tuple[float, dict[str, float]]:
    """Requests per second with ``window`` in flight, spread over targets ``0..count-1``
    (``request(i)``), and the CPU each part (named lists of pids; "client" is this
    process) spent per request.

    Every process of the run shares the machine's cores, so the CPU each spends per
    request says what rate the machine could reach at best: cores / total CPU.
    """
    done = 0
    stop_at = time.perf_counter() + seconds
    cpu0 = {k: sum(cpu_seconds(p) for p in pids) for k, pids in parts.items()}
    client0 = time.process_time()
    t0 = time.perf_counter()

    async def worker(i: int) -> None:
        nonlocal done
        j = i
        while time.perf_counter() < stop_at:
            await request(j % count)
            done += 1
            j += window

    await asyncio.gather(*(worker(i) for i in range(window)))
    elapsed = time.perf_counter() - t0
    per = {k: (sum(cpu_seconds(p) for p in pids) - cpu0[k]) / max(done, 1) for k, pids in parts.items()}
    per["client"] = (time.process_time() - client0) / max(done, 1)
    return done / elapsed, per


def _write_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(block)
            digest.update(block)
    return digest.hexdigest()


_sources: dict[Path, str] = {}


async def source_file(work: Path, mib: int) -> tuple[Path, str]:
    """A file of ``mib`` MiB to send, and its sha256: written once per size and run,
    shared by every row that sends that much."""
    path = work / f"source-{mib}MiB.bin"
    if path not in _sources:
        _sources[path] = await asyncio.to_thread(_write_file, path, mib)
    return path, _sources[path]


async def put_agent(stack: Stack, sizes: Sizes, work: Path, scp: Callable[[Path, Path], float] | None) -> list[Row]:
    key = (await stack.add_agents(["bench-put"]))[0]
    gw = await asyncio.to_thread(gateway_of, stack.fleet)
    agent = Agent(work / "agent-put", gw["address"], gw["fingerprint"], key, command=shipped_agent(work)).start()
    src, digest = await source_file(work, sizes.put_mib)
    figure = f"{sizes.put_mib} MiB put via outbound agent"

    async def put(dest: Path) -> None:
        reply = await stack.client.put("bench-put", src, str(dest))
        assert reply["sha256"] == digest

    try:
        await stack.wait_answering(["bench-put"])
        if scp is None:
            t0 = time.perf_counter()
            await put(work / "put-dest.bin")
            return [Row(figure, sizes.put_mib / (time.perf_counter() - t0), None, "MiB/s",
                        "ratio >= 2 vs scp", None, note="no sshd: scp baseline not run")]
        fb_s, scp_s = await _alternating_transfers(put, lambda dest: scp(src, dest), work / "put-dest.bin",
                                                   sizes.transfer_rounds)
    finally:
        agent.stop()
    return [Row(figure, sizes.put_mib / fb_s, sizes.put_mib / scp_s, "MiB/s", "ratio >= 2 vs scp",
                scp_s / fb_s >= 2, note=f"median of {sizes.transfer_rounds}, alternating with scp")]


async def up_to_first_command(work: Path) -> list[Row]:
    from fleetbus.client import Client
    from fleetbus.connection import NatsSettings
    from harness import Fleet  # noqa: F401  (the same launcher the tests use)

    home = work / "cold" / "home"
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env["FLEETBUS_HOME"] = str(home)
    fleetbus = str(Path(os.sys.executable).parent / "fleetbus")
    t0 = time.perf_counter()
    # Started inline, not in a thread: the start-up time measured begins at t0.
    proc = subprocess.Popen([fleetbus, "up", "--nats-port", "0", "--gateway-listen", "127.0.0.1:0",  # noqa: ASYNC220
                             "--metrics-addr", "off", "--check-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        run_file = home / "run.json"
        while True:
            if run_file.exists():
                try:
                    import json
                    info = json.loads(run_file.read_text())
                    break
                except ValueError:
                    pass
            if time.perf_counter() - t0 > 60:
                raise TimeoutError("fleetbus up did not start")
            await asyncio.sleep(0.005)
        token = (home / "nats.token").read_text().strip()
        client = await Client.connect(NatsSettings(url=info["nats_url"], token=token))
        try:
            await client.exec("local", ["true"])
        finally:
            await client.close()
        elapsed = time.perf_counter() - t0
    finally:
        stop_process(proc)
    return [Row("fleetbus up to first command answered", elapsed * MS, None, "ms", "<= 1000 ms",
                elapsed <= 1.0, note="fresh home: includes creating keys and certificates; "
                + _bytecode_state())]


def _bytecode_state() -> str:
    """Whether fleetbus's own modules start from cached bytecode: without it (a fresh
    editable checkout where PYTHONDONTWRITEBYTECODE is set) every start compiles them,
    180-350 ms here (docs/performance.md); dev.py setup compiles them."""
    import importlib.util

    import fleetbus.stack

    cached = Path(importlib.util.cache_from_source(fleetbus.stack.__file__)).exists()
    return "fleetbus's bytecode cached" if cached else "fleetbus's bytecode NOT cached (compiled at every start)"


def describe(rows: list[Row]) -> list[dict[str, Any]]:
    return [r.__dict__ for r in rows]
