"""The benchmarks run (at tiny sizes) and report every figure; no timing is asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Every figure starts its own parts (a dozen stacks, gateways killed and restarted, an
# sshd): about two minutes on a loaded two-core machine, over the suite's default.
@pytest.mark.timeout(300)
def test_bench_smoke_reports_every_figure() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["machine"]["cores"] and report["machine"]["python"]
    figures = {row["figure"] for row in report["rows"]}
    for expected in ("fleetbus up to first command answered", "exec true on local, p50",
                     "exec true via outbound agent, p50", "idle agent resident memory",
                     "exec true on ssh, p50"):
        assert expected in figures, figures
    assert any(f.startswith("agents held by one gateway") for f in figures)
    assert any(f.startswith("ping all") for f in figures)
    # Issue 22: the scale rows on a gateway process of its own, and the gateway against its floor.
    for part in ("ping job over 10 agents on one gateway process", "reconnect storm: 10 agents",
                 "gateway CPU per ping over 10 agents vs the floor relay", "ping/s over 10 agents, one gateway",
                 "ping/s over 20 agents split over two gateway processes", "8 MiB put via outbound agent vs its floor",
                 "CPU seconds per GiB, 8 MiB put via outbound agent vs scp + sshd",
                 "idle CPU of one gateway, 20 idle agents"):
        assert any(f.startswith(part) for f in figures), (part, figures)
    assert any("put via outbound agent" in f for f in figures)
    assert any("put on ssh" in f for f in figures) and any("get on ssh" in f for f in figures)
    # The floors: each figure again through the bus and transport layers alone.
    assert "floor: exec true through the bus, p50" in figures
    for part in ("floor: ping/s", "floor: 8 MiB put over the bus", "floor: 8 MiB put on ssh",
                 "floor: 8 MiB get on ssh", "ssh transport alone: 8 MiB put", "ssh transport alone: 8 MiB get"):
        assert any(f.startswith(part) for f in figures), (part, figures)
    # Fleet jobs (issue 18), each against its baseline of the same run.
    for part in ("job overhead: 1-server job vs exec true", "exec true on 10 agents as one job",
                 "ping job over 10 agents held", "exec true on 50 ssh servers as one job",
                 "get job: 1 MiB from 20 servers", "8 MiB put to 20 agents as one job"):
        assert any(f.startswith(part) for f in figures), (part, figures)
    # On a NATS cluster (issue 20): a node killed, a gateway killed, and R3 against one NATS.
    for part in ("commands failing while one of three NATS nodes is killed",
                 "exec true with an id on a 3-node cluster (R3), p50",
                 "agents of a killed gateway answering through the other"):
        assert any(f.startswith(part) for f in figures), (part, figures)
    # A failing window is 0 s when no command failed; every other figure is a time or a rate.
    may_be_zero = {"commands failing while one of three NATS nodes is killed"}
    for row in report["rows"]:
        assert math.isfinite(row["fleetbus"]) and (row["fleetbus"] > 0 or (
            row["figure"] in may_be_zero and row["fleetbus"] == 0)), row
        if row["baseline"] is not None:
            assert row["baseline"] > 0 and row["ratio"] > 0, row
