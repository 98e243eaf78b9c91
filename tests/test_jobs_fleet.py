"""Fleet jobs on 60 servers of every kind at once, against one real `fleetbus up`.

The fleet (built once for the module, :func:`fleet60`): 40 ``local`` servers, 16
``agent-outbound`` servers of which 13 are served by real agents (the agent's own connect
loop, many per process: tests/support/agent_swarm.py) and 3 never connect (registered,
keys made, no process), and 4 ``ssh`` registrations of one real OpenSSH sshd on
loopback. Every transport interleaves with the others in the targets' order (by name),
so each rule below is checked across transports, not within one.

What the commands saw is measured on the servers: each writes into a folder of the test
(every transport here runs commands as the tests' own user: ``local`` through the
Fleet's ``--local-user``, the agents as their process, ssh as the credential's user).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import nats
import pytest
from nats.aio.client import Client as NATS
from support.agents import Agent, gateway_of, start_swarm
from support.processes import Fleet, own_user, stop_process
from support.sshd import Sshd, generate_key, require_sshd
from test_jobs import COUNTING, PREFIX, follow, request, results, start, wait_until

Kind = Literal["local", "agent", "never", "ssh"]  # never: an outbound agent that never connects
ROLES = {"web": 24, "db": 12, "cache": 12, "queue": 12}
NEVER = ("cache-10", "queue-12", "web-06")


@dataclass(frozen=True)
class Spec:
    """One server of the fleet, as registered."""

    name: str
    kind: Kind
    role: str
    environment: str
    labels: dict[str, str]


def fleet_specs() -> list[Spec]:
    """The 60 servers: ``<role>-NN``; number 1 of each role is ssh, every fourth from 2 an
    agent (plus queue-12), the rest local; environment, team and zone vary with NN."""
    specs = []
    for role, size in ROLES.items():
        for n in range(1, size + 1):
            name = f"{role}-{n:02d}"
            kind: Kind = ("ssh" if n == 1 else "never" if name in NEVER
                          else "agent" if n % 4 == 2 else "local")
            labels = {"team": "core" if n % 2 else "edge", "zone": "a" if n <= size // 2 else "b",
                      "kind": "agent" if kind == "never" else kind}
            specs.append(Spec(name, kind, role, "staging" if n % 3 == 0 else "production", labels))
    return specs


@dataclass
class Fleet60:
    """The module's fleet: the stack, what is registered, and what a test may start."""

    fleet: Fleet
    specs: list[Spec]
    gateway: dict[str, Any]
    swarm_pid: int = 0  # the process running the connected agents
    keys: dict[str, str] = field(default_factory=dict)  # the never-connected agents' keys

    def named(self, kind: Kind) -> list[str]:
        return [s.name for s in self.specs if s.kind == kind]

    def chosen(self, *, role: str | None = None, environment: str | None = None,
               labels: dict[str, str] | None = None, servers: tuple[str, ...] = ()) -> list[str]:
        """What a selection must resolve to, worked out from the table above."""
        return sorted(s.name for s in self.specs
                      if (role is None or s.role == role)
                      and (environment is None or s.environment == environment)
                      and all(s.labels.get(k) == v for k, v in (labels or {}).items())
                      and (not servers or any(fnmatchcase(s.name, p) for p in servers)))


async def _register(fleet: Fleet, specs: list[Spec], sshd: Sshd, ssh_key: bytes) -> dict[str, str]:
    """Register every server over the bus; the agents' keys by server."""
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        added = await request(nc, f"{PREFIX}.v1.admin.credentials.add", {
            "name": "fleet-key", "type": "ssh-key", "user": own_user(),
            "secret_b64": base64.b64encode(ssh_key).decode()})
        assert added["ok"], added
        # `fleetbus up` registers a server named `local`: gone, `--all` is exactly the 60.
        removed = await request(nc, f"{PREFIX}.v1.admin.servers.remove", {"name": "local"})
        assert removed["ok"], removed
        keys = {}
        for spec in specs:
            server: dict[str, Any] = {"name": spec.name, "roles": [spec.role], "environment": spec.environment,
                                      "labels": spec.labels}
            if spec.kind == "ssh":
                server.update(transport="ssh", host=sshd.host, port=sshd.port, credential="fleet-key",
                              options={"host_key": sshd.host_key_line})
            else:
                server["transport"] = "local" if spec.kind == "local" else "agent-outbound"
            reply = await request(nc, f"{PREFIX}.v1.admin.servers.add", {"server": server})
            assert reply["ok"], reply
            if "key" in reply:
                keys[spec.name] = reply["key"]
        return keys
    finally:
        await nc.close()


async def _online(nc: NATS) -> set[str]:
    """The servers whose status says online."""
    listed = await request(nc, f"{PREFIX}.v1.admin.servers.list", {})
    return {s["name"] for s in listed["servers"] if (s["status"] or {}).get("state") == "online"}


async def _all_online(fleet: Fleet, expected: set[str]) -> None:
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        async def ready() -> bool:
            online = await _online(nc)
            assert not online & set(NEVER), online & set(NEVER)
            return expected <= online

        await wait_until(ready, timeout=60, what=f"{len(expected)} servers online")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def fleet60(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet60]:
    require_sshd()
    assert fleet.local_user == own_user()  # `local` writes where the agents and ssh write
    base = tmp_path_factory.mktemp("fleet60")
    key = generate_key(base, "id_fleet")
    sshd = Sshd(base / "sshd")
    sshd.authorize(key.public)
    sshd.start()
    swarm: subprocess.Popen[bytes] | None = None
    try:
        specs = fleet_specs()
        keys = asyncio.run(_register(fleet, specs, sshd, key.private))
        setup = Fleet60(fleet, specs, gateway_of(fleet))
        setup.keys = {name: keys[name] for name in setup.named("never")}
        swarm = start_swarm(base / "swarm", setup.gateway["address"], setup.gateway["fingerprint"],
                            [keys[name] for name in setup.named("agent")])
        setup.swarm_pid = swarm.pid
        asyncio.run(_all_online(fleet, {s.name for s in specs if s.kind != "never"}))
        assert (len(setup.named("local")), len(setup.named("agent")), len(setup.named("never")),
                len(setup.named("ssh"))) == (40, 13, 3, 4)
        yield setup
    finally:
        stop_process(swarm)
        sshd.stop()


@pytest.fixture
async def nc(fleet: Fleet) -> AsyncIterator[NATS]:
    conn = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    yield conn
    await conn.close()


def sh(script: str, folder: Path) -> dict[str, Any]:
    """An ``exec`` of ``sh -c script`` with ``$D`` the test's folder."""
    return {"argv": ["sh", "-c", script], "env": {"D": str(folder)}}


async def test_selection_by_role_environment_labels_and_globs_is_exact(fleet60: Fleet60, nc: NATS) -> None:
    jobs_before = (await request(nc, f"{PREFIX}.v1.jobs.list", {}))["jobs"]

    async def targets(**selection: Any) -> list[str]:
        reply = await start(nc, {"selection": selection, "op": "ping", "dry_run": True})
        assert reply["dry_run"] and reply["id"] is None
        return reply["targets"]

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"role": "web", "environment": "production"}, fleet60.chosen(role="web", environment="production")),
        ({"labels": {"team": "core", "zone": "b"}}, fleet60.chosen(labels={"team": "core", "zone": "b"})),
        ({"servers": ["web-1?", "db-0[1-4]", "queue-*", "cache-07"], "environment": "staging"},
         fleet60.chosen(servers=("web-1?", "db-0[1-4]", "queue-*", "cache-07"), environment="staging")),
        ({"all": True, "role": "db", "labels": {"kind": "agent"}}, ["db-02", "db-06", "db-10"]),
        ({"labels": {"kind": "ssh"}}, ["cache-01", "db-01", "queue-01", "web-01"]),
        ({"servers": ["web-06", "cache-1*"], "labels": {"team": "edge"}}, ["cache-10", "cache-12", "web-06"]),
        ({"all": True}, sorted(s.name for s in fleet60.specs)),
    ]
    for selection, expected in cases:
        assert expected, selection  # a case that selects nothing would prove nothing
        assert await targets(**selection) == expected, selection
    assert len(cases[-1][1]) == 60
    # Spot checks of the table itself, so a wrong expectation cannot hide a wrong resolver.
    assert cases[0][1][:4] == ["web-01", "web-02", "web-04", "web-05"] and len(cases[0][1]) == 16
    assert cases[2][1] == ["db-03", "queue-03", "queue-06", "queue-09", "queue-12", "web-12", "web-15", "web-18"]

    # The CLI resolves through the same core: the same answer, and nothing ran.
    proc = await asyncio.to_thread(
        fleet60.fleet.cli, "run", "--role", "cache", "--label", "team=edge", "--label", "zone=a",
        "--servers", "cache-0*,web-*", "--dry-run", "--json", "--", "true")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"targets": ["cache-02", "cache-04", "cache-06"]}
    assert (await request(nc, f"{PREFIX}.v1.jobs.list", {}))["jobs"] == jobs_before  # dry runs keep nothing


async def test_concurrency_measured_on_the_servers_stays_at_the_limit(fleet60: Fleet60, nc: NATS,
                                                                     tmp_path: Path) -> None:
    # 9% of 60 targets is 5.4, rounded up: 6 at once, over every transport.
    # Each command also says what ran it: its parent process, and whether sshd did.
    via = 'echo "$PPID ${SSH_CONNECTION:+ssh}" > "$D/via.$S"'
    reply = await start(nc, {"selection": {"all": True}, "max_concurrency": "9%", "timeout_s": 60,
                             "exec": sh(COUNTING.format(hold="0.5", tail=via), tmp_path)})
    assert reply["definition"]["max_concurrency"] == 6
    events = await follow(nc, reply["id"])
    got = results(events)
    online = {s.name for s in fleet60.specs if s.kind != "never"}
    assert {s for s, r in got.items() if r["outcome"] == "ok"} == online
    # Never-connected agents: an error at once (no --wait-online), not a wait.
    for name in NEVER:
        assert got[name]["outcome"] == "offline", got[name]
        assert got[name]["error"] == {"code": "server_offline", "message": f"nobody serves {name} right now"}
    assert events[-1][1]["state"] == "failed" and events[-1][1]["counts"]["failed"] == 3

    seen = {f.name.removeprefix("seen."): [int(n) for n in f.read_text().split()] for f in tmp_path.glob("seen.*")}
    assert set(seen) == online  # each ran once, where it was sent (FLEETBUS_SERVER)
    assert all(len(counts) == 1 for counts in seen.values())
    counts = [c for values in seen.values() for c in values]
    # Never above the limit, and the limit was reached, so the limit is what held it.
    assert max(counts) == 6, sorted(counts)
    assert not list((tmp_path / "run").iterdir())  # every command ended

    # Each transport did run its servers' commands: sshd the ssh ones, the agents' process theirs.
    ran_by = {f.name.removeprefix("via."): f.read_text().split() for f in tmp_path.glob("via.*")}
    assert {s for s, how in ran_by.items() if how[1:] == ["ssh"]} == set(fleet60.named("ssh"))
    assert {s for s, how in ran_by.items() if how[0] == str(fleet60.swarm_pid)} == set(fleet60.named("agent"))


async def test_the_error_budget_stops_new_starts_exactly_where_documented(fleet60: Fleet60, nc: NATS,
                                                                          tmp_path: Path) -> None:
    selection = ("cache-*", "db-*")
    targets = fleet60.chosen(servers=selection)
    failing = {"cache-01", "cache-06", "cache-11", "db-02", "db-07"}  # ssh, agent, local, agent, local
    offline = set(NEVER) & set(targets)
    assert offline == {"cache-10"}
    budget = len(targets) * 20 // 100  # "20%", rounded down: 4 errors tolerated
    # The documented rule, in order (one at a time, so "in order" is the start order):
    # the budget is spent by the error that makes errors > max_errors.
    started, errors = [], 0
    for name in targets:
        started.append(name)
        errors += name in failing or name in offline
        if errors > budget:
            break
    assert started[-1] == "db-02" and len(started) == 14  # the 5th error, on an agent

    tail = 'case "$S" in {}) echo "broke on $S" >&2; exit 1;; esac'.format("|".join(sorted(failing)))
    reply = await start(nc, {"selection": {"servers": list(selection)}, "max_concurrency": 1,
                             "max_errors": "20%", "timeout_s": 60,
                             "exec": sh(COUNTING.format(hold="0", tail=tail), tmp_path)})
    assert reply["targets"] == targets and reply["definition"]["max_errors"] == budget
    events = await follow(nc, reply["id"])
    got = results(events)
    # On the servers: exactly the ones before the stop ran, in the targets' order.
    assert (tmp_path / "order").read_text().split() == [s for s in started if s not in offline]
    expected = {s: ("failed" if s in failing else "offline" if s in offline else "ok") for s in started}
    expected |= {s: "skipped" for s in targets[len(started):]}
    assert {s: r["outcome"] for s, r in got.items()} == expected
    assert got["db-02"]["exit_code"] == 1 and got["db-02"]["stderr"] == "broke on db-02\n"
    assert got["cache-01"]["stderr"] == "broke on cache-01\n"  # over ssh
    assert got["db-07"]["command_id"] is None  # it fails when run, but it never was
    summary = events[-1][1]
    assert summary["state"] == "stopped" and summary["stop_reason"] == "budget"
    assert summary["counts"] == {"total": 24, "ok": 9, "failed": 5, "cancelled": 0, "skipped": 10,
                                 "unknown": 0, "running": 0, "waiting": 0, "pending": 0}

    # Several at once: the budget spent, what runs still finishes (and counts), nothing new
    # starts. db-01 (ssh) and db-02 (agent) are held by a gate; db-03 (local) fails at once.
    held = tmp_path / "held"
    held.mkdir()
    script = ('echo "$FLEETBUS_SERVER" >> "$D/order"; [ "$FLEETBUS_SERVER" != db-03 ] || exit 1; '
              'while [ ! -e "$D/go" ]; do sleep 0.05; done')
    reply = await start(nc, {"selection": {"role": "db"}, "max_concurrency": 3, "max_errors": 0,
                             "timeout_s": 60, "exec": sh(script, held)})
    try:
        async def spent() -> bool:
            got = await request(nc, f"{PREFIX}.v1.jobs.get", {"id": reply["id"]})
            counts = got["counts"] or {}
            return counts.get("failed") == 1 and counts.get("running") == 2
        await wait_until(spent, what="db-03 failed while db-01 and db-02 run")
    finally:
        (held / "go").touch()
    events = await follow(nc, reply["id"])
    assert {s: r["outcome"] for s, r in results(events).items()} == {
        "db-01": "ok", "db-02": "ok", "db-03": "failed", **{f"db-{n:02d}": "skipped" for n in range(4, 13)}}
    assert sorted((held / "order").read_text().split()) == ["db-01", "db-02", "db-03"]
    assert events[-1][1]["stop_reason"] == "budget"


async def test_a_canary_runs_alone_first_and_batches_are_strict_waves(fleet60: Fleet60, nc: NATS,
                                                                      tmp_path: Path) -> None:
    # web-01 is ssh, web-02 and web-10 agents, web-06 an agent that never connects: its
    # place in its wave goes to the next target at once, so every wave still runs 4.
    selection = ["web-0*", "web-1[0-2]"]
    assert fleet60.chosen(servers=tuple(selection)) == [f"web-{n:02d}" for n in range(1, 13)]
    script = 'S=$FLEETBUS_SERVER; date +%s.%N > "$D/start.$S"; sleep 1; date +%s.%N > "$D/end.$S"'
    reply = await start(nc, {"selection": {"servers": selection}, "max_concurrency": 10, "canary": 1,
                             "batch": 4, "timeout_s": 60, "exec": sh(script, tmp_path)})
    events = await follow(nc, reply["id"])
    got = results(events)
    assert got["web-06"]["outcome"] == "offline"
    # It ended at once, holding nothing: kept before any result of the wave it was in.
    kept = [body["server"] for kind, body in events if kind == "result"]
    assert kept.index("web-06") < min(kept.index(s) for s in ("web-07", "web-08", "web-09", "web-10"))
    assert all(r["outcome"] == "ok" for s, r in got.items() if s != "web-06")
    assert events[-1][1]["state"] == "failed"  # an offline server is an error; no budget to spend

    def at(kind: str, name: str) -> float:
        return float((tmp_path / f"{kind}.{name}").read_text())

    waves = [["web-01"], ["web-02", "web-03", "web-04", "web-05"],
             ["web-07", "web-08", "web-09", "web-10"], ["web-11", "web-12"]]
    assert sorted(p.name.removeprefix("start.") for p in tmp_path.glob("start.*")) == sorted(itertools.chain(*waves))
    for earlier, later in itertools.pairwise(waves):
        # Every command of a wave ended before any of the next one started.
        assert max(at("end", s) for s in earlier) < min(at("start", s) for s in later), (earlier, later)
    for wave in waves[1:]:
        # And a wave's servers ran together: each started before every other had ended
        # (each holds 1 s, so a start delayed by a loaded machine still falls inside).
        assert max(at("start", s) for s in wave) < min(at("end", s) for s in wave), wave

    # A failed canary (an agent) stops the job: nothing past the canary wave starts.
    order = tmp_path / "canary"
    order.mkdir()
    reply = await start(nc, {"selection": {"role": "queue"}, "canary": 2, "timeout_s": 60,
                             "exec": sh('echo "$FLEETBUS_SERVER" >> "$D/order"; '
                                        '[ "$FLEETBUS_SERVER" != queue-02 ] || exit 3', order)})
    events = await follow(nc, reply["id"])
    assert sorted((order / "order").read_text().split()) == ["queue-01", "queue-02"]  # ssh, agent
    outcomes = {s: r["outcome"] for s, r in results(events).items()}
    assert outcomes == {"queue-01": "ok", "queue-02": "failed",
                        **{f"queue-{n:02d}": "skipped" for n in range(3, 13)}}
    assert events[-1][1]["stop_reason"] == "canary"


async def test_wait_online_picks_up_an_agent_that_connects_mid_job(fleet60: Fleet60, nc: NATS,
                                                                    tmp_path: Path) -> None:
    # In order: cache-10 and queue-12 (never connected) wait at once; web-01 (ssh) runs,
    # held by a gate the test opens; web-02..05 (agent, local) are pending; web-06 (never
    # connected) comes last. cache-10's agent connects while web-01 is held.
    late = "cache-10"
    selection = ["web-0[1-6]", "cache-10", "queue-12"]
    wait_s = 10
    gate = tmp_path / "go"
    script = ('while [ ! -e "$D/go" ]; do sleep 0.05; done; '
              'echo "$FLEETBUS_SERVER" >> "$D/order"; echo "ran on $FLEETBUS_SERVER"')
    progress: list[dict[str, Any]] = []

    async def on_progress(msg: Any) -> None:
        progress.append(json.loads(msg.data))

    def counts_seen(since: int, **want: int) -> Any:
        """Whether the job reported these counts in a progress event after the first ``since``."""
        async def seen() -> dict[str, Any] | None:
            return next((p for p in progress[since:] if p["job"] == job
                         and all(p["counts"][k] == v for k, v in want.items())), None)
        return seen

    sub = await nc.subscribe(f"{PREFIX}.v1.events.jobs.*.progress", cb=on_progress)
    agent: Agent | None = None
    try:
        began = time.monotonic()
        reply = await start(nc, {"selection": {"servers": selection}, "max_concurrency": 1,
                                 "wait_online_s": wait_s, "timeout_s": 60, "exec": sh(script, tmp_path)})
        job = reply["id"]
        assert reply["targets"] == ["cache-10", "queue-12", *(f"web-0{n}" for n in range(1, 7))]
        # The job says so: two servers wait (no error, no slot), one runs, five are pending.
        await wait_until(counts_seen(0, waiting=2, running=1, pending=5, failed=0),
                         what="cache-10 and queue-12 waiting while web-01 runs")
        # Only later events say what the agent changed (early on, with queue-12 not tried
        # yet, the counts were the same as below).
        since = len(progress)
        agent = Agent(tmp_path / "agent", fleet60.gateway["address"], fleet60.gateway["fingerprint"],
                      fleet60.keys[late]).start()
        # The job saw it come online: no longer waiting, first in line (not an expiry: no error).
        await wait_until(counts_seen(since, waiting=1, running=1, pending=6, failed=0),
                         what=f"the job seeing {late} online")
        gate.touch()
        events = await follow(nc, job)
        waited = time.monotonic() - began
    finally:
        gate.touch()  # nothing stays held if the test failed early
        await sub.unsubscribe()
        if agent is not None:
            agent.stop()
    got = results(events)
    assert got[late]["outcome"] == "ok" and got[late]["stdout"] == f"ran on {late}\n", got[late]
    # It ran ahead of the servers not started yet, as soon as the slot was free.
    assert (tmp_path / "order").read_text().split() == [
        "web-01", late, "web-02", "web-03", "web-04", "web-05"]
    for name in ("queue-12", "web-06"):
        assert got[name]["outcome"] == "offline"
        assert got[name]["error"] == {"code": "server_offline",
                                      "message": f"{name} did not come online within {wait_s}s"}
    assert waited >= wait_s  # they were given up only once their wait had run out
    summary = events[-1][1]
    assert summary["state"] == "failed" and summary["counts"]["failed"] == 2 and summary["counts"]["waiting"] == 0

    # The late agent is gone again, as the fleet had it (other tests count on it).
    async def offline_again() -> bool:
        return late not in await _online(nc)

    await wait_until(offline_again, what=f"{late} offline again")
