"""Fleet jobs through the bus, against a real `fleetbus up` with real `local` servers.

Each test registers its own servers, all with a label ``t=<tag>`` unique to the test,
so tests sharing the module's stack never select each other's servers. Commands record
what they saw in a folder shared with the test: that is where concurrency is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy
from support.agents import Agent, gateway_of
from support.processes import FLEETBUS, Fleet, pid_alive, shared_env, wait_for

PREFIX = "fleetbus"
# Each command: mark itself running, record how many it saw running, hold, unmark.
COUNTING = ('S=$FLEETBUS_SERVER; mkdir -p "$D/run"; touch "$D/run/$S"; ls "$D/run" | wc -l >> "$D/seen.$S"; '
            'echo "$S" >> "$D/order"; sleep {hold}; rm "$D/run/$S"; {tail}')


async def request(nc: NATS, subject: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    return json.loads(msg.data)


async def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    give_up = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def register(nc: NATS, name: str, tag: str, roles: list[str] = (), env: str | None = None,
                   transport: str = "local", **labels: str) -> None:
    server = {"name": name, "transport": transport, "roles": list(roles), "environment": env,
              "labels": {"t": tag, **labels}}
    reply = await request(nc, f"{PREFIX}.v1.admin.servers.add", {"server": server})
    assert reply["ok"], reply
    if transport != "local":
        return

    async def served() -> bool:
        got = await request(nc, f"{PREFIX}.v1.admin.servers.get", {"name": name})
        return (got.get("status") or {}).get("state") == "online"

    await wait_until(served, what=f"{name} served")


@pytest.fixture
def tag() -> str:
    return secrets.token_hex(3)


async def start(nc: NATS, body: dict[str, Any]) -> dict[str, Any]:
    reply = await request(nc, f"{PREFIX}.v1.jobs.start", body)
    assert reply["ok"], reply
    return reply


async def follow(nc: NATS, job: str, timeout: float = 60) -> list[tuple[str, dict[str, Any]]]:
    """Every kept event of ``job`` from its start to ``finished``, as a bus client reads
    them: a JetStream ordered consumer, so none is missed however late it subscribes."""
    js = nc.jetstream()
    sub = await js.subscribe(f"{PREFIX}.v1.events.jobs.{job}.*", ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    events = []
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            kind = msg.subject.rsplit(".", 1)[-1]
            events.append((kind, json.loads(msg.data)))
            if kind == "finished":
                return events
    finally:
        await sub.unsubscribe()


def results(events: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {body["server"]: body for kind, body in events if kind == "result"}


def max_seen(folder: Path) -> int:
    return max(int(line) for f in folder.glob("seen.*") for line in f.read_text().split())


@pytest.fixture
async def nc(fleet: Fleet) -> AsyncIterator[NATS]:
    import nats

    conn = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    yield conn
    await conn.close()


async def test_selection_is_exact_and_empty_or_unmatched_is_an_error(nc: NATS, tag: str) -> None:
    await register(nc, f"{tag}-web-1", tag, ["web"], "production", team="core")
    await register(nc, f"{tag}-web-2", tag, ["web"], "production", team="edge")
    await register(nc, f"{tag}-web-3", tag, ["web"], "staging", team="core")
    await register(nc, f"{tag}-db-1", tag, ["db"], "production", team="core")

    async def targets(**selection: Any) -> list[str]:
        reply = await start(nc, {"selection": {"labels": {"t": tag, **selection.pop("labels", {})},
                                               **selection}, "op": "ping", "dry_run": True})
        assert reply["dry_run"] and reply["id"] is None
        return reply["targets"]

    assert await targets(role="web", environment="production") == [f"{tag}-web-1", f"{tag}-web-2"]
    assert await targets(labels={"team": "core"}) == [f"{tag}-db-1", f"{tag}-web-1", f"{tag}-web-3"]
    assert await targets(servers=[f"{tag}-web-*", f"{tag}-db-1"], environment="production") == [
        f"{tag}-db-1", f"{tag}-web-1", f"{tag}-web-2"]
    empty = await request(nc, f"{PREFIX}.v1.jobs.start", {"selection": {}, "op": "ping"})
    assert empty["error"]["code"] == "invalid_request" and "selection is empty" in empty["error"]["message"]
    none = await request(nc, f"{PREFIX}.v1.jobs.start",
                         {"selection": {"role": "nope", "labels": {"t": tag}}, "op": "ping"})
    assert none["error"]["code"] == "not_found" and "no server matches" in none["error"]["message"]
    bad = await request(nc, f"{PREFIX}.v1.jobs.start",
                        {"selection": {"all": True}, "op": "exec", "exec": {"argv": ["true"], "id": "x"}})
    assert bad["error"]["code"] == "invalid_request"
    deputy = await request(nc, f"{PREFIX}.v1.jobs.start", {
        "selection": {"all": True}, "exec": {"argv": ["true"], "output_subject": f"{PREFIX}.v1.admin.servers.remove"}})
    assert deputy["error"]["code"] == "invalid_request" and "reply subject" in deputy["error"]["message"]
    # A dry run starts nothing and keeps nothing.
    listed = await request(nc, f"{PREFIX}.v1.jobs.list", {})
    assert all(tag not in json.dumps(j) for j in listed["jobs"])


async def test_a_bus_client_runs_a_job_and_reads_it_back(nc: NATS, tag: str, tmp_path: Path) -> None:
    for i in range(1, 7):
        await register(nc, f"{tag}-w{i}", tag, ["web"])
    script = COUNTING.format(hold="0.8", tail='echo "hello from $S"')
    reply = await start(nc, {"selection": {"labels": {"t": tag}},
                             "exec": {"shell": script, "env": {"D": str(tmp_path), "TOKEN": "s3cr3t"},
                                      "stdin": "more-s3cr3t"},
                             "max_concurrency": 2, "timeout_s": 30})
    job = reply["id"]
    # Environment values and stdin may be secrets: the records keep names and a length.
    assert reply["definition"]["request"]["exec"]["env"] == {"D": "(not kept)", "TOKEN": "(not kept)"}
    assert reply["definition"]["request"]["exec"]["stdin_bytes"] == len("more-s3cr3t")
    assert reply["targets"] == [f"{tag}-w{i}" for i in range(1, 7)]
    events = await follow(nc, job)
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("result") == 6
    got = results(events)
    assert all(r["outcome"] == "ok" and r["exit_code"] == 0 for r in got.values())
    assert got[f"{tag}-w3"]["stdout"] == f"hello from {tag}-w3\n"  # FLEETBUS_SERVER, per server
    finished = events[-1][1]
    assert finished["state"] == "succeeded" and finished["counts"]["ok"] == 6
    assert max_seen(tmp_path) == 2  # measured on the servers: never more than the limit

    record = await request(nc, f"{PREFIX}.v1.jobs.get", {"id": job})
    assert record["state"] == "succeeded" and record["job"]["targets"] == reply["targets"]
    assert "s3cr3t" not in json.dumps(record) and "s3cr3t" not in json.dumps(events)
    assert {r["server"] for r in record["results"]} == set(reply["targets"])
    assert record["results"][0]["command_id"] == f"{job}-{record['results'][0]['server']}"
    listed = await request(nc, f"{PREFIX}.v1.jobs.list", {"limit": 5})
    assert listed["jobs"][0]["id"] == job and listed["jobs"][0]["counts"]["ok"] == 6
    missing = await request(nc, f"{PREFIX}.v1.jobs.get", {"id": "0" * 16})
    assert missing["error"]["code"] == "not_found"

    # The audit trail: who started the job, and each server's command as the job's.
    js = nc.jetstream()

    async def audited(subject: str, record_id: str) -> dict[str, Any] | None:
        try:
            record = json.loads((await js.get_last_msg("FLEETBUS_AUDIT", subject)).data)
        except Exception:
            return None
        return record if record["id"] == record_id else None  # ours, not an earlier one

    started = await wait_until(lambda: audited(f"{PREFIX}.v1.audit._admin.jobs.start", job),
                               what="jobs.start audited")
    assert started["transport"] == "jobs" and "on 6 servers" in started["summary"]
    command = await wait_until(lambda: audited(f"{PREFIX}.v1.audit.{tag}-w3.exec", f"{job}-{tag}-w3"),
                               what="a job's command audited")
    assert command["requester"].endswith(f"(job {job})")


async def test_error_budget_stops_new_starts_exactly_after_max_errors(fleet: Fleet, nc: NATS, tag: str,
                                                                       tmp_path: Path) -> None:
    for i in range(1, 7):
        await register(nc, f"{tag}-s{i}", tag)
    # s2 and s4 fail. With max_errors 1 the first error holds the budget and the second
    # (errors 2 > 1) spends it: s1..s4 run, s5 and s6 never start.
    script = COUNTING.format(hold="0", tail='case "$S" in *-s2|*-s4) echo "broke on $S" >&2; exit 1;; esac')
    reply = await start(nc, {"selection": {"labels": {"t": tag}},
                             "exec": {"shell": script, "env": {"D": str(tmp_path)}},
                             "max_concurrency": 1, "max_errors": 1})
    events = await follow(nc, reply["id"])
    got = results(events)
    assert (tmp_path / "order").read_text().split() == [f"{tag}-s{i}" for i in range(1, 5)]
    assert {s: r["outcome"] for s, r in got.items()} == {
        f"{tag}-s1": "ok", f"{tag}-s2": "failed", f"{tag}-s3": "ok", f"{tag}-s4": "failed",
        f"{tag}-s5": "skipped", f"{tag}-s6": "skipped"}
    assert got[f"{tag}-s4"]["exit_code"] == 1 and got[f"{tag}-s4"]["stderr"] == f"broke on {tag}-s4\n"
    summary = events[-1][1]
    assert summary["state"] == "stopped" and summary["stop_reason"] == "budget"

    async def counted() -> bool:  # counted as the job's task ends, just after its last record
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(fleet.metrics_url, timeout=10).read().decode())
        return bool(re.search(r'^fleetbus_jobs_finished_total\{op="exec",state="stopped",stop_reason="budget"\} [1-9]',
                              text, re.MULTILINE) and re.search(r"^fleetbus_jobs_running 0\.0$", text, re.MULTILINE))

    await wait_until(counted, what="the job counted in the core's metrics")
    assert summary["counts"] == {"total": 6, "ok": 2, "failed": 2, "cancelled": 0, "skipped": 2,
                                 "unknown": 0, "running": 0, "waiting": 0, "pending": 0}


async def test_canary_then_strict_batches(nc: NATS, tag: str, tmp_path: Path) -> None:
    for i in range(1, 6):
        await register(nc, f"{tag}-b{i}", tag)
    script = 'S=$FLEETBUS_SERVER; date +%s.%N > "$D/start.$S"; sleep 1; date +%s.%N > "$D/end.$S"'
    reply = await start(nc, {"selection": {"labels": {"t": tag}},
                             "exec": {"shell": script, "env": {"D": str(tmp_path)}},
                             "max_concurrency": 10, "canary": 1, "batch": 2})
    assert reply["definition"]["canary"] == 1 and reply["definition"]["batch"] == 2
    assert (await follow(nc, reply["id"]))[-1][1]["state"] == "succeeded"

    def at(kind: str, i: int) -> float:
        return float((tmp_path / f"{kind}.{tag}-b{i}").read_text())

    waves = [[1], [2, 3], [4, 5]]
    for earlier, later in itertools.pairwise(waves):
        assert max(at("end", i) for i in earlier) <= min(at("start", i) for i in later)
    # Inside a wave the servers ran together, not one after the other (each holds 1 s,
    # so a start delayed by a loaded machine still falls inside its partner's run).
    assert at("start", 3) < at("end", 2) and at("start", 5) < at("end", 4)


async def test_a_failed_canary_starts_nothing_else(nc: NATS, tag: str, tmp_path: Path) -> None:
    for i in range(1, 4):
        await register(nc, f"{tag}-c{i}", tag)
    reply = await start(nc, {"selection": {"labels": {"t": tag}}, "canary": 1,
                             "exec": {"shell": 'echo "$FLEETBUS_SERVER" >> "$D/order"; exit 3',
                                      "env": {"D": str(tmp_path)}}})
    events = await follow(nc, reply["id"])
    assert (tmp_path / "order").read_text().split() == [f"{tag}-c1"]
    assert [r["outcome"] for r in results(events).values()] == ["failed", "skipped", "skipped"]
    assert events[-1][1]["stop_reason"] == "canary"


async def test_an_offline_server_is_an_error_at_once(nc: NATS, tag: str) -> None:
    await register(nc, f"{tag}-on", tag)
    await register(nc, f"{tag}-off", tag, transport="no-such-transport")
    began = time.monotonic()
    reply = await start(nc, {"selection": {"labels": {"t": tag}}, "exec": {"argv": ["true"]},
                             "timeout_s": 60})
    events = await follow(nc, reply["id"])
    assert time.monotonic() - began < 10  # not a per-server timeout's wait
    got = results(events)
    assert got[f"{tag}-off"]["outcome"] == "offline"
    assert got[f"{tag}-off"]["error"]["code"] == "server_offline"
    assert got[f"{tag}-on"]["outcome"] == "ok" and events[-1][1]["state"] == "failed"


async def add_agent(nc: NATS, name: str, tag: str, **labels: str) -> str:
    """An agent-outbound server (its agent not connected); returns its key."""
    server = {"name": name, "transport": "agent-outbound", "labels": {"t": tag, **labels}}
    reply = await request(nc, f"{PREFIX}.v1.admin.servers.add", {"server": server})
    assert reply["ok"], reply
    return reply["key"]


async def test_wait_online_picks_up_an_agent_that_connects_mid_job(fleet: Fleet, nc: NATS, tag: str,
                                                                    tmp_path: Path) -> None:
    await register(nc, f"{tag}-local", tag, w="yes")
    key = await add_agent(nc, f"{tag}-agent", tag, w="yes")
    gateway = await asyncio.to_thread(gateway_of, fleet)
    progress: list[dict[str, Any]] = []
    waiting = asyncio.Event()

    async def on_progress(msg: Any) -> None:
        body = json.loads(msg.data)
        progress.append(body)
        if body["counts"]["waiting"] == 1:
            waiting.set()

    sub = await nc.subscribe(f"{PREFIX}.v1.events.jobs.*.progress", cb=on_progress)
    agent: Agent | None = None
    try:
        reply = await start(nc, {"selection": {"labels": {"t": tag, "w": "yes"}},
                                 "exec": {"shell": 'echo "ran on $FLEETBUS_SERVER"'},
                                 "timeout_s": 60, "wait_online_s": 60, "max_errors": 0})
        await asyncio.wait_for(waiting.wait(), 20)  # the job says the agent's server waits
        waited = [p for p in progress if p["job"] == reply["id"] and p["counts"]["waiting"] == 1]
        assert waited and waited[-1]["counts"]["failed"] == 0  # waiting is not an error
        agent = Agent(tmp_path / "agent", gateway["address"], gateway["fingerprint"], key).start()
        events = await follow(nc, reply["id"])
    finally:
        await sub.unsubscribe()
        if agent is not None:
            agent.stop()
    got = results(events)
    assert got[f"{tag}-agent"]["outcome"] == "ok", got[f"{tag}-agent"]
    assert got[f"{tag}-agent"]["stdout"] == f"ran on {tag}-agent\n"
    assert got[f"{tag}-local"]["outcome"] == "ok"
    assert events[-1][1]["state"] == "succeeded" and events[-1][1]["counts"]["waiting"] == 0

    # An agent that never connects: an offline error once its (short) wait runs out.
    await add_agent(nc, f"{tag}-never", tag, w="no")
    began = time.monotonic()
    reply = await start(nc, {"selection": {"labels": {"t": tag}, "servers": [f"{tag}-never", f"{tag}-local"]},
                             "exec": {"argv": ["true"]}, "timeout_s": 60, "wait_online_s": 1})
    events = await follow(nc, reply["id"])
    got = results(events)
    assert time.monotonic() - began >= 1.0
    assert got[f"{tag}-never"]["outcome"] == "offline"
    assert got[f"{tag}-never"]["error"] == {"code": "server_offline",
                                           "message": f"{tag}-never did not come online within 1s"}
    assert got[f"{tag}-local"]["outcome"] == "ok" and events[-1][1]["state"] == "failed"


async def test_only_an_online_written_after_the_mark_counts(nc: NATS, tag: str) -> None:
    """A stale ``online`` (a gateway that died without writing ``offline``) must not make
    a job send again and again; servers not in the job must not wake it."""
    from fleetbus.jobwait import OnlineWatch
    from fleetbus.records import ServerStatus

    js = nc.jetstream()
    kv = await js.create_key_value(bucket=f"test_status_{tag}")

    async def put(name: str, state: Literal["online", "offline"]) -> None:
        await kv.put(name, ServerStatus(name=name, state=state).model_dump_json().encode())

    try:
        await put("a", "online")  # stale, from before the job
        watch = OnlineWatch(kv, {"a", "b"})
        await watch.start()
        try:
            mark = watch.mark()
            assert not watch.since("a", mark) and mark > 0
            watch.changed.clear()
            await put("z", "online")  # not the job's
            await put("b", "offline")
            await put("a", "online")  # served again: this one counts
            await asyncio.wait_for(watch.changed.wait(), 10)
            assert watch.since("a", mark) and not watch.since("b", mark) and not watch.since("z", mark)
            assert not watch.since("a", watch.mark())  # nothing newer than the latest mark
        finally:
            await watch.aclose()
    finally:
        await js.delete_key_value(f"test_status_{tag}")


async def test_the_deadline_gives_up_a_server_still_waiting(nc: NATS, tag: str) -> None:
    await add_agent(nc, f"{tag}-never", tag)
    reply = await start(nc, {"selection": {"labels": {"t": tag}}, "exec": {"argv": ["true"]},
                             "timeout_s": 60, "wait_online_s": 600, "deadline_s": 1})
    events = await follow(nc, reply["id"], timeout=30)
    got = results(events)[f"{tag}-never"]
    assert got["outcome"] == "offline" and "still offline when the job stopped" in got["error"]["message"]
    assert events[-1][1]["state"] == "stopped" and events[-1][1]["stop_reason"] == "deadline"


async def test_cancel_mid_job_kills_running_commands_and_completes_the_results(
        nc: NATS, tag: str, tmp_path: Path) -> None:
    for i in range(1, 5):
        await register(nc, f"{tag}-k{i}", tag)
    reply = await start(nc, {"selection": {"labels": {"t": tag}}, "max_concurrency": 2,
                             "exec": {"shell": 'echo $$ > "$D/pid.$FLEETBUS_SERVER"; exec sleep 60',
                                      "env": {"D": str(tmp_path)}}})
    job = reply["id"]

    async def two_running() -> list[int]:
        files = list(tmp_path.glob("pid.*"))
        texts = [f.read_text().strip() for f in files]
        return [int(t) for t in texts] if len(files) == 2 and all(texts) else []

    pids = await wait_until(two_running, what="two commands running")
    assert all(pid_alive(p) for p in pids)
    during = await request(nc, f"{PREFIX}.v1.jobs.get", {"id": job})
    assert during["state"] == "running" and during["counts"]["running"] == 2
    cancelled = await request(nc, f"{PREFIX}.v1.jobs.cancel", {"id": job})
    assert cancelled["ok"] and cancelled["cancelled"]
    events = await follow(nc, job, timeout=20)
    assert {s: r["outcome"] for s, r in results(events).items()} == {
        f"{tag}-k1": "cancelled", f"{tag}-k2": "cancelled", f"{tag}-k3": "skipped", f"{tag}-k4": "skipped"}
    assert events[-1][1]["state"] == "cancelled"

    async def gone() -> bool:
        return not any(pid_alive(p) for p in pids)

    await wait_until(gone, timeout=10, what="the cancelled processes gone")
    assert len(list(tmp_path.glob("pid.*"))) == 2  # nothing new started
    again = await request(nc, f"{PREFIX}.v1.jobs.cancel", {"id": job})
    assert again["ok"] and not again["cancelled"] and again["state"] == "cancelled"


async def test_the_deadline_cancels_what_runs_and_skips_the_rest(nc: NATS, tag: str) -> None:
    for i in range(1, 4):
        await register(nc, f"{tag}-d{i}", tag)
    reply = await start(nc, {"selection": {"labels": {"t": tag}}, "max_concurrency": 1,
                             "deadline_s": 1, "exec": {"argv": ["sleep", "60"]}})
    events = await follow(nc, reply["id"], timeout=20)
    assert [r["outcome"] for r in results(events).values()] == ["cancelled", "skipped", "skipped"]
    assert events[-1][1]["state"] == "stopped" and events[-1][1]["stop_reason"] == "deadline"


# The CLI --------------------------------------------------------------------------------

def cli_register(fleet: Fleet, tag: str, *names: str, role: str = "web") -> None:
    for name in names:
        added = fleet.cli("servers", "add", name, "--transport", "local", "--role", role,
                          "--env", "production", "--label", f"t={tag}")
        assert added.returncode == 0, added.stderr
    for name in names:
        wait_for(lambda n=name: (json.loads(fleet.cli("servers", "show", n, "--json").stdout)["status"] or {})
                 .get("state") == "online", what=f"{name} served")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("fleetbus: error: ")
    return lines[0]


def test_cli_runs_a_job_one_line_per_server_and_exits_by_the_rule(fleet: Fleet, tag: str,
                                                                   tmp_path: Path) -> None:
    a, b, c = f"{tag}-a", f"{tag}-b", f"{tag}-c"
    cli_register(fleet, tag, a, b, c)
    fails_on_b = f'[ "$FLEETBUS_SERVER" != {b} ] || {{ echo boom on b >&2; exit 1; }}'
    proc = fleet.cli("run", "--label", f"t={tag}", "--role", "web", "--environment", "production",
                     "--shell", "--", fails_on_b)
    assert proc.returncode == 1, proc.stderr  # some failed, no budget to spend
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout  # piped: no progress line
    lines = proc.stdout.splitlines()
    assert sorted(lines[:3]) == sorted([
        *(line for line in lines[:3] if re.fullmatch(rf"({a}|{c})  ok  \d+\.\d\ds", line)),
        f"{b}  exit 1  boom on b"])
    job = re.fullmatch(r"job ([0-9a-f]{16}): 2 ok, 1 failed, 0 cancelled, 0 skipped of 3 in .*; failed",
                       lines[3]).group(1)
    assert f"fleetbus jobs show {job}" in proc.stderr

    # The records, afterwards.
    shown = fleet.cli("jobs", "show", job)
    assert shown.returncode == 0 and re.search(rf"{b}\s+failed\s+1\s+\S+s\s+boom on b", shown.stdout)
    listed = json.loads(fleet.cli("jobs", "list", "--json").stdout)
    assert listed[0]["id"] == job and listed[0]["state"] == "failed" and listed[0]["targets"] == 3
    assert job in fleet.cli("jobs", "list").stdout
    again = fleet.cli("jobs", "cancel", job)
    assert again.returncode == 0 and "not running" in again.stdout

    # Budget spent: exit 2. --json: one object per server, then the summary.
    proc = fleet.cli("run", "--servers", f"{tag}-*", "--max-concurrency", "1", "--max-errors", "0",
                     "--json", "--shell", "--", fails_on_b)
    assert proc.returncode == 2, proc.stderr
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(o["server"], o["outcome"]) for o in objects[:3]] == [(a, "ok"), (b, "failed"), (c, "skipped")]
    assert objects[3]["state"] == "stopped" and objects[3]["stop_reason"] == "budget"

    # A dry run lists the targets and runs nothing.
    marker = tmp_path / "ran"
    dry = fleet.cli("run", "--label", f"t={tag}", "--dry-run", "--", "touch", str(marker))
    assert dry.returncode == 0 and dry.stdout.split() == [a, b, c] and not marker.exists()


def run_on_a_terminal(fleet: Fleet, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with its stdout on a pseudo-terminal; its exit code and all it wrote there."""
    master, slave = pty.openpty()
    env = {**fleet.environ(), "COLUMNS": "200"}
    proc = subprocess.Popen([FLEETBUS, *args], stdout=slave, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    out = bytearray()
    give_up = time.monotonic() + timeout
    try:
        while time.monotonic() < give_up:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=10), out.decode(errors="replace").replace("\r\n", "\n")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_cli_on_a_terminal_shows_the_progress_line_and_waits_for_offline_servers(fleet: Fleet, tag: str) -> None:
    cli_register(fleet, tag, f"{tag}-a")
    added = fleet.cli("servers", "add", f"{tag}-gone", "--transport", "agent-outbound", "--label", f"t={tag}")
    assert added.returncode == 0, added.stderr
    code, out = run_on_a_terminal(fleet, "run", "--label", f"t={tag}", "--wait-online", "2s", "--", "true")
    assert code == 1, out
    # The line, redrawn in place, said the agent's server was waiting (not failed).
    assert re.search(r"\r\x1b\[2Kdone 1/2 \(0 failed\)  running 0  waiting 1  skipped 0  ", out), out
    lines = [line.rsplit("\x1b[2K", 1)[-1] for line in out.split("\n")]  # the screen's rows
    assert re.fullmatch(rf"{tag}-a\s+ok  \d+\.\d\ds", lines[0]), lines
    assert lines[1] == f"{tag}-gone  offline  {tag}-gone did not come online within 2s", lines
    assert re.fullmatch(r"job [0-9a-f]{16}: 1 ok, 1 failed, 0 cancelled, 0 skipped of 2 in .*; failed", lines[2])
    assert lines[3:] == [""]  # the progress line is gone once the job ended

    bad = fleet.cli("run", "--label", f"t={tag}", "--wait-online", "soon", "--", "true")
    assert bad.returncode == 2 and "--wait-online" in bad.stderr
    alone = fleet.cli("run", f"{tag}-a", "--wait-online", "5m", "--", "true")
    assert alone.returncode == 125 and "--wait-online" in alone.stderr


def test_cli_job_errors_are_one_line(fleet: Fleet, tag: str) -> None:
    nothing = fleet.cli("run", "--label", f"t={tag}", "--", "true")
    assert nothing.returncode == 125 and "no server matches label t=" in one_line_error(nothing)
    bad = fleet.cli("run", "--all", "--max-concurrency", "150%", "--", "true")
    assert bad.returncode == 125 and "max_concurrency" in one_line_error(bad)
    stray = fleet.cli("run", "local", "--max-errors", "1", "--", "true")
    assert stray.returncode == 125 and "need a selection" in one_line_error(stray)
    missing = fleet.cli("jobs", "show", "0123456789abcdef")
    assert "no job with id 0123456789abcdef" in one_line_error(missing)


def test_ctrl_c_cancels_the_job_and_prints_how_it_ended(fleet: Fleet, tag: str, tmp_path: Path) -> None:
    names = [f"{tag}-i{i}" for i in range(1, 4)]
    cli_register(fleet, tag, *names)
    proc = subprocess.Popen(
        [FLEETBUS, "run", "--label", f"t={tag}", "--max-concurrency", "2", "--env", f"D={tmp_path}",
         "--shell", "--", 'echo $$ > "$D/pid.$FLEETBUS_SERVER"; exec sleep 60'],
        env=fleet.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid_files = wait_for(lambda: (files := list(tmp_path.glob("pid.*"))) and len(files) == 2
                             and all(f.read_text().strip() for f in files) and files, what="two running")
        pids = [int(f.read_text()) for f in pid_files]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert "cancelling job" in err and "Traceback" not in err
    lines = out.splitlines()
    assert sorted(line.split()[1] for line in lines[:3]) == ["cancelled", "cancelled", "skipped"]
    assert lines[3].endswith("; cancelled") and "0 skipped" not in lines[3]
    wait_for(lambda: not any(pid_alive(p) for p in pids), what="the commands killed")


async def test_job_retention_is_the_cores_setting(nats_server: Any, prefix: str) -> None:
    import nats
    from fleetbus.jetstream import JOBS_MAX_AGE_S, open_state
    from fleetbus.subjects import Names

    conn = await nats.connect(nats_server.url)
    try:
        names = Names(prefix)
        state = await open_state(conn, names)
        assert (await state.js.stream_info(names.jobs_stream)).config.max_age == JOBS_MAX_AGE_S
        await open_state(conn, names, jobs_max_age_s=2 * 86400.0)  # the core, configured
        await open_state(conn, names)  # a worker: leaves the setting alone
        info = await state.js.stream_info(names.jobs_stream)
        assert info.config.max_age == 2 * 86400.0
        assert info.config.subjects == [f"{prefix}.v1.events.jobs.*.{k}" for k in ("started", "result", "finished")]
    finally:
        await conn.close()


async def test_jobs_watch_attaches_from_another_terminal(fleet: Fleet, nc: NATS, tag: str) -> None:
    for i in (1, 2):
        await register(nc, f"{tag}-v{i}", tag)
    reply = await start(nc, {"selection": {"labels": {"t": tag}},
                             "exec": {"shell": f'sleep 0.5; [ "$FLEETBUS_SERVER" != {tag}-v2 ] || exit 4'}})
    job = reply["id"]
    for _ in range(2):  # while it runs, then from the records once it has ended
        watched = await asyncio.to_thread(fleet.cli, "jobs", "watch", job)
        assert watched.returncode == 1, watched.stderr
        lines = watched.stdout.splitlines()
        assert sorted(lines[:2])[1] == f"{tag}-v2  exit 4" and lines[0].startswith(f"{tag}-v")
        assert lines[2].startswith(f"job {job}: 1 ok, 1 failed")

    # Ctrl-C detaches: the job goes on.
    long = await start(nc, {"selection": {"labels": {"t": tag}}, "exec": {"argv": ["sleep", "60"]}})
    js = nc.jetstream()
    records = f"{PREFIX}.v1.events.jobs.{long['id']}.*"

    async def following() -> bool:  # the watcher's consumer of this job's records exists
        return any(c.config.filter_subject == records for c in await js.consumers_info("FLEETBUS_JOBS"))

    watcher = await asyncio.create_subprocess_exec(
        FLEETBUS, "jobs", "watch", long["id"], env=fleet.environ(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_until(following, what="the watcher reading the job's records")
        watcher.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(watcher.communicate(), timeout=20)
    finally:
        if watcher.returncode is None:
            watcher.kill()
    assert watcher.returncode == 130 and b"Traceback" not in err
    assert b"detached" in err
    still = await request(nc, f"{PREFIX}.v1.jobs.get", {"id": long["id"]})
    assert still["state"] == "running"
    await request(nc, f"{PREFIX}.v1.jobs.cancel", {"id": long["id"]})
    assert (await follow(nc, long["id"]))[-1][1]["state"] == "cancelled"


def test_cli_output_prefixes_lines_and_group_folds_identical_outputs(fleet: Fleet, tag: str) -> None:
    a, b, c = f"{tag}-oa", f"{tag}-ob", f"{tag}-oc"
    cli_register(fleet, tag, a, b, c)
    proc = fleet.cli("run", "--label", f"t={tag}", "--output", "--shell", "--",
                     'printf "one\\ntwo-%s" "$FLEETBUS_SERVER"; echo oops >&2')
    assert proc.returncode == 0, proc.stderr
    for server in (a, b, c):
        assert f"{server}: one\n" in proc.stdout and f"{server}: two-{server}\n" in proc.stdout  # last line unended
        assert f"{server}: oops\n" in proc.stderr
        assert re.search(rf"^{server}  ok  ", proc.stdout, re.MULTILINE)

    proc = fleet.cli("run", "--label", f"t={tag}", "--group", "--shell", "--",
                     f'echo same; [ "$FLEETBUS_SERVER" != {c} ] || {{ echo different; exit 5; }}')
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[:-1] == [
        f"{c}  exit 5  same",  # not ok: shown as it happens (stderr empty: first line of stdout)
        f"== {a}, {b} (2 servers) ==", "same",
        f"== {c} (1 server) ==", "same", "different"]
    both = fleet.cli("run", "--all", "--output", "--group", "--", "true")
    assert both.returncode == 125 and "not both" in one_line_error(both)


async def test_rerun_runs_the_same_command_again_where_it_did_not_succeed(
        fleet: Fleet, nc: NATS, tag: str, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        await register(nc, f"{tag}-r{i}", tag)
    fixed = tmp_path / "fixed"
    script = f'echo "$FLEETBUS_SERVER" >> {tmp_path}/ran; [ -e {fixed} ] || [ "$FLEETBUS_SERVER" != {tag}-r2 ] || exit 1'
    first = await start(nc, {"selection": {"labels": {"t": tag}}, "exec": {"shell": script}})
    assert (await follow(nc, first["id"]))[-1][1]["state"] == "failed"

    dry = await request(nc, f"{PREFIX}.v1.jobs.rerun", {"id": first["id"], "failed": True, "dry_run": True})
    assert dry["ok"] and dry["targets"] == [f"{tag}-r2"]
    fixed.touch()
    proc = await asyncio.to_thread(fleet.cli, "jobs", "rerun", first["id"], "--failed")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"{tag}-r2  ok  \S+s\njob ([0-9a-f]{{16}}): 1 ok, .*; succeeded\n", proc.stdout)
    assert (tmp_path / "ran").read_text().split().count(f"{tag}-r2") == 2  # ran again, with a new id
    second = json.loads((await asyncio.to_thread(fleet.cli, "jobs", "list", "--json", "--limit", "1")).stdout)[0]
    got = await request(nc, f"{PREFIX}.v1.jobs.get", {"id": second["id"]})
    assert got["job"]["rerun_of"] == first["id"] and got["job"]["request"]["exec"]["shell"] == script

    nothing = await request(nc, f"{PREFIX}.v1.jobs.rerun", {"id": second["id"], "failed": True})
    assert nothing["error"]["code"] == "invalid_request" and "nothing to rerun" in nothing["error"]["message"]
    with_env = await start(nc, {"selection": {"labels": {"t": tag}}, "exec": {"argv": ["true"], "env": {"K": "v"}}})
    await follow(nc, with_env["id"])
    refused = await request(nc, f"{PREFIX}.v1.jobs.rerun", {"id": with_env["id"]})
    assert refused["error"]["code"] == "invalid_request" and "not keep" in refused["error"]["message"]
    running = await start(nc, {"selection": {"labels": {"t": tag}}, "exec": {"argv": ["sleep", "60"]}})
    early = await request(nc, f"{PREFIX}.v1.jobs.rerun", {"id": running["id"]})
    assert early["error"]["code"] == "invalid_request" and "has not ended" in early["error"]["message"]
    await request(nc, f"{PREFIX}.v1.jobs.cancel", {"id": running["id"]})
    await follow(nc, running["id"])


async def test_a_job_whose_core_died_is_abandoned_and_rerun_runs_nothing_twice(
        nats_server: Any, tmp_path: Path) -> None:

    import nats
    from support.processes import Daemon, own_user

    prefix = "j" + secrets.token_hex(4)
    env = shared_env(nats_server.url, prefix, tmp_path / "home")
    core = Daemon(["core"], env, tmp_path / "core1.log", "fleetbus core").start()
    worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], env,
                    tmp_path / "worker.log", "serving local").start()
    conn = await nats.connect(nats_server.url)
    try:
        for i in (1, 2, 3):
            reply = await request(conn, f"{prefix}.v1.admin.servers.add",
                                  {"server": {"name": f"a{i}", "transport": "local", "labels": {"t": "x"}}})
            assert reply["ok"], reply

            async def served(name: str = f"a{i}") -> bool:
                got = await request(conn, f"{prefix}.v1.admin.servers.get", {"name": name})
                return (got.get("status") or {}).get("state") == "online"

            await wait_until(served, what=f"a{i} served")
        ran = tmp_path / "ran"
        script = f'echo "$FLEETBUS_SERVER" >> {ran}; sleep 2'
        started = await request(conn, f"{prefix}.v1.jobs.start", {
            "selection": {"labels": {"t": "x"}}, "max_concurrency": 2, "exec": {"shell": script}})
        job = started["id"]

        async def two_ran() -> bool:
            return ran.exists() and len(ran.read_text().split()) == 2

        await wait_until(two_ran, what="two commands started")
        core.stop(signal.SIGKILL)  # the core dies mid-job; the worker goes on
        js = conn.jetstream()
        cores = await js.key_value(f"{prefix}_job_cores")
        assert (await cores.status()).ttl == 15.0
        for key in await cores.keys():
            await cores.purge(key)  # what the lease's 15 s TTL does; the test does not wait for it
        core = Daemon(["core"], env, tmp_path / "core2.log", "fleetbus core").start()

        events = await follow_prefixed(conn, prefix, job)
        outcomes = {b["server"]: b["outcome"] for k, b in events if k == "result"}
        assert outcomes == {"a1": "unknown", "a2": "unknown", "a3": "skipped"}
        assert events[-1][1]["state"] == "abandoned" and events[-1][1]["counts"]["unknown"] == 2

        # Rerun where it did not succeed: a1 and a2 keep their ids, so the worker answers
        # from its memory (waiting for the first run to end) and runs nothing twice.
        again = await request(conn, f"{prefix}.v1.jobs.rerun", {"id": job, "failed": True})
        assert again["ok"], again
        assert again["definition"]["command_origins"] == {"a1": job, "a2": job}
        rerun = await follow_prefixed(conn, prefix, again["id"])
        assert rerun[-1][1]["state"] == "succeeded", rerun[-1]
        assert sorted(ran.read_text().split()) == ["a1", "a2", "a3"]
        ids = {b["server"]: b["command_id"] for k, b in rerun if k == "result"}
        assert ids == {"a1": f"{job}-a1", "a2": f"{job}-a2", "a3": f"{again['id']}-a3"}
    finally:
        await conn.close()
        core.stop()
        worker.stop()


async def follow_prefixed(nc: NATS, prefix: str, job: str, timeout: float = 30) -> list[tuple[str, dict[str, Any]]]:
    sub = await nc.jetstream().subscribe(f"{prefix}.v1.events.jobs.{job}.*", ordered_consumer=True,
                                         deliver_policy=DeliverPolicy.ALL)
    events = []
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            events.append((msg.subject.rsplit(".", 1)[-1], json.loads(msg.data)))
            if events[-1][0] == "finished":
                return events
    finally:
        await sub.unsubscribe()


@dataclass
class TwoCores:
    """Two job services in this process (`a` runs the jobs, `b` is asked about them)
    and a real `fleetbus worker` serving local servers, on one nats-server."""
    prefix: str
    conn: NATS
    registry: Any
    a: Any
    b: Any

    async def add_served(self, *names: str) -> None:
        from fleetbus.records import Server

        for name in names:
            await self.registry.add(Server(name=name, transport="local"))

            async def served(name: str = name) -> bool:
                status = await self.registry.status(name)
                return status is not None and status.state == "online"

            await wait_until(served, what=f"{name} served")


@contextlib.asynccontextmanager
async def two_cores(nats_server: Any, tmp_path: Path) -> AsyncIterator[TwoCores]:

    import nats
    from fleetbus.jetstream import open_state
    from fleetbus.jobs import JobService
    from fleetbus.registry import Registry
    from fleetbus.subjects import Names
    from support.processes import Daemon, own_user

    prefix = "c" + secrets.token_hex(4)
    env = shared_env(nats_server.url, prefix, tmp_path / "home")
    worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], env,
                    tmp_path / "worker.log", "serving local").start()
    conn = await nats.connect(nats_server.url)
    state = await open_state(conn, Names(prefix))
    registry = Registry(state.servers, state.status)
    a, b = JobService(conn, state, registry), JobService(conn, state, registry)
    await a.start()
    await b.start()
    try:
        yield TwoCores(prefix, conn, registry, a, b)
    finally:
        await a.stop()
        await b.stop()
        await conn.close()
        worker.stop()


async def test_cancel_reaches_the_core_running_the_job_among_several(nats_server: Any, tmp_path: Path) -> None:
    async with two_cores(nats_server, tmp_path) as cores:
        a, b, conn, prefix = cores.a, cores.b, cores.conn, cores.prefix
        await cores.add_served("k1")
        pid_file = tmp_path / "pid"
        started = await a.start_job({"selection": {"servers": ["k1"]},
                                     "exec": {"shell": f"echo $$ > {pid_file}; exec sleep 60"}}, "test")
        job = started["id"]
        await wait_until(lambda: _read_pid(pid_file), what="the command running")
        pid = int(pid_file.read_text())
        assert job not in b.running
        reply = await b.cancel_job({"id": job}, "test")
        assert reply["cancelled"] and reply["state"] == "running"
        events = await follow_prefixed(conn, prefix, job)
        assert events[-1][1]["state"] == "cancelled"
        assert [body["outcome"] for kind, body in events if kind == "result"] == ["cancelled"]
        await wait_until(lambda: _gone(pid), what="the command killed")
        again = await b.cancel_job({"id": job}, "test")
        assert not again["cancelled"] and again["state"] == "cancelled"


async def _read_pid(path: Path) -> bool:
    return path.exists() and path.read_text().strip().isdigit()


async def _gone(pid: int) -> bool:
    return not pid_alive(pid)


async def test_get_and_list_on_another_core_give_the_live_counts(nats_server: Any, tmp_path: Path) -> None:
    async with two_cores(nats_server, tmp_path) as cores:
        a, b, conn, prefix = cores.a, cores.b, cores.conn, cores.prefix
        await cores.add_served("q1", "q2", "q3")
        started = await a.start_job({"selection": {"servers": ["q1", "q2", "q3"]}, "max_concurrency": 2,
                                     "exec": {"shell": '[ "$FLEETBUS_SERVER" = q1 ] || exec sleep 60'}}, "test")
        job = started["id"]

        async def one_kept() -> bool:
            return len((await b.get_job({"id": job}, "test"))["results"]) == 1

        await wait_until(one_kept, what="q1's result kept")
        live = {"total": 3, "ok": 1, "failed": 0, "cancelled": 0, "skipped": 0, "unknown": 0,
                "running": 2, "waiting": 0, "pending": 0}
        assert job not in b.running
        assert (await b.get_job({"id": job}, "test"))["counts"] == live  # asked of `a`
        listed = (await b.list_jobs({"limit": 1}, "test"))["jobs"]
        assert listed[0]["id"] == job and listed[0]["counts"] == live
        # `a` does not answer: counted from the records, and jobs_live for what may run.
        for sub in a._handoffs:
            await sub.unsubscribe()
        a._handoffs = []
        assert (await b.get_job({"id": job}, "test"))["counts"] == live
        await a.cancel_job({"id": job}, "test")
        assert (await follow_prefixed(conn, prefix, job))[-1][1]["state"] == "cancelled"


async def test_a_sweep_that_could_not_mark_a_job_abandoned_tries_again(nats_server: Any, prefix: str) -> None:
    import nats
    from fleetbus.jetstream import open_state
    from fleetbus.jobleases import JobLeases
    from fleetbus.subjects import Names

    conn = await nats.connect(nats_server.url)
    try:
        state = await open_state(conn, Names(prefix))
        marked: list[tuple[str, list[str]]] = []
        refuse = [True]

        async def abandon(job: str, servers: list[str]) -> None:
            marked.append((job, servers))
            if refuse[0]:
                raise TimeoutError("the jobs stream did not acknowledge a record in time")

        first, second = JobLeases(state.job_cores, state.jobs_live, abandon), JobLeases(
            state.job_cores, state.jobs_live, abandon)
        await first._renew()
        await second._renew()
        await state.jobs_live.put("0123456789abcdef", json.dumps({"core": "deadc0re", "running": ["s1"]}).encode())

        await first.sweep()  # claims it, then fails to mark it
        claimed = json.loads((await state.jobs_live.get("0123456789abcdef")).value)
        assert claimed == {"core": "deadc0re", "running": ["s1"], "abandoned_by": first.core_id}
        assert await first.owner("0123456789abcdef") is None  # not "running" on a live core
        await second.sweep()  # the claimer lives: left to it
        assert len(marked) == 1
        await first.sweep()  # its own claim: tried again
        assert len(marked) == 2 and (await state.jobs_live.get("0123456789abcdef")).value is not None

        await state.job_cores.purge(first.core_id)  # the claimer dies too
        refuse[0] = False
        await second.sweep()
        assert marked[-1] == ("0123456789abcdef", ["s1"]) and len(marked) == 3
        assert "0123456789abcdef" not in await _keys(state.jobs_live)
    finally:
        await conn.close()


async def _keys(kv: Any) -> list[str]:
    from nats.js.errors import NoKeysError

    try:
        return await kv.keys()
    except NoKeysError:
        return []


async def test_an_abandoned_job_shows_its_unknown_servers_and_how_to_finish_it(fleet: Fleet, nc: NATS, tag: str) -> None:
    from fleetbus.jobrecords import JobDefinition
    from fleetbus.records import utcnow

    job = secrets.token_hex(8)
    definition = JobDefinition(id=job, requester="test", created=utcnow(), targets=[f"{tag}-u1", f"{tag}-u2"],
                               request={"op": "exec", "selection": {"labels": {"t": tag}}, "exec": {"argv": ["true"]}},
                               max_concurrency=1, max_errors=None, batch=None, canary=0)
    await nc.jetstream().publish(f"{PREFIX}.v1.events.jobs.{job}.started", definition.model_dump_json().encode())
    live = await nc.jetstream().key_value(f"{PREFIX}_jobs_live")
    await live.put(job, json.dumps({"core": "deadc0re", "running": [f"{tag}-u1"]}).encode())

    events = await follow(nc, job, timeout=40)  # the core's sweep marks it (every 10 s)

    assert {b["server"]: b["outcome"] for k, b in events if k == "result"} == {f"{tag}-u1": "unknown",
                                                                               f"{tag}-u2": "skipped"}
    shown = await asyncio.to_thread(fleet.cli, "jobs", "show", job)
    assert shown.returncode == 0, shown.stderr
    assert f"{tag}-u1  unknown" in shown.stdout
    assert "1 server may have run the command when the job's core died (unknown); nothing reruns by itself" \
        in shown.stdout and f"fleetbus jobs rerun {job} --failed finishes the job" in shown.stdout


async def test_list_reads_only_the_newest_jobs_and_pages_back(nats_server: Any, prefix: str) -> None:
    import nats
    from fleetbus.errors import NotFound
    from fleetbus.jetstream import open_state
    from fleetbus.jobrecords import JobDefinition, JobStore, ServerResult
    from fleetbus.records import utcnow
    from fleetbus.subjects import Names

    conn = await nats.connect(nats_server.url)
    try:
        names = Names(prefix)
        state = await open_state(conn, names)
        store = JobStore(state.js, names)
        ids = [f"{i:016x}" for i in range(400)]
        for i, job in enumerate(ids):
            await store.started(JobDefinition(id=job, requester="t", created=utcnow(), request={"op": "ping"},
                                              targets=["s"], max_concurrency=1, max_errors=None, batch=None,
                                              canary=0))
            if i % 3 == 0:
                for n in range(4):
                    await store.result(ServerResult(job=job, server=f"s{n}", outcome="ok"))
        received = conn.stats["in_msgs"]

        newest = await store.newest(5)

        assert [d.id for d in newest] == ids[::-1][:5]
        assert conn.stats["in_msgs"] - received < 40  # not the 400 started records
        page = await store.newest(5, before=newest[-1].id)
        assert [d.id for d in page] == ids[::-1][5:10]
        assert [d.id for d in await store.newest(1000, before=ids[3])] == ids[2::-1]
        with pytest.raises(NotFound):
            await store.newest(5, before="f" * 16)
    finally:
        await conn.close()


def test_counts_are_made_one_way_for_running_and_ended_jobs() -> None:
    from fleetbus.jobplan import JobPlan
    from fleetbus.jobrecords import JobDefinition, count
    from fleetbus.jobrun import JobRun, JobSpec
    from fleetbus.records import utcnow

    ended = count(6, ["ok", "failed", "timeout", "skipped", "unknown", "cancelled"])
    assert ended.model_dump() == {"total": 6, "ok": 1, "failed": 2, "cancelled": 1, "skipped": 1, "unknown": 1,
                                  "running": 0, "waiting": 0, "pending": 0}
    plan = JobPlan(["a", "b", "c", "d"])
    plan.next_starts()
    plan.finished("a", "ok")
    plan.finished("b", "offline")
    plan.stop("cancelled")
    plan.finished("c", "cancelled")
    definition = JobDefinition(id="0" * 16, requester="t", created=utcnow(), request={}, targets=list(plan.targets),
                               max_concurrency=10, max_errors=None, batch=None, canary=0)
    run = JobRun(None, None, None, JobSpec(definition=definition, plan=plan, op="ping", body={},  # type: ignore[arg-type]
                                           timeout_s=1, deadline_s=None), requester="t")
    assert run.counts().model_dump() == {"total": 4, "ok": 1, "failed": 1, "cancelled": 1, "skipped": 0,
                                         "unknown": 0, "running": 1, "waiting": 0, "pending": 0}


async def test_output_waits_only_for_commands_that_ran_and_falls_back_on_their_tails(
        capsys: pytest.CaptureFixture[str]) -> None:
    from fleetbus.cli.joboutput import JobOutput
    from fleetbus.output import HDR_COMMAND, HDR_END, HDR_STREAM

    class Chunk:
        def __init__(self, headers: dict[str, str], data: bytes = b"") -> None:
            self.headers, self.data = headers, data

    job = "0" * 16
    live = JobOutput("group")
    live.bind(job, ["ran", "marked", "offline"])
    await live.on_msg(Chunk({HDR_COMMAND: f"{job}-marked", HDR_STREAM: "stdout"}, b"hello\n"))  # type: ignore[arg-type]
    await live.on_msg(Chunk({HDR_COMMAND: f"{job}-marked", HDR_END: "1"}))  # type: ignore[arg-type]
    results = {"marked": {"outcome": "ok", "exit_code": 0, "stdout": "hello\n"},
               "offline": {"outcome": "offline", "exit_code": None, "error": {"code": "server_offline"}},
               "ran": {"outcome": "failed", "exit_code": 3, "stdout": "", "stderr": "boom\n"}}

    # An offline server sends no end marker, and one whose marker came is done: only
    # "ran" (an exit code, no marker) may still have output on its way.
    assert live.awaiting(results) == {"ran"}
    await live.settle(results, 0.0)  # its marker was missed: its result's tails stand in
    live.print_groups(["marked", "offline", "ran"])

    out = capsys.readouterr().out
    assert "== ran (1 server), from the kept tail of its result ==\nboom\n" in out
    assert "== marked (1 server) ==\nhello\n" in out
    assert "== offline (1 server) ==\n(no output)" in out
    lines = JobOutput("lines")
    lines.bind(job, ["ran"])
    await lines.settle({"ran": results["ran"]}, 0.0)
    assert capsys.readouterr().err == "ran: boom\n"


async def test_ctrl_c_while_the_job_starts_cancels_it_once_its_id_is_known(
        nats_server: Any, prefix: str, tmp_path: Path) -> None:
    """A Ctrl-C that lands while ``jobs.start`` is in flight cannot stop the core from
    starting the job: the CLI must cancel it once the reply names it, not exit and leave
    it running unseen. The test plays the core, so the Ctrl-C lands exactly then."""
    env = shared_env(nats_server.url, prefix, tmp_path / "home", master_key=False)
    import nats

    nc = await nats.connect(nats_server.url)  # this module's `nc` is the fleet's
    starts: asyncio.Queue[Any] = asyncio.Queue()
    cancels: asyncio.Queue[Any] = asyncio.Queue()
    await nc.subscribe(f"{prefix}.v1.jobs.start", cb=starts.put)
    await nc.subscribe(f"{prefix}.v1.jobs.cancel", cb=cancels.put)
    await nc.flush()
    proc = await asyncio.create_subprocess_exec(FLEETBUS, "run", "--all", "--", "true", env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        start = await asyncio.wait_for(starts.get(), 30)
        proc.send_signal(signal.SIGINT)  # the request is out; its reply is not
        job = "j" + secrets.token_hex(8)
        await start.respond(json.dumps({"ok": True, "id": job, "targets": ["a", "b"], "dry_run": False}).encode())
        cancel = await asyncio.wait_for(cancels.get(), 30)
        assert json.loads(cancel.data)["id"] == job
        await cancel.respond(json.dumps({"ok": True, "id": job}).encode())
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await nc.close()


async def test_each_command_of_a_job_carries_when_the_job_stops_waiting(fleet: Fleet, nc: NATS, tag: str) -> None:
    """A worker that reaches a job's command after the job gave up on it must drop it,
    not run it unseen: the request carries the job's own deadline (docs/bus-api.md)."""
    name = f"{tag}-d1"
    cli_register(fleet, tag, name)
    seen: asyncio.Queue[Any] = asyncio.Queue()
    sub = await nc.subscribe(f"{PREFIX}.v1.servers.{name}.exec", cb=seen.put)  # beside the worker
    try:
        before = time.time()
        reply = await start(nc, {"selection": {"servers": [name]}, "exec": {"argv": ["true"]}, "timeout_s": 40})
        assert reply["targets"] == [name]
        msg = await asyncio.wait_for(seen.get(), 30)
        deadline = float(msg.headers["Fleetbus-Deadline"])
        # The command's own limit plus the grace the job gives the worker's reply.
        assert before + 40 < deadline <= time.time() + 40 + 30 + 1
        assert msg.headers["Fleetbus-Requester"]
    finally:
        await sub.unsubscribe()
