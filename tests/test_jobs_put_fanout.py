"""A put job's file on many servers: the requester sends it once, each worker reads it
from the object store once (fleetbus.objectshare), memory stays bounded everywhere.

The fast tests drive :class:`SharedObjects` against a real nats-server and a real object
store; the one whose reads must be caught mid-way paces the store's read from the test
(after its first chunk), nothing else. The big test is the issue's: a 256 MiB put job to
20 real outbound agents and 2 real sshd servers through a real `fleetbus up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import stat
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import support.sshd
from fleetbus.client import Client
from fleetbus.connection import NatsSettings
from fleetbus.errors import NotFound, TransportError
from fleetbus.jobfiles import upload
from fleetbus.objects import CHUNK_BYTES, ObjectFiles
from fleetbus.objectshare import SharedObjects, SharedRead
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.kv import MSG_ROLLUP_SUBJECT
from support.agents import AGENT, Agent, gateway_of
from support.processes import Fleet, children_of
from support.sshd import Sshd, generate_key, require_sshd
from test_jobs import wait_until

MiB = 1024 * 1024


# --- SharedObjects against a real object store ----------------------------------------

class PacedFiles(ObjectFiles):
    """The real object store read, held after its first chunk until ``go`` is set, so a
    test can act while a read is under way."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.first = asyncio.Event()
        self.go = asyncio.Event()

    async def chunks(self, info: api.ObjectInfo) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(super().chunks(info)) as chunks:
            async for chunk in chunks:
                yield chunk
                if not self.first.is_set():
                    self.first.set()
                    await self.go.wait()


@pytest.fixture
async def bucket(nc: NATS, prefix: str) -> AsyncIterator[str]:
    name = f"{prefix}_files"
    js = nc.jetstream()
    await js.create_object_store(bucket=name, config=api.ObjectStoreConfig(bucket=name))
    yield name
    await js.delete_object_store(name)


def spool_fds(folder: Path) -> list[str]:
    """This process's descriptors open on files under ``folder`` (unlinked or not)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


async def read_all(read: SharedRead, first: asyncio.Event | None = None) -> bytes:
    data = bytearray()
    try:
        async for chunk in read.chunks():
            data += chunk
            if first is not None:
                first.set()
    finally:
        read.release()
    return bytes(data)


async def test_puts_of_one_object_share_one_read_that_they_follow(nc: NATS, bucket: str,
                                                                  tmp_path: Path) -> None:
    files = PacedFiles(nc.jetstream(), bucket)
    payload = os.urandom(3 * CHUNK_BYTES + 123)
    await files.write("build", _chunks(payload))
    read_bytes: list[int] = []
    shared = SharedObjects(files, tmp_path / "spool", linger_s=3600, on_read=read_bytes.append)
    try:
        first = await shared.open("build")
        got_first = asyncio.Event()
        reading = asyncio.create_task(read_all(first, got_first))
        # The first command has bytes while the store's read is held after one chunk:
        # it follows the spool, it does not wait for the whole object.
        await asyncio.wait_for(got_first.wait(), 10)
        assert first.spool.written < len(payload)
        second = await shared.open("build")  # joins the read under way
        assert second.spool is first.spool
        later = asyncio.create_task(read_all(second))
        files.go.set()
        assert await reading == payload and await later == payload
        assert sum(read_bytes) == len(payload)  # once, for both
        # Done with it, it lingers: the next wave reads the spool, not the store.
        assert shared.spools == 1
        assert await read_all(await shared.open("build")) == payload
        assert sum(read_bytes) == len(payload)
        spool_dir = next((tmp_path / "spool").iterdir())
        assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
        assert len(spool_fds(spool_dir)) == 1
    finally:
        await shared.aclose()
    assert shared.spools == 0
    assert list((tmp_path / "spool").iterdir()) == []  # the private folder went too
    assert spool_fds(tmp_path / "spool") == []


async def test_a_deleted_object_fails_every_command_reading_it(nc: NATS, bucket: str, tmp_path: Path) -> None:
    files = PacedFiles(nc.jetstream(), bucket)
    await files.write("build", _chunks(os.urandom(4 * CHUNK_BYTES)))
    shared = SharedObjects(files, tmp_path / "spool", linger_s=3600)
    try:
        reads = [await shared.open("build"), await shared.open("build")]
        tasks = [asyncio.create_task(read_all(r)) for r in reads]
        await asyncio.wait_for(files.first.wait(), 10)
        await files.delete("build")  # mid-read: the store's read is held after one chunk
        for task in tasks:
            with pytest.raises(TransportError, match="deleted or replaced while it was read"):
                await asyncio.wait_for(task, 10)
        assert shared.spools == 0 and spool_fds(tmp_path / "spool") == []
        with pytest.raises(NotFound):  # and a later command is told it is gone
            await shared.open("build")
    finally:
        files.go.set()
        await shared.aclose()


async def test_a_truncated_object_fails_every_command_reading_it(nc: NATS, bucket: str, tmp_path: Path) -> None:
    files = PacedFiles(nc.jetstream(), bucket)
    await files.write("build", _chunks(os.urandom(4 * CHUNK_BYTES)))
    # Its metadata claims a chunk more than the store holds.
    info = await files.info("build")
    info.size = int(info.size or 0) + CHUNK_BYTES
    await nc.jetstream().publish(files._meta_subject("build"), json.dumps(info.as_dict()).encode(),
                                 headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT})
    shared = SharedObjects(files, tmp_path / "spool", linger_s=3600)
    try:
        reads = [await shared.open("build"), await shared.open("build")]
        assert reads[0].spool is reads[1].spool
        tasks = [asyncio.create_task(read_all(r)) for r in reads]
        files.go.set()
        for task in tasks:
            with pytest.raises(TransportError, match="is corrupt"):
                await asyncio.wait_for(task, 10)
        assert shared.spools == 0 and spool_fds(tmp_path / "spool") == []
    finally:
        await shared.aclose()


async def test_a_replaced_object_is_not_served_from_the_old_spool(nc: NATS, bucket: str, tmp_path: Path) -> None:
    files = ObjectFiles(nc.jetstream(), bucket)
    old, new = os.urandom(2 * CHUNK_BYTES), os.urandom(2 * CHUNK_BYTES + 1)
    await files.write("build", _chunks(old))
    read_bytes: list[int] = []
    shared = SharedObjects(files, tmp_path / "spool", linger_s=3600, on_read=read_bytes.append)
    try:
        assert await read_all(await shared.open("build")) == old
        assert shared.spools == 1  # lingering
        await files.write("build", _chunks(new))  # the same name, another version
        assert await read_all(await shared.open("build")) == new
        assert sum(read_bytes) == len(old) + len(new)
        assert shared.spools == 1  # the old version's spool went as soon as it was stale
    finally:
        await shared.aclose()
    # And a spool nobody reads goes after its linger.
    quick = SharedObjects(files, tmp_path / "quick", linger_s=0.05)
    try:
        assert await read_all(await quick.open("build")) == new

        async def gone() -> bool:
            return quick.spools == 0 and not spool_fds(tmp_path / "quick")

        await wait_until(gone, what="the spool removed after its linger")
    finally:
        await quick.aclose()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), MiB):
        yield data[offset:offset + MiB]


# --- the test: 256 MiB to 20 agents and 2 ssh servers ---------------------------

BIG = 256 * MiB
AGENTS = 20
SSH_SERVERS = 2
# Peak resident memory allowed (VmHWM). A process that held the file whole would peak at
# its base plus 256 MiB. `fleetbus up` starts at ~75 MiB (Python, every transport) and
# adds at most JetStream's flow-control window of chunks (~32 MiB) and the targets'
# transfer buffers: 130 MiB measured. nats-server starts at ~25 MiB and holds the stream's
# recently used blocks and its outbound buffers: 130-150 MiB measured. An agent: ~30 MiB.
MEMORY_BOUND = 192 * MiB
AGENT_MEMORY_BOUND = 64 * MiB
# The requester's connection carries the file once plus NATS framing and the job's
# small requests; twice the file would be far past this.
SENT_BOUND = 1.1


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def in_namespace(own: Path, common: Path) -> list[str]:
    """A command prefix running the rest in a mount namespace of its own where ``common``
    is ``own``: every agent and sshd here is on this one machine, and a put job has one
    path, so this is how each target's file lands in a folder of its own."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(own), str(common)]


def metric(fleet: Fleet, name: str) -> float:
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def namespaces() -> None:
    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "true"], check=False,
                                           capture_output=True).returncode:
        pytest.skip("needs root and mount namespaces (unshare --mount) to give each target its own folder")


@pytest.fixture
def sshds(tmp_path: Path, namespaces: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[Sshd], Path]]:
    """Two real sshd, each in its own mount namespace (see ``in_namespace``)."""
    require_sshd()
    key = generate_key(tmp_path, "id_fanout")
    key_file = tmp_path / "id_fanout"
    os.chmod(key_file, 0o600)
    common = tmp_path / "common"
    common.mkdir(exist_ok=True)
    started: list[Sshd] = []
    try:
        for i in range(SSH_SERVERS):
            own = tmp_path / "targets" / f"ssh-{i}"
            own.mkdir(parents=True)
            wrapper = tmp_path / f"sshd-{i}.sh"
            wrapper.write_text("#!/bin/sh\nexec " + shlex.join([*in_namespace(own, common), "/usr/sbin/sshd"]) + ' "$@"\n')
            wrapper.chmod(0o755)
            server = Sshd(tmp_path / f"sshd-{i}")
            server.authorize(key.public)
            # Sshd.start runs support.sshd.SSHD: here the wrapper, which execs the real
            # sshd (by its absolute path, as sshd requires) in the namespace.
            monkeypatch.setattr(support.sshd, "SSHD", str(wrapper))
            started.append(server.start())
        yield started, key_file
    finally:
        for server in started:
            server.stop()


async def test_a_256_mib_put_to_20_agents_and_2_ssh_servers(fleet: Fleet, sshds: tuple[list[Sshd], Path],
                                                            tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    servers, key_file = sshds
    common = tmp_path / "common"
    client = await Client.connect(NatsSettings(url=fleet.nats_url, token=fleet.token), requester="putfan")
    agents: list[Agent] = []
    try:
        gateway = await asyncio.to_thread(gateway_of, fleet)
        names = [f"{tag}-agent-{i:02d}" for i in range(AGENTS)]
        for i, name in enumerate(names):
            key = (await client.add_server({"name": name, "transport": "agent-outbound",
                                            "labels": {"t": tag}}))["key"]
            own = tmp_path / "targets" / name
            own.mkdir(parents=True)
            agents.append(Agent(tmp_path / "agents" / name, gateway["address"], gateway["fingerprint"], key,
                                command=[*in_namespace(own, common), AGENT]).start())
        await client.add_credential(f"{tag}-key", "ssh-key", key_file.read_bytes(), user="root")
        for i, server in enumerate(servers):
            name = f"{tag}-ssh-{i}"
            (tmp_path / "targets" / name).symlink_to(tmp_path / "targets" / f"ssh-{i}")
            await client.add_server({"name": name, "transport": "ssh", "host": server.host, "port": server.port,
                                     "credential": f"{tag}-key", "labels": {"t": tag},
                                     "options": {"host_key": server.host_key_line}})
            names.append(name)

        async def all_online() -> bool:
            for name in names[:AGENTS]:
                if ((await client.get_server(name)).get("status") or {}).get("state") != "online":
                    return False
            return True

        await wait_until(all_online, timeout=60, what="every agent connected")
        source = tmp_path / "build.bin"
        block = os.urandom(MiB)
        with open(source, "wb") as fh:  # noqa: ASYNC230 - setup, a quick local write
            for i in range(BIG // MiB):
                fh.write(block[i:] + block[:i])  # every MiB different: a misplaced chunk shows
        digest = await asyncio.to_thread(file_sha256, source)
        read_before = await asyncio.to_thread(metric, fleet, "fleetbus_object_read_bytes_total")
        sent_before = client.nc.stats["out_bytes"]

        stored = await upload(client.files, source)
        try:
            remote = common / "build.bin"
            reply = await client.start_job({
                "selection": {"labels": {"t": tag}}, "op": "put", "max_concurrency": len(names),
                "timeout_s": 600, "deadline_s": 900,
                "put": {"path": str(remote), "mode": "0640", "object": stored.name,
                        "sha256": stored.sha256, "size": stored.size}})
            results = {}
            async with contextlib.aclosing(client.follow_job(reply["id"])) as records:
                async for kind, body in records:
                    if kind == "result":
                        results[body["server"]] = body
            sent = client.nc.stats["out_bytes"] - sent_before
        finally:
            await client.files.delete(stored.name)

        assert stored.sha256 == digest
        assert sorted(results) == sorted(names)
        failed = {name: r["error"] for name, r in results.items() if r["outcome"] != "ok"}
        assert not failed, failed
        assert {r["data"]["sha256"] for r in results.values()} == {digest}
        # Every target's own file, on disk, hashed here.
        for name in names:
            target = tmp_path / "targets" / name / "build.bin"
            assert await asyncio.to_thread(file_sha256, target) == digest, name
            assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert not (common / "build.bin").exists()  # nothing landed outside the namespaces
        # The requester sent the bytes once, the worker read them once.
        assert BIG <= sent <= SENT_BOUND * BIG, sent / BIG
        read = await asyncio.to_thread(metric, fleet, "fleetbus_object_read_bytes_total") - read_before
        assert read == BIG, read / BIG
        # Bounded memory in every process: none held the file.
        up = fleet.proc.pid  # type: ignore[union-attr]
        peaks = {"fleetbus up": peak_rss(up)}
        peaks.update({f"nats-server {pid}": peak_rss(pid) for pid in children_of(up)
                      if Path(f"/proc/{pid}/comm").read_text().strip() == "nats-server"})
        assert len(peaks) == 2
        agent_peaks = {a.workdir.name: peak_rss(a.proc.pid) for a in agents}  # type: ignore[union-attr]
        over = {what: f"{peak / MiB:.0f} MiB" for what, peak in peaks.items() if peak >= MEMORY_BOUND}
        over.update({what: f"{peak / MiB:.0f} MiB" for what, peak in agent_peaks.items()
                     if peak >= AGENT_MEMORY_BOUND})
        assert not over, over
        peaks.update(agent_peaks)
        print("peak RSS MiB:", {k: round(v / MiB) for k, v in peaks.items()}, "sent", sent / BIG)
    finally:
        for agent in agents:
            agent.stop()
        await client.close()
