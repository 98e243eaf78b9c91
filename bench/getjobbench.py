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
import statistics
import tempfile
import time
from pathlib import Path

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


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="getjobbench-") as tmp:
        work = Path(tmp)
        stack = await Stack.start(work)
        try:
            tag = "getbench"
            for i in range(args.servers):
                await stack.client.add_server({"name": f"gb-{i:03d}", "transport": "local", "labels": {"t": tag}})
            source = work / "payload.bin"
            source.write_bytes(os.urandom(args.mib * 1024 * 1024))
            deadline = time.monotonic() + 30
            while True:  # every server served
                reply = await stack.client.start_job({"selection": {"labels": {"t": tag}}, "op": "ping"})
                await one_summary(stack, reply["id"])
                got = await stack.client.get_job(reply["id"])
                if got["summary"]["counts"]["ok"] == args.servers or time.monotonic() > deadline:
                    break
            times: dict[int, list[float]] = {DOWNLOADS_AT_ONCE: [], 1: []}
            for r in range(args.rounds):
                for at_once in (DOWNLOADS_AT_ONCE, 1) if r % 2 == 0 else (1, DOWNLOADS_AT_ONCE):
                    dest = work / f"got-{r}-{at_once}"
                    times[at_once].append(await one_job(stack, tag, source, dest, at_once))
            print(f"cores {os.cpu_count()}; {args.servers} local servers, {args.mib} MiB each, {args.rounds} rounds")
            fast, slow = statistics.median(times[DOWNLOADS_AT_ONCE]), statistics.median(times[1])
            print(f"get job, {DOWNLOADS_AT_ONCE} downloads at once: median {fast:.2f} s  {times[DOWNLOADS_AT_ONCE]}")
            print(f"baseline, 1 download at once:   median {slow:.2f} s  {times[1]}")
            print(f"ratio: {fast / slow:.2f}x the baseline's wall time")
        finally:
            await stack.client.close()
            await asyncio.to_thread(stack.fleet.stop)


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
