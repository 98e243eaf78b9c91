"""Run every fleetbus benchmark and print figure, fleetbus, baseline, ratio, target, holds.

    python3 dev.py bench            # full figures (several minutes)
    python3 dev.py bench --quick    # under two minutes
    .venv/bin/python bench/run.py --smoke --json   # seconds; what the test suite runs
    .venv/bin/python bench/run.py --only gateway   # gateway vs its floor relay, one vs two gateways
    .venv/bin/python bench/run.py --only scale --agents 15000   # issue 22's full scale and storm
    .venv/bin/python bench/run.py --only idle --agents 15000    # issue 22's idle cost, measured, not extrapolated

Absolute times on a shared machine drift; ratios against a baseline measured in the
same run hold. The machine (cores, Python, kernel) is printed with every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clusterbench import cluster_rows
from figures import Row, Sizes, describe, exec_agent, exec_local, put_agent, up_to_first_command
from floors import floor_rows
from gatewaybench import gateway_rows, split_rows
from getjobbench import get_job_rows
from harness import Stack
from idlebench import idle_rows
from jobbench import job_rows
from jobputbench import job_put_rows
from scalebench import raise_fd_limit, scale_rows
from transfercpu import put_cpu_rows


def machine() -> dict[str, str]:
    return {"cores": str(os.cpu_count()), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_model()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def print_table(rows: list[Row]) -> None:
    headers = ["figure", "fleetbus", "baseline", "unit", "ratio", "target", "holds", "note"]
    cells = [[r.figure, _fmt(r.fleetbus), _fmt(r.baseline), r.unit, _fmt(r.ratio), r.target,
              {True: "yes", False: "NO", None: "-"}[r.holds], r.note] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)))
    for c in cells:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(c)).rstrip())


async def main(args: argparse.Namespace) -> list[Row]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = Sizes.of(mode)
    rows: list[Row] = []
    scp = None
    try:
        from sshbench import scp_baseline  # needs a real sshd; absent: rows say so
        scp = scp_baseline
    except ImportError:
        pass
    keep = contextlib.nullcontext(args.workdir) if args.workdir else None
    with keep or tempfile.TemporaryDirectory(prefix="fleetbus-bench-") as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        wanted = set(args.only or [])

        def on(name: str) -> bool:
            return not wanted or name in wanted

        if on("startup"):
            rows += await up_to_first_command(work)
        stack = await Stack.start(work)
        try:
            if on("local"):
                rows += await exec_local(stack, sizes, work)
            if on("agent"):
                rows += await exec_agent(stack, sizes, work)
            if on("put"):
                rows += await put_agent(stack, sizes, work, scp)
                rows += await put_cpu_rows(stack, sizes, work)
            if on("floors"):
                # Before the scale rows: their thousands of agents stay connected.
                rows += await floor_rows(stack, sizes, work, scp)
            if on("jobs"):
                # Also before the scale rows; their own agents are stopped when they end.
                rows += await job_rows(stack, sizes, work)
                rows += await job_put_rows(stack, sizes, work)
                rows += await get_job_rows(stack, sizes, work)
            if on("cluster"):
                # Before the scale rows, whose thousands of agents would load the
                # baseline's `fleetbus up`; its own processes are stopped when it ends.
                rows += await cluster_rows(stack, work, mode)
            if on("gateway"):
                # Their agents and gateways are stopped when each ends.
                rows += await gateway_rows(stack, sizes, work, mode)
                rows += await split_rows(stack, sizes, work, mode)
            if on("idle"):
                rows += await idle_rows(work / "idle", mode, args.agents)
            if on("scale"):
                rows += await scale_rows(stack, work, args.agents or sizes.agents_held, args.gateway_setting)
        finally:
            await stack.stop()
        if on("ssh"):
            try:
                from sshbench import ssh_rows
            except ImportError:
                ssh_rows = None
            if ssh_rows is not None:
                rows += await ssh_rows(work, sizes)
    return rows


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under two minutes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmarks work")
    parser.add_argument("--only", action="append", choices=["startup", "local", "agent", "put", "floors", "jobs", "cluster", "gateway", "scale", "idle", "ssh"])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--gateway-setting", action="append", metavar="KEY=VALUE",
                        help="an agent-outbound setting for the scale rows' gateway (repeatable)")
    parser.add_argument("--workdir", help="keep every process's files and logs here (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--agents", type=int, help="agents for the scale and idle rows (default: by mode; issue 22: 15000)")
    args = parser.parse_args()
    started = time.perf_counter()
    # This process spawns the local exec baseline with asyncio and is the client of the
    # put/get rows: it tunes itself as fleetbus's own processes do (the pidfd child
    # watcher, the heap for 1 MiB buffers), and not at all with FLEETBUS_TUNING=off.
    from fleetbus import tuning

    tuning.apply((*tuning.TRANSFER, "pidfd_child_watcher"))
    raise_fd_limit()  # the swarms it starts hold one descriptor per agent
    try:
        rows = asyncio.run(main(args))
    finally:
        try:
            import sshbench

            sshbench.stop()
        except ImportError:
            pass
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "rows": describe(rows)}, indent=2, default=str))
    else:
        print(f"machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}, {info['platform']}")
        print_table(rows)
        print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
