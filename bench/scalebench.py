"""Issue 22's scale figures: agents held by one gateway process, all of them pinged, and
the reconnect storm after that process is killed.

The agents' gateway is a process of its own, `fleetbus worker --transports
agent-outbound` with its own home on the run's NATS (docs/operations.md, "Scale-out"),
so it can be killed with SIGKILL and started again as systemd would
(``Restart=on-failure``, ``RestartSec=2``: ops/systemd/fleetbus-worker@.service) while
NATS, the core and the client stay up. The agents are the bench's swarm (real
``fleetbus_agent.connect.run_connect`` loops, several per process); they pin the
deployment's CA, so the restarted gateway's certificate is accepted whatever it is.

Rows (the figure names are the ones tests/test_bench_smoke.py looks for):

- **agents held by one gateway (N)**: its RSS once all answer (target <= 1 GiB), with
  the seconds the first connect took and the handshakes the gateway turned away;
- **ping all N agents**: concurrent pings from one client (``PING_WINDOW`` in flight),
  and a `ping` job over the same agents (target <= 5 s);
- **reconnect storm**: seconds from the SIGKILL until the restarted gateway holds all N
  and until all answer a ping (target <= 60 s), the gateway's largest RSS sampled while
  they pour in (<= 1 GiB), and whether any agent gave up (a swarm process that exited).

    .venv/bin/python bench/run.py --only scale --agents 15000
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from figures import MS, Row, _children
from harness import Stack, cpu_seconds, metric_samples, rss_bytes, start_swarm, stop_process
from jobbench import PING_CONCURRENCY, Summaries, _checked, until_selected
from support.ports import free_port
from support.processes import FLEETBUS

MiB = 1024 * 1024
GiB = 1024 * MiB
# Pings in flight from the one client: the window bench/figures.request_rate uses and the
# ping job's limit, so the two ways of pinging everyone are compared at the same width.
PING_WINDOW = PING_CONCURRENCY
# ops/systemd/fleetbus-worker@.service: what an operator's restart of a killed gateway is.
RESTART_SEC = 2.0
STORM_TARGET_S = 60.0
AGENTS_PER_SWARM = 2000  # swarm processes for N agents: N / this, at least 1
# Each swarm dials from loopback addresses of its own, as agents on several hosts would:
# from one address, a storm runs into the gateway's cap on connections held per source
# address before their handshake (8,192), which no real fleet of this size meets.
SOURCES_PER_SWARM = 2


def swarm_sources(i: int) -> list[str]:
    """The loopback source addresses of swarm ``i`` (127.0.0.2 on; 127.0.0.1 is the gateway's)."""
    return [f"127.0.{(n >> 8) & 255}.{n & 255}" for n in
            range(2 + i * SOURCES_PER_SWARM, 2 + (i + 1) * SOURCES_PER_SWARM)]


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit, for itself and the
    processes it starts (they inherit it): the swarms hold one descriptor per agent."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class GatewayProcess:
    """A `fleetbus worker --transports agent-outbound` on the stack's NATS: one gateway
    process, started, killed and started again with the same home and address."""

    stack: Stack
    home: Path
    listen: str = ""
    metrics_addr: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    def start(self) -> GatewayProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        self.listen = self.listen or f"127.0.0.1:{free_port()}"
        self.metrics_addr = self.metrics_addr or f"127.0.0.1:{free_port()}"
        fleet = self.stack.fleet
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
        env.update(FLEETBUS_HOME=str(self.home), FLEETBUS_NATS_URL=fleet.nats_url,
                   FLEETBUS_NATS_TOKEN=fleet.token or "", FLEETBUS_MASTER_KEY_FILE=str(fleet.home / "master.key"))
        with open(self.home / "gateway.log", "ab") as log:
            self.proc = subprocess.Popen(
                [FLEETBUS, "worker", "--transports", "agent-outbound", "--gateway-listen", self.listen,
                 "--metrics-addr", self.metrics_addr, *self.extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        return self

    async def record(self, timeout: float = 60) -> dict[str, object]:
        """This gateway's record in `gateway info` (address, CA fingerprint), once it has one."""
        deadline = time.monotonic() + timeout
        while True:
            for record in await self.stack.client.list_gateways():
                if record["address"] == self.listen:
                    return record
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.home / "gateway.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"gateway worker exited with {self.proc.returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {self.listen} never published its record")
            await asyncio.sleep(0.2)

    def metrics(self, prefix: str) -> dict[str, float]:
        return metric_samples(f"http://{self.metrics_addr}/metrics", prefix)

    def connected(self) -> int | None:
        """The gateway's own count of connected agents, or None while it does not answer."""
        value = self.metrics("fleetbus_gateway_agents_connected ").get("fleetbus_gateway_agents_connected")
        return None if value is None else int(value)

    def dropped(self) -> str:
        """Connections the gateway dropped before their handshake finished, by reason."""
        found = self.metrics("fleetbus_gateway_handshakes_dropped_total{")
        parts = {name.split('reason="')[1].split('"')[0]: int(v) for name, v in found.items() if 'reason="' in name}
        return ", ".join(f"{k} {v}" for k, v in sorted(parts.items()) if v) or "none"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, and reap it (its listening port is free again once it is gone)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


async def _ping_all(stack: Stack, names: list[str], window: int) -> tuple[float, int]:
    """Seconds for one client to ping every agent once, ``window`` in flight, and how many failed."""
    sem = asyncio.Semaphore(window)
    failed = 0

    async def one(name: str) -> None:
        nonlocal failed
        async with sem:
            try:
                await stack.client.ping(name, timeout_s=30)
            except Exception:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n) for n in names))
    return time.perf_counter() - t0, failed


class RssSampler:
    """The largest RSS a process reaches, sampled every ``every`` seconds until stopped."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every, self.peak, self.samples = pid, every, 0, 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            await asyncio.sleep(self.every)

    def __enter__(self) -> Self:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


def _gave_up(swarms: list[subprocess.Popen[bytes]]) -> int:
    """Swarm processes that exited: an agent's connect loop only ends when it gives up."""
    return sum(1 for p in swarms if p.poll() is not None)


def _held_unless_gone(gw: GatewayProcess, swarms: list[subprocess.Popen[bytes]]) -> int | None:
    """The gateway's count of agents, or an error at once when a swarm process exited
    (its agents gave up: the first connect would otherwise wait out its whole timeout)."""
    for proc in swarms:
        if proc.poll() is not None:
            log = Path(str(proc.args[-1])).parent / "swarm.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise RuntimeError(f"a swarm process exited with {proc.returncode}:\n{tail}")
    return gw.connected()


async def scale_rows(stack: Stack, work: Path, agents: int, settings: list[str] | None = None,
                     connect_timeout: float = 900) -> list[Row]:
    """The rows above for ``agents`` agents; the gateway and swarms are stopped at the end.
    ``settings`` ("KEY=VALUE") are the gateway's agent-outbound settings, for trying its
    admission limits against a storm (the gateway's defaults otherwise)."""
    limit = raise_fd_limit()
    extra = [a for kv in settings or [] for a in ("--transport-setting", f"agent-outbound.{kv}")]
    gw = GatewayProcess(stack, work / "scale-gateway", extra=extra).start()
    swarms: list[subprocess.Popen[bytes]] = []
    try:
        record = await gw.record()
        names = [f"scale-{i:05d}" for i in range(agents)]
        keys = await stack.add_agents(names)
        rss_before = rss_bytes(gw.pid)
        processes = max(1, -(-agents // AGENTS_PER_SWARM))
        t0 = time.perf_counter()
        for i in range(processes):
            part = keys[i::processes]
            swarms.append(start_swarm(work / f"scale-swarm{i}", gw.listen, str(record["ca_fingerprint"]), part,
                                      sources=swarm_sources(i)))
        await stack.wait_answering(names, timeout=connect_timeout, held=lambda: _held_unless_gone(gw, swarms))
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # settled: the handshake buffers freed
        rss = rss_bytes(gw.pid)
        fds = len(os.listdir(f"/proc/{gw.pid}/fd"))
        rows = [Row(f"agents held by one gateway ({agents})", rss / MiB, None, "MiB RSS",
                    f"{agents} answering, RSS <= 1024 MiB", rss <= GiB,
                    note=(f"one `fleetbus worker` gateway{' with ' + ', '.join(settings) if settings else ''}; "
                          f"all answered {connect_s:.1f} s after {processes} swarm "
                          f"processes started, from {processes * SOURCES_PER_SWARM} loopback addresses; "
                          f"{fds} descriptors open (limit {limit}); RSS before agents "
                          f"{rss_before / MiB:.0f} MiB; handshakes dropped: {gw.dropped()}"))]

        await _ping_all(stack, names, PING_WINDOW)  # warm: the first pings open sessions in the host
        ping_s, failed = await _ping_all(stack, names, PING_WINDOW)
        rows.append(Row(f"ping all {agents} agents, concurrent from one client", ping_s * MS, None, "ms",
                        "<= 5000 ms, none failing", ping_s <= 5.0 and not failed,
                        note=f"{PING_WINDOW} in flight; {failed} failed"))
        async with Summaries(stack) as jobs:
            selection = {"servers": ["scale-*"]}
            await until_selected(stack, selection, agents, timeout=120)
            seconds, summary = await jobs.run({"selection": selection, "op": "ping",
                                               "max_concurrency": PING_CONCURRENCY, "timeout_s": 30})
            _checked(summary, agents)
        rows.append(Row(f"ping job over {agents} agents on one gateway process", seconds * MS, None, "ms",
                        "<= 5000 ms", seconds <= 5.0, note=f"concurrency {PING_CONCURRENCY}, start to summary"))
        rows += await _storm(stack, gw, names, swarms)
        return rows
    finally:
        for proc in swarms:
            stop_process(proc)
        gw.stop()


async def _storm(stack: Stack, gw: GatewayProcess, names: list[str],
                 swarms: list[subprocess.Popen[bytes]]) -> list[Row]:
    agents = len(names)
    rss_held = rss_bytes(gw.pid)

    def others() -> dict[str, float]:
        return {"swarms": sum(cpu_seconds(p.pid) for p in swarms),
                "nats-server": sum(cpu_seconds(p) for p in _children(stack.pid)),
                "fleetbus up": cpu_seconds(stack.pid)}

    cpu0 = others()
    gw.kill()
    killed = time.perf_counter()
    await asyncio.sleep(RESTART_SEC)
    gw.start()
    held_s: float | None = None
    # CPU seconds each part spent from the kill until the gateway held them all: where
    # the storm's time goes (the restarted gateway's own total is all of it).
    cpu_held: dict[str, float] = {}
    with RssSampler(gw.pid) as rss:
        async def all_held() -> int | None:
            nonlocal held_s
            count = await asyncio.to_thread(gw.connected)
            if count is not None and count >= agents and held_s is None:
                held_s = time.perf_counter() - killed
                cpu_held.update(others(), gateway=cpu_seconds(gw.pid))
            return count

        deadline = killed + max(300.0, 5 * STORM_TARGET_S)
        marks = [10, 20, 30, 45, 60, 90, 120, 180, 240]
        progress: list[str] = []  # agents held at each mark: how the storm drains
        while held_s is None and time.perf_counter() < deadline:
            count = await all_held()
            while marks and time.perf_counter() - killed >= marks[0]:
                progress.append(f"{marks.pop(0)} s {count}")
            await asyncio.sleep(0.25)
        # Whether or not the count reached N, the pings decide "answering".
        missing = ""
        try:
            await stack.wait_answering(names, timeout=max(30.0, deadline - time.perf_counter()), held=gw.connected)
        except TimeoutError as exc:
            missing = f"NOT ALL ANSWERED ({exc}); "
        answered_s = time.perf_counter() - killed
        held_now = gw.connected()
    held = f"{held_s:.1f} s" if held_s is not None else "NEVER"
    spent = ", ".join(f"{k} {v - cpu0.get(k, 0.0):.1f}" for k, v in cpu_held.items())
    gave_up = _gave_up(swarms)
    ok = not missing and answered_s <= STORM_TARGET_S and not gave_up and rss.peak <= GiB
    return [Row(f"reconnect storm: {agents} agents answering after their gateway is killed and restarted",
                answered_s, None, "s", "<= 60 s, none gives up, RSS <= 1024 MiB", ok,
                note=(f"{missing}SIGKILL, restarted {RESTART_SEC:g} s later (RestartSec); "
                      f"all held {held} after the kill (now {held_now}; held at {', '.join(progress) or '-'}; "
                      f"CPU s until then: {spent or '-'}); "
                      f"gateway RSS peak {rss.peak / MiB:.0f} MiB over {rss.samples} samples "
                      f"(before the kill {rss_held / MiB:.0f} MiB); handshakes dropped: {gw.dropped()}; "
                      f"swarm processes exited: {gave_up}"))]
