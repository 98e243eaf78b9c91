"""Overload against a real `fleetbus up`: a flood is shed with answers, never fatal.

A raw nats-py client publishes requests with reply subjects without waiting for each
answer, as a careless or hostile system on the bus would. What must hold: every
request gets an answer (an error code, never no responders or silence), nats-server
never drops fleetbus as a slow consumer, another requester's command runs meanwhile,
and its audit record is stored.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from fleetbus.admission import AdmissionSettings
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families
from support.processes import FLEETBUS, Fleet, wait_for

FLOOD = 270  # invalid requests of 1 MB: a 200,000-item argv, plus a field that does not exist
OVERSIZE = 30  # requests over the 1 MiB limit
DEADLINE_S = 60.0  # "did not hang": far above what any of this takes


def samples(fleet: Fleet, family: str) -> dict[str, float]:
    """The samples of one metric family, by their first label's value ("" for none)."""
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return {next(iter(s.labels.values()), ""): s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples if not s.name.endswith("_created")}


class Replies:
    """Every answer to requests published with reply subjects ``<inbox>.<n>``."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.got: dict[int, str] = {}

    async def start(self) -> None:
        await self.nc.subscribe(self.inbox + ".*", cb=self._on)

    async def _on(self, msg: Msg) -> None:
        n = int(msg.subject.rsplit(".", 1)[1])
        if msg.headers and msg.headers.get("Status") == "503":
            self.got[n] = "no responders"
            return
        reply = json.loads(msg.data)
        self.got[n] = "ok" if reply.get("ok") else reply["error"]["code"]

    async def wait(self, count: int) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while len(self.got) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def audit_record(nc: NATS, command_id: str) -> dict[str, Any] | None:
    js = nc.jetstream()
    info = await js.stream_info("FLEETBUS_AUDIT")
    for seq in range(info.state.last_seq, info.state.first_seq - 1, -1):
        msg = await js.get_msg("FLEETBUS_AUDIT", seq)
        record = json.loads(msg.data)
        if record["id"] == command_id:
            return record
    return None


async def test_a_burst_of_large_requests_is_answered_and_never_drops_fleetbus(fleet: Fleet, fleet_nc: NATS) -> None:
    replies = Replies(fleet_nc)
    await replies.start()
    invalid = json.dumps({"argv": ["x"] * 200_000, "bogus": 1}).encode()
    oversize = b"{" + b" " * (1536 * 1024) + b"}"
    assert 1_000_000 <= len(invalid) <= 1024 * 1024 < len(oversize)
    command_id = "overload-" + secrets.token_hex(4)
    real = await asyncio.create_subprocess_exec(
        FLEETBUS, "run", "local", "--id", command_id, "--", "echo", "ok",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=fleet.environ())
    started = time.monotonic()
    total = FLOOD + OVERSIZE
    for n in range(total):
        # Every tenth is over the limit; the whole burst spread over about 2 s.
        body = oversize if n % 10 == 9 else invalid
        await fleet_nc.publish("fleetbus.v1.servers.local.exec", body, reply=f"{replies.inbox}.{n}")
        await asyncio.sleep(max(0.0, started + 2.0 * (n + 1) / total - time.monotonic()))
    await fleet_nc.flush()

    out, err = await asyncio.wait_for(real.communicate(), DEADLINE_S)
    assert real.returncode == 0, err.decode()
    assert out.decode().strip() == "ok"
    await replies.wait(total)
    outcomes = Counter(replies.got.values())
    print(f"burst of {total}: {dict(outcomes)}; the real command took {time.monotonic() - started:.2f} s")
    assert len(replies.got) == total, f"{total - len(replies.got)} requests got no answer: {outcomes}"
    assert set(outcomes) <= {"invalid_request", "busy", "too_large"}, outcomes
    assert [replies.got[n] for n in range(9, total, 10)] == ["too_large"] * OVERSIZE

    log = (fleet.home / "nats.log").read_text(errors="replace")
    assert "Slow Consumer" not in log
    # Shed on arrival and counted: every oversize body, and every busy answer.
    shed = samples(fleet, "fleetbus_requests_shed")
    assert shed.get("too_large") == OVERSIZE
    assert shed.get("busy", 0) == outcomes["busy"]

    record = await audit_record(fleet_nc, command_id)
    assert record is not None, "the real command's audit record was lost"
    assert (record["outcome"], record["exit_code"], record["op"]) == ("ok", 0, "exec")


async def test_one_requester_holding_its_share_gets_busy_and_another_still_runs(
        fleet: Fleet, fleet_nc: NATS, tmp_path: Path) -> None:
    """Deterministic: commands queued behind a server's one slot count as waiting, so a
    requester alone may queue half the bound; past that it gets `busy`, while a
    command from another connection goes through."""
    added = fleet.cli("servers", "add", "one-slot", "--transport", "local", "--max-concurrency", "1")
    assert added.returncode == 0, added.stderr
    wait_for(lambda: fleet.cli("ping", "one-slot").returncode == 0, what="one-slot served")
    share = AdmissionSettings().max_waiting // 2
    extra = 50
    replies = Replies(fleet_nc)
    await replies.start()
    marker = tmp_path / "ran"
    # The first holds the slot (and stops when the server is removed); the rest wait for it.
    script = f"open({str(marker)!r}, 'a').write('x'); import time; time.sleep(120)"
    hold = {"argv": [sys.executable, "-c", script], "timeout_s": 150}
    await fleet_nc.publish("fleetbus.v1.servers.one-slot.exec", json.dumps(hold).encode(),
                           reply=f"{replies.inbox}.0")
    deadline = time.monotonic() + DEADLINE_S
    while not marker.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert marker.exists()
    queued = json.dumps({"argv": ["true"]}).encode()
    for n in range(1, share + extra + 1):
        await fleet_nc.publish("fleetbus.v1.servers.one-slot.exec", queued, reply=f"{replies.inbox}.{n}")
    await fleet_nc.flush()
    await replies.wait(extra)
    # Another connection is another requester: its command is admitted and runs.
    other = await asyncio.create_subprocess_exec(
        FLEETBUS, "run", "local", "--", "echo", "ok",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=fleet.environ())
    out, err = await asyncio.wait_for(other.communicate(), DEADLINE_S)
    try:
        assert other.returncode == 0, err.decode()
        assert out.decode().strip() == "ok"
        assert Counter(replies.got.values()) == {"busy": extra}
        assert sorted(replies.got) == list(range(share + 1, share + extra + 1))
        assert samples(fleet, "fleetbus_requests_waiting") == {"": share}
    finally:
        # Removing the server cancels the running command and every queued one.
        assert fleet.cli("servers", "remove", "one-slot").returncode == 0
    await replies.wait(share + extra + 1)
    outcomes = Counter(replies.got.values())
    assert outcomes == {"busy": extra, "cancelled": share + 1}, outcomes
    assert marker.read_text() == "x"
