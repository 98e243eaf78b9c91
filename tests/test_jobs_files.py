"""Files to and from many servers as one job (`fleetbus put|get` with a selection),
against a real `fleetbus up` with real `local` servers.

Every `local` server is this machine, so a put job's targets all write the one path:
each server's own reply (kept in its result) is what shows that it wrote the file, and
the object store's sequence numbers show that the bytes went up once, not per server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fleetbus.objects import CHUNK_BYTES
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from support.agents import Agent, gateway_of
from support.processes import Fleet
from test_jobs import add_agent, register, request, wait_until

FILES_STREAM = f"OBJ_{Names().files_bucket}"


@pytest.fixture
def tag() -> str:
    return secrets.token_hex(3)


@pytest.fixture
async def nc(fleet: Fleet) -> AsyncIterator[NATS]:
    import nats

    conn = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    yield conn
    await conn.close()


async def files_state(nc: NATS) -> tuple[int, int]:
    """The file bucket's last sequence (it counts every message ever stored, purged or
    not) and the bytes it holds now."""
    info = await nc.jetstream().stream_info(FILES_STREAM)
    return info.state.last_seq, info.state.bytes


async def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """The fleetbus CLI in a thread: the test's own NATS connection keeps being served."""
    return await asyncio.to_thread(fleet.cli, *args)


def job_results(lines: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    return {r["server"]: r for r in rows if "server" in r}


async def test_put_uploads_once_and_every_server_writes_it(fleet: Fleet, nc: NATS, tag: str,
                                                           tmp_path: Path) -> None:
    names = [f"{tag}-web-{i}" for i in range(1, 5)]
    for name in names:
        await register(nc, name, tag, ["web"])
    await register(nc, f"{tag}-db-1", tag, ["db"])  # not selected: never touched
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, the last one short
    local = tmp_path / "build.tar.gz"
    local.write_bytes(payload)
    remote = tmp_path / "srv" / "app" / "build.tar.gz"
    before_seq, _ = await files_state(nc)

    proc = await cli(fleet, "put", "--label", f"t={tag}", "--role", "web", str(local), str(remote),
                     "--mode", "0640", "--json")

    assert proc.returncode == 0, proc.stderr
    results = job_results(proc.stdout)
    assert sorted(results) == names
    digest = hashlib.sha256(payload).hexdigest()
    for name in names:
        data = results[name]["data"]
        assert results[name]["outcome"] == "ok"
        assert data == {"path": str(remote), "size": len(payload), "sha256": digest, "mode": "0640"}, name
    assert remote.read_bytes() == payload
    assert stat.S_IMODE(remote.stat().st_mode) == 0o640
    # Uploaded once: its chunks, its metadata and the metadata that deleted it. Once
    # per server would be four times the chunks.
    after_seq, _ = await files_state(nc)
    chunks = -(-len(payload) // CHUNK_BYTES)
    assert after_seq - before_seq == chunks + 2
    # Deleted when the job ended: no object of this job is left in the bucket.
    listing = await nc.jetstream().stream_info(FILES_STREAM, subjects_filter=f"$O.{Names().files_bucket}.M.>")
    left = [s for s, n in (listing.state.subjects or {}).items() if n]
    metas = [await nc.jetstream().get_last_msg(FILES_STREAM, s) for s in left]
    assert not [m for m in metas if b"job-put/" in m.data and b'"deleted": true' not in m.data
                and b'"deleted":true' not in m.data]

    human = await cli(fleet, "put", "--label", f"t={tag}", "--role", "web", str(local), str(remote))
    assert human.returncode == 0, human.stderr
    for name in names:
        assert f"{name}  ok  3.0 MiB  " in human.stdout
    assert "4 ok, 0 failed" in human.stdout


async def test_put_failures_follow_the_exit_code_rule(fleet: Fleet, nc: NATS, tag: str, tmp_path: Path) -> None:
    await register(nc, f"{tag}-a", tag)
    await register(nc, f"{tag}-b", tag)
    local = tmp_path / "f"
    local.write_bytes(b"x" * 100_000)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")

    unwritable = await cli(fleet, "put", "--label", f"t={tag}", str(local), str(blocker / "f"))
    assert unwritable.returncode == 1, unwritable.stderr  # some failed, no budget spent
    for name in (f"{tag}-a", f"{tag}-b"):
        assert f"{name}  error  cannot create the parent directories" in unwritable.stdout
    assert "0 ok, 2 failed" in unwritable.stdout

    # One server nobody serves: the others still get the file; the job is "failed".
    await register(nc, f"{tag}-gone", tag, transport="agent-outbound")
    target = tmp_path / "out" / "f"
    partly = await cli(fleet, "put", "--label", f"t={tag}", str(local), str(target))
    assert partly.returncode == 1, partly.stderr
    assert target.read_bytes() == local.read_bytes()
    assert f"{tag}-gone  offline" in partly.stdout and "2 ok, 1 failed" in partly.stdout

    nothing = await cli(fleet, "put", "--label", f"t={tag}", "--role", "nope", str(local), str(target))
    assert nothing.returncode == 125 and "no server matches" in nothing.stderr
    stray = await cli(fleet, "put", f"{tag}-a", "--max-errors", "1", str(local), str(target))
    assert stray.returncode == 125 and "need a selection" in stray.stderr
    # An ended put job cannot be rerun: its file went with it.
    job = json.loads((await cli(fleet, "jobs", "list", "--json")).stdout)[0]["id"]
    rerun = await cli(fleet, "jobs", "rerun", job)
    assert rerun.returncode == 125 and "put it again" in rerun.stderr


async def test_get_fetches_each_server_file_into_its_own_folder(fleet: Fleet, nc: NATS, tag: str,
                                                                tmp_path: Path) -> None:
    names = [f"{tag}-db-{i}" for i in range(1, 4)]
    for name in names:
        await register(nc, name, tag, ["db"])
    conf = tmp_path / "etc" / "postgresql.conf"
    conf.parent.mkdir()
    content = os.urandom(600_000)  # above the inline limit; the job uses objects anyway
    conf.write_bytes(content)
    dest = tmp_path / "configs"
    _, bytes_before = await files_state(nc)

    proc = await cli(fleet, "get", "--label", f"t={tag}", "--role", "db", str(conf), str(dest))

    assert proc.returncode == 0, proc.stderr
    for name in names:
        assert (dest / name / "postgresql.conf").read_bytes() == content
        assert f"{name}  ok  585.9 KiB  " in proc.stdout
    assert sorted(p.name for p in dest.iterdir()) == names
    assert not list(dest.rglob(".*"))  # no temporary file left behind
    # Every server's object was deleted once fetched.
    _, bytes_after = await files_state(nc)
    assert bytes_after - bytes_before < len(content)

    missing = await cli(fleet, "get", "--label", f"t={tag}", str(tmp_path / "nope.conf"), str(tmp_path / "m"))
    assert missing.returncode == 1
    assert "0 ok, 3 failed" in missing.stdout
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").rglob("nope.conf"))
    onto_file = await cli(fleet, "get", "--label", f"t={tag}", str(conf), str(conf))
    assert onto_file.returncode == 125 and "is not a folder" in onto_file.stderr


async def test_put_and_get_jobs_through_a_real_outbound_agent(fleet: Fleet, nc: NATS, tag: str,
                                                              tmp_path: Path) -> None:
    await register(nc, f"{tag}-local", tag)
    key = await add_agent(nc, f"{tag}-agent", tag)
    gateway = await asyncio.to_thread(gateway_of, fleet)
    agent = Agent(tmp_path / "agent", gateway["address"], gateway["fingerprint"], key).start()
    try:
        async def online() -> bool:
            got = await request(nc, "fleetbus.v1.admin.servers.get", {"name": f"{tag}-agent"})
            return (got.get("status") or {}).get("state") == "online"

        await wait_until(online, what="the agent connected")
        payload = os.urandom(2 * 1024 * 1024 + 5)
        local = tmp_path / "payload.bin"
        local.write_bytes(payload)
        remote = tmp_path / "remote" / "payload.bin"

        put = await cli(fleet, "put", "--label", f"t={tag}", str(local), str(remote),
                                      "--mode", "0600", "--json")
        assert put.returncode == 0, put.stderr + put.stdout
        results = job_results(put.stdout)
        digest = hashlib.sha256(payload).hexdigest()
        assert {name: (r["outcome"], r["data"]["sha256"], r["data"]["mode"]) for name, r in results.items()} == {
            f"{tag}-agent": ("ok", digest, "0600"), f"{tag}-local": ("ok", digest, "0600")}
        assert remote.read_bytes() == payload and stat.S_IMODE(remote.stat().st_mode) == 0o600

        dest = tmp_path / "back"
        got = await cli(fleet, "get", "--label", f"t={tag}", str(remote), str(dest))
        assert got.returncode == 0, got.stderr + got.stdout
        for name in (f"{tag}-agent", f"{tag}-local"):
            assert (dest / name / "payload.bin").read_bytes() == payload
    finally:
        agent.stop()


class GatedFiles:
    """The real file bucket, counting the downloads in flight (from the read of an object
    to its delete, which ends every download). No read goes on until ``at_once`` are in
    flight: a requester that fetched one file at a time would wait here for ever."""

    def __init__(self, files: Any, at_once: int) -> None:
        self.files = files
        self.at_once = at_once
        self.in_flight = 0
        self.most = 0
        self.go = asyncio.Event()

    async def read(self, name: str) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= self.at_once:
            self.go.set()
        await self.go.wait()
        return await self.files.read(name)

    async def delete(self, name: str) -> None:
        self.in_flight -= 1
        await self.files.delete(name)


async def test_a_get_job_downloads_several_files_at_once_within_the_bound(
        nc: NATS, tag: str, tmp_path: Path) -> None:
    from fleetbus.cli.jobfiles import fetcher
    from fleetbus.cli.jobs import follow
    from fleetbus.client import Client
    from fleetbus.jobfiles import DOWNLOADS_AT_ONCE, Downloads
    from fleetbus.objects import ObjectFiles

    names = [f"{tag}-g{i:02d}" for i in range(DOWNLOADS_AT_ONCE + 4)]
    for name in names:
        await register(nc, name, tag)
    source = tmp_path / "app.conf"
    content = os.urandom(300_000)
    source.write_bytes(content)
    dest = tmp_path / "got"
    client = Client(nc, Names(), requester="test")
    gated = GatedFiles(ObjectFiles(nc.jetstream(), Names().files_bucket), DOWNLOADS_AT_ONCE)
    failed: list[str] = []
    reply = await client.start_job({"selection": {"labels": {"t": tag}}, "op": "get", "get": {"path": str(source)},
                                    "max_concurrency": len(names)})

    code = await asyncio.wait_for(
        follow(client, reply, True, on_result=fetcher(Downloads(gated, dest, "app.conf"), failed)), 60)

    assert code == 0 and failed == []
    assert gated.most == DOWNLOADS_AT_ONCE  # several at once, never more than the bound
    for name in names:
        assert (dest / name / "app.conf").read_bytes() == content
    assert not list(dest.rglob(".*"))  # each written to a temporary name, then renamed


async def test_a_failed_download_is_that_servers_error_and_makes_the_exit_code_1(
        fleet: Fleet, nc: NATS, tag: str, tmp_path: Path) -> None:
    names = [f"{tag}-d{i}" for i in (1, 2, 3)]
    for name in names:
        await register(nc, name, tag)
    source = tmp_path / "x.conf"
    source.write_bytes(b"x = 1\n")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / names[1]).write_text("a file where the server's folder goes")

    proc = await cli(fleet, "get", "--label", f"t={tag}", str(source), str(dest))

    assert proc.returncode == 1, proc.stderr
    assert f"{names[1]}  error  could not download: " in proc.stdout
    assert f"fleetbus: 1 download failed: {names[1]}" in proc.stderr
    for name in (names[0], names[2]):
        assert f"{name}  ok  " in proc.stdout and (dest / name / "x.conf").read_bytes() == b"x = 1\n"


def last_job(fleet: Fleet) -> str:
    return json.loads(fleet.cli("jobs", "list", "--json", "--limit", "1").stdout)[0]["id"]


async def test_rerun_of_a_get_job_fetches_the_files_again(fleet: Fleet, nc: NATS, tag: str, tmp_path: Path) -> None:
    names = [f"{tag}-c1", f"{tag}-c2"]
    for name in names:
        await register(nc, name, tag)
    source = tmp_path / "c.conf"
    source.write_bytes(b"first\n")
    dest = tmp_path / "configs"
    first = await cli(fleet, "get", "--label", f"t={tag}", str(source), str(dest))
    assert first.returncode == 0, first.stderr
    job = await asyncio.to_thread(last_job, fleet)
    got = await request(nc, "fleetbus.v1.jobs.get", {"id": job})
    assert got["job"]["request"]["client_notes"] == {"dest": str(dest.resolve())}

    source.write_bytes(b"second\n")
    again = await cli(fleet, "jobs", "rerun", job)  # into the folder the job recorded

    assert again.returncode == 0, again.stderr
    for name in names:
        assert (dest / name / "c.conf").read_bytes() == b"second\n"
    elsewhere = tmp_path / "elsewhere"
    moved = await cli(fleet, "jobs", "rerun", job, "--failed", "--to", str(elsewhere))
    assert moved.returncode == 125 and "nothing to rerun" in moved.stderr
    moved = await cli(fleet, "jobs", "rerun", job, "--to", str(elsewhere))
    assert moved.returncode == 0, moved.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == names
    rerun = await asyncio.to_thread(last_job, fleet)
    got = await request(nc, "fleetbus.v1.jobs.get", {"id": rerun})
    assert got["job"]["rerun_of"] == job and got["job"]["request"]["client_notes"]["dest"] == str(elsewhere.resolve())

    # Started on the bus with no notes: the rerun needs to be told where.
    bus = await request(nc, "fleetbus.v1.jobs.start", {"selection": {"labels": {"t": tag}}, "op": "get",
                                                        "get": {"path": str(source)}})
    await wait_until(lambda: _ended(nc, bus["id"]), what="the bus get job ended")
    nowhere = await cli(fleet, "jobs", "rerun", bus["id"])
    assert nowhere.returncode == 125 and "give --to DIR" in nowhere.stderr
    big = await request(nc, "fleetbus.v1.jobs.start", {"selection": {"labels": {"t": tag}}, "op": "get",
                                                       "get": {"path": str(source)},
                                                       "client_notes": {"dest": "x" * 5000}})
    assert big["error"]["code"] == "invalid_request" and "client_notes" in big["error"]["message"]


async def _ended(nc: NATS, job: str) -> bool:
    return (await request(nc, "fleetbus.v1.jobs.get", {"id": job}))["summary"] is not None


async def test_rerun_of_a_put_job_reuses_its_file_or_takes_it_again(
        fleet: Fleet, nc: NATS, tag: str, tmp_path: Path) -> None:
    from fleetbus.objects import ObjectFiles

    await register(nc, f"{tag}-p1", tag)
    local = tmp_path / "build.bin"
    local.write_bytes(os.urandom(400_000))
    remote = tmp_path / "remote" / "build.bin"
    put = await cli(fleet, "put", "--label", f"t={tag}", str(local), str(remote))
    assert put.returncode == 0, put.stderr
    job = await asyncio.to_thread(last_job, fleet)

    gone = await cli(fleet, "jobs", "rerun", job)  # `fleetbus put` deleted its upload at the end
    assert gone.returncode == 125
    assert gone.stderr.count("\n") == 1 and "file is gone" in gone.stderr and "put it again" in gone.stderr
    listed = await cli(fleet, "jobs", "rerun", job, "--dry-run")  # lists the servers; needs no file
    assert listed.returncode == 0 and listed.stdout == f"{tag}-p1\n", listed.stderr
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the same")
    wrong = await cli(fleet, "jobs", "rerun", job, "--file", str(other))
    assert wrong.returncode == 125 and "sha256 differs" in wrong.stderr
    assert await asyncio.to_thread(last_job, fleet) == job  # nothing started
    remote.unlink()
    _, bytes_before = await files_state(nc)
    again = await cli(fleet, "jobs", "rerun", job, "--file", str(local))
    assert again.returncode == 0, again.stderr
    assert remote.read_bytes() == local.read_bytes()
    _, bytes_after = await files_state(nc)
    assert bytes_after - bytes_before < local.stat().st_size  # its upload deleted at the end

    # A bus client's object, not deleted yet: the rerun uses it as it is.
    files = ObjectFiles(nc.jetstream(), Names().files_bucket)
    data = local.read_bytes()

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    stored = await files.write(f"job-put/{tag}", chunks())
    bus = await request(nc, "fleetbus.v1.jobs.start", {
        "selection": {"labels": {"t": tag}}, "op": "put",
        "put": {"path": str(remote), "object": stored.name, "sha256": stored.sha256, "size": stored.size}})
    await wait_until(lambda: _ended(nc, bus["id"]), what="the bus put job ended")
    remote.unlink()
    reused = await cli(fleet, "jobs", "rerun", bus["id"], "--json")
    assert reused.returncode == 0, reused.stderr
    assert job_results(reused.stdout)[f"{tag}-p1"]["data"]["sha256"] == stored.sha256
    assert remote.read_bytes() == data
    await files.delete(stored.name)


def test_a_server_folder_is_one_segment_under_dest(tmp_path: Path) -> None:
    from fleetbus.errors import TransportError
    from fleetbus.jobfiles import server_folder

    assert server_folder(tmp_path, "db-1") == tmp_path / "db-1"
    for name in (".", "..", "../x", "a/b", ".hidden", ""):  # the name rule alone refuses them
        with pytest.raises(TransportError):
            server_folder(tmp_path, name)


def test_the_progress_line_counts_the_files_still_downloading() -> None:
    import io

    from fleetbus.cli.progress import ProgressLine, describe

    counts = {"total": 4, "ok": 4, "failed": 0, "running": 0, "waiting": 0, "skipped": 0}
    assert "downloading" not in describe(counts, 2.0)
    assert describe(counts, 2.0, fetching=3).startswith("done 4/4 (0 failed)  running 0  waiting 0  skipped 0  "
                                                        "downloading 3  2.0 servers/s")
    screen = io.StringIO()
    line = ProgressLine(screen, clock=lambda: 0.0, width=lambda: 200)
    line.update(counts, 2.0)
    line.fetching = 1
    line.echo("db-1  ok  1.0 KiB  0.05s")
    assert screen.getvalue().endswith("downloading 1  2.0 servers/s  0:02")
