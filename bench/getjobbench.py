"""`fleetbus get` on a selection: the requester fetching the servers' files a few at a
time (``DOWNLOADS_AT_ONCE``) against one at a time, in the same run.

Both sides run the same real `get` job on `local` servers of a `fleetbus up` and follow
it with the CLI's own code (:func:`fleetbus.cli.jobs.follow` with the download hook of
``fleetbus get``); only the number of downloads at once differs. Rounds alternate so a
load that drifts over the run weighs on both alike.

    .venv/bin/python bench/getjobbench.py [--servers 20] [--mib 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from figures import MS, Row, Sizes
from fleetbus.cli.jobfiles import fetcher
from fleetbus.cli.jobs import follow
from fleetbus.jobfiles import DOWNLOADS_AT_ONCE, Downloads
from harness import Stack


async def one_job(stack: Stack, tag: str, source: Path, dest: Path, at_once: int) -> float:
    c = stack.client
    failed: list[str] = []
    started = time.perf_counter()
    reply = await c.start_job({"selection": {"labels": {"t": tag}}, "op": "get", "get": {"path": str(source)},
                               "max_concurrency": 100})
    with contextlib.redirect_stdout(io.StringIO()):
        code = await follow(c, reply, True, on_result=fetcher(Downloads(c.files, dest, source.name, at_once),
                                                               failed))
    elapsed = time.perf_counter() - started
    assert code == 0 and not failed, (code, failed)
    return elapsed


# Servers and size of the row in bench/run.py: enough files that downloads at once
# matter, small enough for the quick run.
SERVERS = 20
MIB = 16


async def get_job_rows(stack: Stack, sizes: Sizes, work: Path, servers: int = SERVERS,
                       mib: int | None = None, rounds: int | None = None) -> list[Row]:
    """A `get` job over ``servers`` local servers, downloads ``DOWNLOADS_AT_ONCE`` at a
    time, against the same job downloading one at a time, alternating rounds."""
    mib = mib or max(1, min(MIB, sizes.put_mib // 8))  # the smoke run: 1 MiB
    rounds = rounds or max(1, sizes.transfer_rounds + 1)
    tag = "getbench"
    for i in range(servers):
        await stack.client.add_server({"name": f"gb-{i:03d}", "transport": "local", "labels": {"t": tag}})
    source = work / "getjob-payload.bin"
    source.write_bytes(os.urandom(mib * 1024 * 1024))
    deadline = time.monotonic() + 30
    while True:  # every server served
        reply = await stack.client.start_job({"selection": {"labels": {"t": tag}}, "op": "ping"})
        await one_summary(stack, reply["id"])
        got = await stack.client.get_job(reply["id"])
        if got["summary"]["counts"]["ok"] == servers:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {servers} get-bench servers never all answered ping")
    times: dict[int, list[float]] = {DOWNLOADS_AT_ONCE: [], 1: []}
    for r in range(rounds):
        for at_once in (DOWNLOADS_AT_ONCE, 1) if r % 2 == 0 else (1, DOWNLOADS_AT_ONCE):
            dest = work / f"got-{r}-{at_once}"
            times[at_once].append(await one_job(stack, tag, source, dest, at_once))
            shutil.rmtree(dest, ignore_errors=True)
    fast, slow = statistics.median(times[DOWNLOADS_AT_ONCE]), statistics.median(times[1])
    return [Row(f"get job: {mib} MiB from {servers} servers", fast * MS, slow * MS, "ms",
                "ratio < 1.0 (vs one download at a time)", fast < slow,
                note=(f"{DOWNLOADS_AT_ONCE} downloads at once vs 1, the same job otherwise; "
                      f"median of {rounds}, alternating"))]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="getjobbench-") as tmp:
        work = Path(tmp)
        stack = await Stack.start(work)
        try:
            sizes = Sizes.of("quick")
            for row in await get_job_rows(stack, sizes, work, args.servers, args.mib, args.rounds):
                print(f"cores {os.cpu_count()}; {row.figure}: {row.fleetbus:.0f} ms vs {row.baseline:.0f} ms "
                      f"= {row.ratio:.2f}x ({row.note})")
        finally:
            await stack.stop()


async def one_summary(stack: Stack, job: str) -> None:
    async with contextlib.aclosing(stack.client.follow_job(job)) as records:
        async for kind, _body in records:
            if kind == "finished":
                return


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
