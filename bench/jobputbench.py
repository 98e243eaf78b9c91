"""A file to many agents as one ``put`` job (issue 18) against ``scp`` of it to the local
sshd, 8 at a time, in the same run.

The job is timed as ``fleetbus put --servers ...`` runs it: from the start of the upload
(once, into the object store) to the job's ``finished`` record, read as a follower does.
The baseline is ``xargs -P 8`` running one ``scp`` per target to the bench's local sshd,
each into a file of its own. Every agent here is on this machine, so the job's targets
all write the one path (each to a temporary file renamed into place); each target's
SHA-256 is checked by its worker before the rename, and the summary must say all ok.

The note gives what the requester sent (its NATS connection's ``out_bytes``) and what
the worker read from the object store (``fleetbus_object_read_bytes_total``), each as
a multiple of the file.

    .venv/bin/python bench/jobputbench.py [--quick|--smoke]   # this row alone
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import MS, Row, Sizes, source_file
from fleetbus.jobfiles import upload
from harness import Stack, stop_process

AGENTS = 20
SCP_PARALLEL = 8
# The row's size; the smoke run's 8 MiB only checks that the row works.
PUT_MIB = 64
METRIC = "fleetbus_object_read_bytes_total"


async def job_put_rows(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    try:
        from sshbench import _ssh_opts, _sshd
    except ImportError:
        return []
    mib = min(PUT_MIB, sizes.put_mib)
    src, digest = await source_file(work, mib)
    names = [f"bench-putjob-{i:02d}" for i in range(AGENTS)]
    keys = await stack.add_agents(names)
    before = len(stack.swarms)
    # Four agent processes of five connections each: the agents' share of the two
    # cores, with less start-up than twenty interpreters.
    await stack.swarm(work / "putjob-swarms", keys, processes=4)
    server, key = _sshd()
    scp_dir = Path(tempfile.mkdtemp(prefix="fleetbus-bench-scp-"))
    scp = ["scp", "-q", *_ssh_opts(key), "-P", str(server.port), str(src)]
    try:
        await stack.wait_answering(names)
        remote = work / "putjob-dest" / "build.bin"
        size = src.stat().st_size

        async def job() -> tuple[float, int, float]:
            """Seconds, bytes the requester sent, bytes the worker read from the store."""
            read_before = await _metric(stack)
            sent_before = stack.client.nc.stats["out_bytes"]
            t0 = time.perf_counter()
            stored = await upload(stack.client.files, src)
            try:
                reply = await stack.client.start_job({
                    "selection": {"servers": names}, "op": "put", "max_concurrency": AGENTS,
                    "timeout_s": 600,
                    "put": {"path": str(remote), "object": stored.name, "sha256": stored.sha256,
                            "size": stored.size}})
                summary = None
                async with contextlib.aclosing(stack.client.follow_job(reply["id"])) as records:
                    async for kind, body in records:
                        if kind == "finished":
                            summary = body
                elapsed = time.perf_counter() - t0
            finally:
                await stack.client.files.delete(stored.name)
            if stored.sha256 != digest or not summary or summary["counts"]["ok"] != AGENTS:
                raise RuntimeError(f"the put job did not succeed on all {AGENTS}: {summary}")
            read = await _metric(stack)
            return elapsed, stack.client.nc.stats["out_bytes"] - sent_before, read - read_before

        def baseline() -> float:
            t0 = time.perf_counter()
            subprocess.run(["xargs", "-P", str(SCP_PARALLEL), "-I{}", *scp, f"root@{server.host}:{scp_dir}/{{}}"],
                           input="\n".join(names), text=True, check=True, capture_output=True)
            elapsed = time.perf_counter() - t0
            for name in names:
                (scp_dir / name).unlink()
            return elapsed

        await job()  # warm: agent streams, the gateway's buffers, the page cache of the source
        ours: list[float] = []
        theirs: list[float] = []
        sent = read = 0.0
        for i in range(sizes.transfer_rounds):
            # Alternating which goes first, as the other transfer rows do.
            if i % 2:
                theirs.append(await asyncio.to_thread(baseline))
            seconds, sent_bytes, read_bytes = await job()
            ours.append(seconds)
            sent, read = sent_bytes / size, read_bytes / size
            if not i % 2:
                theirs.append(await asyncio.to_thread(baseline))
        f, b = statistics.median(ours), statistics.median(theirs)
        return [Row(f"{mib} MiB put to {AGENTS} agents as one job", f * MS, b * MS, "ms",
                    "ratio <= 1.0 (vs scp -P 8); sent 1x", f <= b and sent <= 1.01,
                    note=(f"upload to finished, concurrency {AGENTS}; baseline {AGENTS} scp to the local "
                          f"sshd, {SCP_PARALLEL} at a time; median of {len(ours)}, alternating; requester "
                          f"sent {sent:.3f}x the file, the worker read {read:.2f}x"))]
    finally:
        for proc in stack.swarms[before:]:
            stop_process(proc)
        del stack.swarms[before:]
        for name in names:
            with contextlib.suppress(Exception):
                await stack.client.remove_server(name)
        with contextlib.suppress(OSError):
            scp_dir.rmdir()


async def _metric(stack: Stack) -> float:
    """The worker's bytes read from the object store so far (`fleetbus up` is the worker);
    NaN where /metrics is off."""
    found = await asyncio.to_thread(stack.gateway_metrics, METRIC)
    return found.get(METRIC, float("nan"))


async def _main(mode: str) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="fleetbus-bench-") as tmp:
        stack = await Stack.start(Path(tmp))
        try:
            return await job_put_rows(stack, Sizes.of(mode), Path(tmp))
        finally:
            await stack.stop()


if __name__ == "__main__":
    from run import print_table

    mode = "smoke" if "--smoke" in sys.argv else "quick" if "--quick" in sys.argv else "full"
    try:
        print_table(asyncio.run(_main(mode)))
    finally:
        import sshbench

        sshbench.stop()
