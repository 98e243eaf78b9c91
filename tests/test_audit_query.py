"""Reading the audit trail back (issue 21: an auditor must be able to trust who ran a
command): ``audit.query`` and ``fleetbus audit`` on `fleetbus up`'s own NATS, for the
owner and for a user granted only ``--admin audit.query``, with commands run through a
real worker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from fleetbus import auditquery
from fleetbus.audit import encode_record
from fleetbus.auditquery import AuditQuery, AuditReader
from fleetbus.subjects import HDR_REQUESTER, Names
from nats.aio.client import Client as NATS
from support.processes import FLEETBUS, Fleet
from test_users import UserClient, add_user

NAMES = Names("fleetbus")


async def query(nc: NATS, **body: Any) -> dict[str, Any]:
    msg = await nc.request(NAMES.admin("audit.query"), json.dumps(body).encode(), timeout=15)
    return json.loads(msg.data)


async def records_of(nc: NATS, count: int, **body: Any) -> list[dict[str, Any]]:
    """The records ``body`` selects once there are ``count`` of them: the worker sends
    each after its reply, so a command's record may land a moment after the command."""
    deadline = time.monotonic() + 30
    while True:
        reply = await query(nc, **body)
        assert reply["ok"] is True, reply
        if len(reply["records"]) >= count or time.monotonic() > deadline:
            return reply["records"]
        await asyncio.sleep(0.1)


def run(fleet: Fleet, server: str, word: str) -> None:
    done = fleet.cli("run", server, "--", "echo", word)
    assert done.returncode == 0 and word in done.stdout, done.stderr


async def test_owner_filters_pages_and_times_the_trail(fleet: Fleet, fleet_nc: NATS) -> None:
    for name in ("aq-a", "aq-b"):
        added = fleet.cli("servers", "add", name, "--transport", "local")
        assert added.returncode == 0, added.stderr
    run(fleet, "aq-a", "one")
    run(fleet, "aq-b", "two")
    await records_of(fleet_nc, 1, server="aq-a", op="exec")
    between = datetime.now(UTC).isoformat()
    run(fleet, "aq-a", "three")

    both = await records_of(fleet_nc, 2, server="aq-a", op="exec")
    assert [r["summary"] for r in both] == ['["echo", "one"]', '["echo", "three"]'], both
    assert all(r["server"] == "aq-a" and r["op"] == "exec" and r["outcome"] == "ok" for r in both)
    # The verified identity (no Nats-Request-Info: the owner) beside the declared requester.
    assert all(r["identity"] == {"account": None, "user": "owner"} for r in both), both
    assert both[0]["seq"] < both[1]["seq"]
    other = await records_of(fleet_nc, 1, server="aq-b", op="exec")
    assert [r["summary"] for r in other] == ['["echo", "two"]']
    # A declared requester and the owner's name both select them; someone else's does not.
    declared = both[0]["requester"]
    assert len((await query(fleet_nc, server="aq-a", op="exec", user=declared))["records"]) == 2
    assert len((await query(fleet_nc, server="aq-a", op="exec", user="owner"))["records"]) == 2
    assert (await query(fleet_nc, server="aq-a", op="exec", user="nobody"))["records"] == []
    assert (await query(fleet_nc, server="aq-a", op="exec", outcome="forbidden"))["records"] == []

    # Forward pages from after_seq, one record each.
    page = await query(fleet_nc, server="aq-a", op="exec", after_seq=0, limit=1)
    assert [r["summary"] for r in page["records"]] == ['["echo", "one"]'] and page["next"], page
    page = await query(fleet_nc, server="aq-a", op="exec", limit=1, **page["next"])
    assert [r["summary"] for r in page["records"]] == ['["echo", "three"]'], page
    assert page["next"] is None and page["truncated"] is False, page
    # Backward pages from the end (the default): the newest first page, then the one before.
    page = await query(fleet_nc, server="aq-a", op="exec", limit=1)
    assert [r["summary"] for r in page["records"]] == ['["echo", "three"]'] and page["next"], page
    page = await query(fleet_nc, server="aq-a", op="exec", limit=1, **page["next"])
    assert [r["summary"] for r in page["records"]] == ['["echo", "one"]'], page
    assert page["next"] is None, page

    # since: only what the stream stored from then on, as a time or as a duration.
    later = await query(fleet_nc, server="aq-a", op="exec", since=between)
    assert [r["summary"] for r in later["records"]] == ['["echo", "three"]'], later
    assert len((await query(fleet_nc, server="aq-a", op="exec", since="1h"))["records"]) == 2
    assert (await query(fleet_nc, server="aq-a", op="exec", until=between))["records"] == both[:1]

    # The CLI prints the same records, with the identity and the declared requester.
    shown = fleet.cli("audit", "--server", "aq-a", "--op", "exec")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if "aq-a" in line]
    assert len(lines) == 2 and "echo" in lines[0] and "one" in lines[0] and "three" in lines[1], shown.stdout
    assert all(f"owner (declared: {declared})" in line for line in lines), shown.stdout
    as_json = fleet.cli("audit", "--server", "aq-b", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["summary"] for r in json.loads(as_json.stdout)["records"] if r["op"] == "exec"] == ['["echo", "two"]']


async def test_follow_prints_new_records_as_they_are_written(fleet: Fleet) -> None:
    added = fleet.cli("servers", "add", "aq-f", "--transport", "local")
    assert added.returncode == 0, added.stderr
    proc = await asyncio.create_subprocess_exec(
        FLEETBUS, "audit", "--follow", "--server", "aq-f", "--op", "exec", env=fleet.environ(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[str] = []

    async def line_with(word: str) -> None:
        while not any(word in line for line in lines):
            raw = await proc.stdout.readline()  # type: ignore[union-attr]
            assert raw, (lines, await proc.stderr.read())  # type: ignore[union-attr]
            lines.append(raw.decode())

    try:
        run(fleet, "aq-f", "first-one")
        await asyncio.wait_for(line_with("first-one"), 30)
        # Written after the first line was printed: only a later poll can show it.
        run(fleet, "aq-f", "second-one")
        await asyncio.wait_for(line_with("second-one"), 30)
        assert [line.count("first-one") for line in lines].count(1) == 1, lines
        assert all("aq-f" in line and "owner (declared: " in line for line in lines), lines
    finally:
        proc.terminate()
        await proc.wait()


async def test_an_auditor_user_reads_who_ran_what(fleet: Fleet, fleet_nc: NATS, tmp_path: Path) -> None:
    added = fleet.cli("servers", "add", "aq-w", "--transport", "local", "--role", "aqweb")
    assert added.returncode == 0, added.stderr
    deployer_seed, deployer = add_user(fleet, tmp_path, "aq-deployer", "--allow", "exec:role=aqweb")
    auditor_seed, _ = add_user(fleet, tmp_path, "aq-auditor", "--admin", "audit.query")
    grant = deployer["user"]["grants"][0]["id"]

    user = await UserClient().connect(fleet.nats_url, deployer_seed, "aq-deployer")
    try:
        assert user.nc is not None
        command_id = f"aq-{uuid.uuid4().hex[:12]}"
        body = json.dumps({"id": command_id, "argv": ["echo", "deployed"], "timeout_s": 30}).encode()
        # The deployer declares itself the auditor: the trail must still name the deployer.
        headers = {HDR_REQUESTER: "aq-auditor"}
        deadline = time.monotonic() + 15
        while True:
            try:
                msg = await user.nc.request(NAMES.grant(grant, "aq-w", "exec"), body, timeout=10,
                                            headers=headers)
                break
            except nats.errors.NoRespondersError:  # until the worker serves the new grant
                assert time.monotonic() < deadline, "aq-w never reachable through the grant"
                await asyncio.sleep(0.05)
        assert json.loads(msg.data)["ok"] is True
        # The deployer has no audit.query: NATS refuses the request.
        assert await user.refused(NAMES.admin("audit.query"))
    finally:
        await user.close()

    auditor = await UserClient().connect(fleet.nats_url, auditor_seed, "aq-auditor")
    try:
        assert auditor.nc is not None
        (record,) = await records_of(auditor.nc, 1, server="aq-w", op="exec")
        assert record["id"] == command_id and record["outcome"] == "ok", record
        assert record["identity"]["name"] == "aq-deployer", record
        assert record["identity"]["user"] == deployer["user"]["public_key"], record
        assert record["requester"] == "aq-auditor"  # declared only
        # Selecting by the verified name finds it; so does the declared one, and the
        # record itself says which is which.
        by_name = await query(auditor.nc, user="aq-deployer", server="aq-w")
        assert [r["id"] for r in by_name["records"]] == [command_id], by_name
        # The auditor may read, not act: a command is refused by NATS.
        assert await auditor.refused(NAMES.server("aq-w", "exec"))
    finally:
        await auditor.close()


async def test_bad_queries_are_invalid_requests_and_the_service_keeps_serving(
        fleet: Fleet, fleet_nc: NATS) -> None:
    for body in ({"nonsense": 1}, {"limit": 10**9}, {"limit": 0}, {"since": "garbage"},
                 {"until": "2026-12-07T10:00:00"}, {"after_seq": 1, "before_seq": 5},
                 {"server": "Not A Name"}, {"op": "exec.>"}, {"server": "a.*"}):
        reply = await query(fleet_nc, **body)
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", (body, reply)
    msg = await fleet_nc.request(NAMES.admin("audit.query"), b"not json", timeout=15)
    assert json.loads(msg.data)["error"]["code"] == "invalid_request"
    bad = fleet.cli("audit", "--since", "garbage")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert (await query(fleet_nc, limit=5))["ok"] is True


# The reader alone, on a stream of made-up records with small windows and a small scan
# budget, so paging across windows and truncation are reached with a few dozen records.

def _fields(n: int, server: str, user: str) -> dict[str, Any]:
    return {"ts": datetime.now(UTC), "id": f"c{n}", "server": server, "transport": "local", "op": "exec",
            "requester": "someone@host", "identity": {"account": "USERS", "user": f"U{user.upper()}", "name": user},
            "outcome": "ok", "exit_code": 0, "duration_s": 0.1, "worker": "w", "summary": f"echo {n}"}


async def _trail(nc: NATS, prefix: str) -> tuple[Names, list[dict[str, Any]]]:
    names = Names(prefix)
    js = nc.jetstream()
    await js.add_stream(name=names.audit_stream, subjects=[names.audit_all])
    made = []
    for n in range(60):
        # s1 and s2 alternate; user "rare" runs only twice, far apart; admin changes between.
        fields = _fields(n, "s1" if n % 2 else "s2", "rare" if n in (3, 51) else "common")
        await js.publish(names.audit(fields["server"], "exec"), encode_record(fields))
        made.append(fields)
        if n % 10 == 0:
            await js.publish(names.audit("_admin", "users.add"), encode_record({**fields, "op": "users.add"}))
    return names, made


async def _pages(reader: AuditReader, **body: Any) -> tuple[list[str], int]:
    """Every record ``body`` selects, following ``next`` to the end; and how many replies."""
    ids: list[str] = []
    replies = 0
    while True:
        reply = await reader.query(AuditQuery(**body))
        replies += 1
        assert reply["ok"] is True
        got = [r["id"] for r in reply["records"]]
        ids = ids + got if "before_seq" not in body else got + ids
        if reply["next"] is None:
            return ids, replies
        body = {**body, **reply["next"]}
        assert replies < 100


async def test_paging_through_windows_and_truncated_scans_misses_nothing(
        nc: NATS, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names, made = await _trail(nc, prefix)
    monkeypatch.setattr(auditquery, "FIRST_WINDOW", 4)
    reader = AuditReader(nc.jetstream(), names)
    s1 = [f["id"] for f in made if f["server"] == "s1"]

    newest = await reader.query(AuditQuery(server="s1", limit=5))
    assert [r["id"] for r in newest["records"]] == s1[-5:] and newest["next"], newest
    # Backward from the end and forward from the start, page by page: each record once, in order.
    backward, _ = await _pages(reader, server="s1", limit=7, before_seq=10**6)
    assert backward == s1
    forward, _ = await _pages(reader, server="s1", limit=7, after_seq=0)
    assert forward == s1
    admin, _ = await _pages(reader, server="_admin", op="users.add", limit=4, after_seq=0)
    assert admin == [f"c{n}" for n in range(0, 60, 10)]

    # A scan budget of 10 messages: a sparse filter is answered in truncated pages that
    # say where to go on, and following them finds every match.
    monkeypatch.setattr(auditquery, "SCAN_LIMIT", 10)
    first = await reader.query(AuditQuery(user="rare", after_seq=0))
    assert first["truncated"] is True and first["scanned"] == 10 and first["next"], first
    found, replies = await _pages(reader, user="rare", after_seq=0)
    assert found == ["c3", "c51"] and replies > 5
    found, replies = await _pages(reader, user="rare", before_seq=10**6)
    assert found == ["c3", "c51"] and replies > 5

    # read_to: where a pass that read to the end stopped, so following on from it reads
    # only what is new, not the records that did not match again.
    monkeypatch.setattr(auditquery, "SCAN_LIMIT", 10_000)
    whole = await reader.query(AuditQuery(user="rare", after_seq=0))
    last_seq = (await nc.jetstream().stream_info(names.audit_stream)).state.last_seq
    assert whole["next"] is None and whole["read_to"] == last_seq == 66, whole
    again = await reader.query(AuditQuery(user="rare", after_seq=whole["read_to"]))
    assert again["records"] == [] and again["scanned"] == 0 and again["read_to"] == last_seq
    newest = await reader.query(AuditQuery(user="rare"))
    assert newest["read_to"] == last_seq and [r["id"] for r in newest["records"]] == ["c3", "c51"]
