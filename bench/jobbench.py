"""The benchmark figures of fleet jobs (issue 18): each job against what a client would
do without jobs, measured in the same run.

A job is timed from sending ``jobs.start`` to reading its ``finished`` record from the
jobs stream, which the core writes after the last server's result: "start to last result
stored", as a client following the job sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Self

from figures import MS, Row, Sizes, _exec_true, _interleaved
from fleetbus.errors import FleetbusError
from harness import Stack, stop_process

# The baseline client's requests in flight, from the table.
CLIENT_CONCURRENCY = 100
# The ping job's limit: a fleet-wide liveness check at the window request_rate uses,
# well under what one gateway holds in flight.
PING_CONCURRENCY = 512
# Servers for the ssh row: 50 registrations of the one local sshd, 10 at a time.
SSH_SERVERS = 50
SSH_CONCURRENCY = 10


class Summaries:
    """Every job's ``finished`` event as it is published, on one subscription made before
    any job starts, so a job that ends before ``jobs.start`` has replied is not missed.

    Timing by this rather than by following the job's records from the stream leaves out
    what the follower adds (creating and removing a JetStream consumer): the figure is the
    job's own cost. :func:`follower_seconds` measures the other way, for the note.
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.sub: Any = None

    def _future(self, job: str) -> asyncio.Future[dict[str, Any]]:
        return self.seen.setdefault(job, asyncio.get_running_loop().create_future())

    async def __aenter__(self) -> Self:
        async def on_finished(msg: Any) -> None:
            job = msg.subject.split(".")[-2]
            future = self._future(job)
            if not future.done():
                future.set_result(json.loads(msg.data))

        self.sub = await self.stack.client.nc.subscribe(self.stack.client.names.job_event("*", "finished"),
                                                        cb=on_finished)
        await self.stack.client.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def run(self, request: dict[str, Any], timeout: float = 300) -> tuple[float, dict[str, Any]]:
        """Seconds from sending ``jobs.start`` to the ``finished`` event, and that summary."""
        t0 = time.perf_counter()
        reply = await self.stack.client.start_job(request)
        summary = await asyncio.wait_for(self._future(reply["id"]), timeout)
        elapsed = time.perf_counter() - t0
        del self.seen[reply["id"]]
        return elapsed, summary


async def follower_seconds(stack: Stack, request: dict[str, Any]) -> float:
    """Seconds from ``jobs.start`` to reading the summary as a follower does (the CLI,
    the worked examples): from the jobs stream, through a consumer made after the reply."""
    t0 = time.perf_counter()
    reply = await stack.client.start_job(request)
    async with contextlib.aclosing(stack.client.follow_job(reply["id"])) as records:
        async for kind, body in records:
            if kind == "finished":
                _checked(body, len(reply["targets"]))
                return time.perf_counter() - t0
    raise RuntimeError(f"job {reply['id']} ended without a summary")


async def until_selected(stack: Stack, selection: dict[str, Any], n: int, timeout: float = 20) -> None:
    """Wait until the core resolves ``selection`` to ``n`` servers (a dry run), so a
    figure never times a core that has not yet seen servers registered a moment ago."""
    give_up = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FleetbusError):  # not_found while none is seen yet
            reply = await stack.client.start_job({"selection": selection, "op": "ping", "dry_run": True})
            if len(reply["targets"]) == n:
                return
        if time.monotonic() > give_up:
            raise TimeoutError(f"the core never selected {n} servers with {selection}")
        await asyncio.sleep(0.1)


def _checked(summary: dict[str, Any], n: int) -> None:
    """A figure of a job that did not succeed everywhere would measure something else."""
    if summary["state"] != "succeeded" or summary["counts"]["ok"] != n:
        raise RuntimeError(f"job did not succeed on all {n}: {summary}")


async def _singles(stack: Stack, names: list[str], concurrency: int) -> float:
    """Seconds for one client to run `exec true` once on each server, ``concurrency`` at once."""
    sem = asyncio.Semaphore(concurrency)

    async def one(name: str) -> None:
        async with sem:
            result = await stack.client.exec(name, ["true"], timeout_s=60)
            assert result.exit_code == 0

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n) for n in names))
    return time.perf_counter() - t0


async def job_agent_rows(stack: Stack, jobs: Summaries, sizes: Sizes, work: Path) -> list[Row]:
    """`exec true` on many agents as one job vs single requests, and a `ping` job over
    every agent held. The agents are stopped afterwards, so later rows do not carry them."""
    held = max(sizes.job_agents, sizes.agents_held)
    names = [f"bench-job-{i:05d}" for i in range(held)]
    keys = await stack.add_agents(names)
    before = len(stack.swarms)
    await stack.swarm(work / "job-swarms", keys, processes=max(1, min(4, held // 250)))
    try:
        await stack.wait_answering(names)
        fan = names[: sizes.job_agents]
        selection = {"servers": ["bench-job-*"]} if len(fan) == held else {"servers": fan}
        await until_selected(stack, selection, len(fan))
        await until_selected(stack, {"servers": ["bench-job-*"]}, held)
        exec_job = {"selection": selection, "exec": {"argv": ["true"]},
                    "max_concurrency": CLIENT_CONCURRENCY, "timeout_s": 60}
        await jobs.run(exec_job)  # warm: sessions opened, pools filled, on both sides
        await _singles(stack, fan, CLIENT_CONCURRENCY)
        jobs_s: list[float] = []
        singles_s: list[float] = []
        for _ in range(3):  # alternating, so a burst of other load lands on both
            seconds, summary = await jobs.run(exec_job)
            _checked(summary, len(fan))
            jobs_s.append(seconds)
            singles_s.append(await _singles(stack, fan, CLIENT_CONCURRENCY))
        job_s, single_s = statistics.median(jobs_s), statistics.median(singles_s)
        rows = [Row(f"exec true on {len(fan)} agents as one job", job_s * MS, single_s * MS, "ms",
                    "<= 2000 ms and ratio <= 1.0", job_s <= 2.0 and job_s <= single_s,
                    note=(f"start to last result stored, concurrency {CLIENT_CONCURRENCY}; baseline "
                          f"{len(fan)} single exec from one client, {CLIENT_CONCURRENCY} at once; "
                          "median of 3, alternating"))]
        ping_job = {"selection": {"servers": ["bench-job-*"]}, "op": "ping",
                    "max_concurrency": PING_CONCURRENCY, "timeout_s": 30}
        seconds, summary = await jobs.run(ping_job)
        _checked(summary, held)
        rows.append(Row(f"ping job over {held} agents held", seconds * MS, None, "ms", "<= 5000 ms",
                        seconds <= 5.0, note=f"one gateway, concurrency {PING_CONCURRENCY}"))
        return rows
    finally:
        for proc in stack.swarms[before:]:
            stop_process(proc)
        del stack.swarms[before:]


async def job_overhead(stack: Stack, jobs: Summaries, sizes: Sizes) -> list[Row]:
    """A 1-server job against one `exec true` on the same server, alternating."""
    single = {"selection": {"servers": ["local"]}, "exec": {"argv": ["true"]}, "timeout_s": 60}

    async def job() -> None:
        _, summary = await jobs.run(single)
        _checked(summary, 1)

    await until_selected(stack, {"servers": ["local"]}, 1)  # registered just after start-up
    n = max(10, sizes.exec_n // 4)  # a job writes three records: fewer samples, same minute
    ours, theirs = await _interleaved(job, _exec_true(stack, "local"), n)
    f, b = statistics.median(ours) * MS, statistics.median(theirs) * MS
    follow = statistics.median([await follower_seconds(stack, single) for _ in range(n)]) * MS
    return [Row("job overhead: 1-server job vs exec true, p50", f, b, "ms", "<= 2 ms more",
                f - b <= 2.0, note=(f"overhead {f - b:.2f} ms: start to the finished event, {n} alternating; "
                                    f"read as a follower does (a stream consumer made after the reply) "
                                    f"{follow:.2f} ms"))]


async def job_ssh_rows(stack: Stack, jobs: Summaries) -> list[Row]:
    """`exec true` on 50 ssh servers as one job vs `xargs -P 10 ssh` to the same sshd."""
    try:
        from sshbench import _ssh_opts, _sshd
    except ImportError:
        return []
    server, key = _sshd()
    with contextlib.suppress(Exception):  # already there when sshbench's rows ran first
        await stack.client.add_credential("bench-job-key", "ssh-key", key.read_bytes(), user="root")
    names = [f"bench-job-ssh-{i:02d}" for i in range(SSH_SERVERS)]
    for name in names:
        await stack.client.add_server({"name": name, "transport": "ssh", "host": server.host,
                                       "port": server.port, "credential": "bench-job-key",
                                       "labels": {"bench": "job-ssh"},
                                       "options": {"host_key": server.host_key_line}})
    await until_selected(stack, {"labels": {"bench": "job-ssh"}}, SSH_SERVERS)
    request = {"selection": {"labels": {"bench": "job-ssh"}}, "exec": {"argv": ["true"]},
               "max_concurrency": SSH_CONCURRENCY, "timeout_s": 60}
    ssh = ["ssh", *_ssh_opts(key), "-p", str(server.port), f"root@{server.host}", "true"]

    def xargs() -> float:
        # One fresh ssh connection per server, as a shell loop over a host list makes.
        t0 = time.perf_counter()
        subprocess.run(["xargs", "-P", str(SSH_CONCURRENCY), "-I{}", *ssh],
                       input="\n".join(names), text=True, check=True, capture_output=True)
        return time.perf_counter() - t0

    cold, summary = await jobs.run(request)  # each server's first: a new ssh session
    _checked(summary, SSH_SERVERS)
    base = await asyncio.to_thread(xargs)
    warm, summary = await jobs.run(request)  # sessions kept open by the pool
    _checked(summary, SSH_SERVERS)
    return [Row(f"exec true on {SSH_SERVERS} ssh servers as one job", cold * MS, base * MS, "ms",
                "ratio <= 0.5 (vs xargs -P 10 ssh)", cold / base <= 0.5,
                note=(f"first job, every session new; concurrency {SSH_CONCURRENCY}; the same job "
                      f"again on open sessions {warm * MS:.0f} ms ({warm / base:.2f}x)"))]


async def job_rows(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    async with Summaries(stack) as jobs:
        rows = await job_overhead(stack, jobs, sizes)
        rows += await job_agent_rows(stack, jobs, sizes, work)
        rows += await job_ssh_rows(stack, jobs)
    return rows
