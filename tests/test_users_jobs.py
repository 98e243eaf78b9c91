"""Jobs for users (issue 21) on `fleetbus up`'s own NATS: the job service is a deputy, so
it checks every selected server against the user's grants, sends each command on the
grant subject (the worker checks again and audits the user), and shows a user only its
own jobs. Users follow jobs by polling jobs.get (they cannot read job events)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from fleetbus.client import Client
from fleetbus.errors import Forbidden, NotFound
from fleetbus.subjects import HDR_ON_BEHALF_OF, Names
from nats.aio.client import Client as NATS
from support.auditread import audit_records
from support.processes import Fleet
from test_users import UserClient, add_user

NAMES = Names("fleetbus")
WEB = ("jweb1", "jweb2")
DB = "jdb1"


@pytest.fixture(scope="module")
def servers(fleet: Fleet) -> None:
    for name in WEB:
        added = fleet.cli("servers", "add", name, "--transport", "local", "--role", "web")
        assert added.returncode == 0, added.stderr
    added = fleet.cli("servers", "add", DB, "--transport", "local", "--role", "db")
    assert added.returncode == 0, added.stderr


async def served_through(fleet_nc: NATS, grant: str, servers: tuple[str, ...]) -> None:
    """Wait until the worker serves ``grant``'s subjects for ``servers`` (it follows the
    users bucket): a ping there from inside fleetbus's account is answered."""
    deadline = time.monotonic() + 15
    for server in servers:
        while True:
            try:
                await fleet_nc.request(NAMES.grant(grant, server, "ping"), b"{}", timeout=5)
                break
            except nats.errors.NoRespondersError:
                assert time.monotonic() < deadline, f"grant {grant} never served for {server}"
                await asyncio.sleep(0.05)


def denied_count(fleet: Fleet, user: str, op: str) -> float:
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("fleetbus_denied_total{") and f'user="{user}"' in line and f'op="{op}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def as_user(fleet: Fleet, seed: Path, name: str) -> tuple[UserClient, Client]:
    user = await UserClient().connect(fleet.nats_url, seed, name)
    assert user.nc is not None
    return user, Client(user.nc, NAMES, requester=f"{name}-ci")


async def followed(client: Client, job: str) -> list[tuple[str, dict[str, Any]]]:
    async with contextlib.aclosing(client.follow_job(job)) as records:
        return [item async for item in records]


async def test_a_users_job_runs_on_its_grants_servers_and_is_audited_as_the_user(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path) -> None:
    seed, made = add_user(fleet, tmp_path, "jobber", "--allow", "exec:role=web")
    grant = made["user"]["grants"][0]["id"]
    public_key = made["user"]["public_key"]
    await served_through(fleet_nc, grant, WEB)
    user, client = await as_user(fleet, seed, "jobber")
    try:
        started = await client.start_job({"selection": {"role": "web"}, "op": "exec",
                                          "exec": {"argv": ["echo", "from jobber"]}})
        assert sorted(started["targets"]) == sorted(WEB) and started["follow"] == "poll", started
        job = started["id"]
        records = await followed(client, job)
        kinds = [kind for kind, _ in records]
        assert kinds[0] == "started" and kinds[-1] == "finished", kinds
        assert records[-1][1]["state"] == "succeeded", records[-1]
        results = {body["server"]: body for kind, body in records if kind == "result"}
        assert set(results) == set(WEB)
        assert all(r["outcome"] == "ok" and "from jobber" in r["stdout"] for r in results.values()), results

        got = await client.get_job(job)
        assert got["job"]["identity"]["name"] == "jobber" and got["job"]["identity_key"].endswith(public_key)

        ids = {r["command_id"] for r in results.values()}
        audited = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, ids)
        for command_id in ids:
            (record,) = audited[command_id]
            assert record["outcome"] == "ok", record
            assert record["identity"]["user"] == public_key, record
            assert record["identity"]["name"] == "jobber" and record["identity"]["via"] == "jobs", record
    finally:
        await user.close()


async def test_a_users_job_streams_live_output_to_its_own_inbox_only(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path) -> None:
    seed, made = add_user(fleet, tmp_path, "watcher", "--allow", "exec:role=web")
    await served_through(fleet_nc, made["user"]["grants"][0]["id"], WEB)
    user, client = await as_user(fleet, seed, "watcher")
    try:
        assert user.nc is not None
        inbox = user.nc.new_inbox()
        ends: dict[str, bytes] = {}
        chunks: list[bytes] = []
        done = asyncio.Event()

        async def on_output(msg: Any) -> None:
            headers = msg.headers or {}
            if headers.get("Fleetbus-End") == "1":
                ends[headers["Fleetbus-Command"]] = msg.data
                if len(ends) == len(WEB):
                    done.set()
            else:
                chunks.append(msg.data)

        await user.nc.subscribe(inbox, cb=on_output)
        started = await client.start_job({"selection": {"role": "web"}, "op": "exec",
                                          "exec": {"argv": ["echo", "live for watcher"], "output_subject": inbox}})
        await asyncio.wait_for(done.wait(), 30)  # each server's end marker, on the user's own inbox
        assert chunks.count(b"live for watcher\n") == len(WEB), chunks
        assert (await followed(client, started["id"]))[-1][1]["state"] == "succeeded"
        # Another user's inbox is not its to name: the job service refuses before any job.
        other = Names.user_inbox("U" + "A" * 55) + "stolen"
        with pytest.raises(Forbidden):
            await client.start_job({"selection": {"role": "web"}, "op": "exec",
                                    "exec": {"argv": ["true"], "output_subject": other}})
    finally:
        await user.close()


async def test_a_selection_reaching_outside_the_grants_starts_nothing(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path) -> None:
    seed, made = add_user(fleet, tmp_path, "narrow", "--allow", "exec:role=web")
    public_key = made["user"]["public_key"]
    user, client = await as_user(fleet, seed, "narrow")
    owner = Client(fleet_nc, NAMES)
    try:
        before = {j["id"] for j in await owner.list_jobs(limit=1000)}
        denied = denied_count(fleet, public_key, "jobs.start")
        for dry_run in (False, True):  # a dry run would list servers outside the grants
            with pytest.raises(Forbidden) as refused:
                await client.start_job({"selection": {"servers": [*WEB, DB]}, "op": "exec",
                                        "exec": {"argv": ["true"]}, "dry_run": dry_run})
            assert "1 of the 3" in refused.value.message and DB in refused.value.message
        # A put job needs the object store, which users may not use, whatever the grant.
        with pytest.raises(Forbidden, match="object store"):
            await client.start_job({"selection": {"role": "web"}, "op": "put", "put": {
                "path": "/tmp/x", "object": "o1", "sha256": "0" * 64, "size": 0}})
        after = {j["id"] for j in await owner.list_jobs(limit=1000)}
        assert after == before
        assert denied_count(fleet, public_key, "jobs.start") == denied + 3
    finally:
        await owner.replies.close()
        await user.close()


async def test_a_user_sees_only_its_own_jobs_and_the_owner_sees_all(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path) -> None:
    seed_a, made_a = add_user(fleet, tmp_path, "alpha", "--allow", "exec:role=web")
    seed_b, _ = add_user(fleet, tmp_path, "beta", "--allow", "exec:role=web")
    await served_through(fleet_nc, made_a["user"]["grants"][0]["id"], WEB)
    alpha, a_client = await as_user(fleet, seed_a, "alpha")
    beta, b_client = await as_user(fleet, seed_b, "beta")
    owner = Client(fleet_nc, NAMES)
    try:
        job = (await a_client.start_job({"selection": {"role": "web"}, "op": "exec",
                                         "exec": {"argv": ["true"]}}))["id"]
        assert (await followed(a_client, job))[-1][1]["state"] == "succeeded"
        for call in (b_client.get_job(job), b_client.cancel_job(job), b_client.rerun_job(job),
                     b_client.list_jobs(before=job)):
            with pytest.raises(NotFound, match=f"no job with id {job}"):
                await call
        assert job not in {j["id"] for j in await b_client.list_jobs()}
        assert job in {j["id"] for j in await a_client.list_jobs()}
        assert job in {j["id"] for j in await owner.list_jobs()}
        assert (await owner.get_job(job))["state"] == "succeeded"
        # Its starter may rerun it: checked against its grants as they are now.
        again = await a_client.rerun_job(job)
        assert again["ok"] and sorted(again["targets"]) == sorted(WEB)
        assert (await followed(a_client, again["id"]))[-1][1]["state"] == "succeeded"
    finally:
        await owner.replies.close()
        await alpha.close()
        await beta.close()


async def test_a_user_forging_the_on_behalf_header_is_audited_as_itself(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path) -> None:
    seed, made = add_user(fleet, tmp_path, "forger", "--allow", "exec:role=web")
    grant = made["user"]["grants"][0]["id"]
    await served_through(fleet_nc, grant, WEB)
    user, _ = await as_user(fleet, seed, "forger")
    try:
        assert user.nc is not None
        command_id = f"forge-{uuid.uuid4().hex[:12]}"
        forged = json.dumps({"account": "USERS", "user": "UFAKE", "name": "someone-else", "via": "jobs"})
        msg = await user.nc.request(NAMES.grant(grant, WEB[0], "exec"),
                                    json.dumps({"id": command_id, "argv": ["true"]}).encode(),
                                    timeout=30, headers={HDR_ON_BEHALF_OF: forged})
        assert json.loads(msg.data)["ok"] is True
        audited = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, {command_id})
        (record,) = audited[command_id]
        assert record["identity"]["user"] == made["user"]["public_key"], record
        assert record["identity"]["name"] == "forger" and "via" not in record["identity"], record
    finally:
        await user.close()


def test_the_on_behalf_header_counts_only_inside_fleetbus() -> None:
    from fleetbus.subjects import HDR_REQUEST_INFO, OWNER, identity_in, on_behalf_in

    header = {HDR_ON_BEHALF_OF: json.dumps({"account": "USERS", "user": "UX", "name": "ci", "via": "jobs"})}
    assert on_behalf_in(header, OWNER) == {"account": "USERS", "user": "UX", "name": "ci", "via": "jobs"}
    from_user = {**header, HDR_REQUEST_INFO: json.dumps({"acc": "USERS", "user": "UY"})}
    assert on_behalf_in(from_user, identity_in(from_user)) is None
    assert on_behalf_in({HDR_ON_BEHALF_OF: "not json"}, OWNER) is None
    assert on_behalf_in({}, OWNER) is None
    assert re.fullmatch(r"[A-Za-z-]+", HDR_ON_BEHALF_OF)


async def test_a_grant_gone_mid_job_makes_that_servers_result_forbidden(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path) -> None:
    seed, made = add_user(fleet, tmp_path, "leaver", "--allow", "exec:role=web")
    grant = made["user"]["grants"][0]["id"]
    await served_through(fleet_nc, grant, WEB)
    # The first command waits for this file (the local transport may run it as an
    # unprivileged user: a folder anyone may read).
    folder = Path(tempfile.mkdtemp(prefix="fb-jobs-"))
    folder.chmod(0o755)
    gate = folder / "go"
    user, client = await as_user(fleet, seed, "leaver")
    owner = Client(fleet_nc, NAMES)
    try:
        job = (await client.start_job({
            "selection": {"role": "web"}, "op": "exec", "max_concurrency": 1, "timeout_s": 60,
            "exec": {"argv": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"]}}))["id"]
        removed = fleet.cli("users", "remove", "leaver")
        assert removed.returncode == 0, removed.stderr
        # The worker drops the grant's subjects once the users bucket says so.
        deadline = time.monotonic() + 15
        while True:
            try:
                await fleet_nc.request(NAMES.grant(grant, WEB[0], "ping"), b"{}", timeout=5)
            except nats.errors.NoRespondersError:
                break
            assert time.monotonic() < deadline, "the removed user's grant is still served"
            await asyncio.sleep(0.05)
        gate.touch()
        records = await followed(owner, job)
        results = [body for kind, body in records if kind == "result"]
        assert sorted(r["outcome"] for r in results) == ["error", "ok"], results
        (refused,) = [r for r in results if r["outcome"] == "error"]
        assert refused["error"]["code"] == "forbidden" and "no longer cover" in refused["error"]["message"]
        assert records[-1][1]["state"] == "failed"
    finally:
        await owner.replies.close()
        await user.close()
        gate.unlink(missing_ok=True)
        folder.rmdir()


async def test_the_cli_follows_a_users_job_by_polling(
        fleet: Fleet, fleet_nc: NATS, servers: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleetbus.cli.jobs import follow

    seed, made = add_user(fleet, tmp_path, "follower", "--allow", "exec:role=web")
    await served_through(fleet_nc, made["user"]["grants"][0]["id"], WEB)
    user, client = await as_user(fleet, seed, "follower")
    try:
        started = await client.start_job({"selection": {"role": "web"}, "op": "exec",
                                          "exec": {"argv": ["echo", "followed"]}})
        assert await follow(client, started, as_json=True) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert {line.get("server") for line in lines if line.get("outcome") == "ok"} == set(WEB), lines
        assert not user.errors  # no subscription NATS refused (job events are not the user's)
    finally:
        await user.close()
