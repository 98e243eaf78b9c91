"""At-most-once through a worker's death and a hung worker, with real processes: one
nats-server, `fleetbus core` and `fleetbus worker` daemons, SIGKILL and SIGSTOP.

- A worker killed mid-command: the caller waiting on it and a retry with the same id
  both get `lost` within seconds, and nothing of the command's process group remains.
- The same command written with equal values is the same command (canonical fingerprint).
- A worker stopped while a request waits for it drops that request once it resumes,
  since its requester's deadline has passed: the command never runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from fleetbus.client import Client
from fleetbus.errors import Lost
from fleetbus.host import DEADLINE_SKEW_S
from fleetbus.subjects import HDR_DEADLINE, Names
from nats.aio.client import Client as NATS
from support.processes import Daemon, NatsServer, group_members, own_user, shared_env, until


@dataclass
class Deployment:
    env: dict[str, str]
    tmp: Path
    core: Daemon | None = None
    workers: list[Daemon] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.env["FLEETBUS_PREFIX"]

    def add_worker(self) -> Daemon:
        n = len(self.workers) + 1
        worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], self.env,
                        self.tmp / f"worker{n}.log", "serving local").start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                os.kill(worker.proc.pid, signal.SIGCONT)  # a stopped one cannot stop
            worker.stop()
        if self.core is not None:
            self.core.stop()


@pytest.fixture
def deployment(nats_server: NatsServer, tmp_path: Path) -> Iterator[Deployment]:
    env = shared_env(nats_server.url, "w" + secrets.token_hex(4), tmp_path / "home")
    dep = Deployment(env, tmp_path)
    dep.core = Daemon(["core"], env, tmp_path / "core.log", "fleetbus core").start()
    try:
        yield dep
    finally:
        dep.stop()


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def add_server(nc: NATS, prefix: str, name: str) -> None:
    reply = json.loads((await nc.request(f"{prefix}.v1.admin.servers.add", json.dumps(
        {"server": {"name": name, "transport": "local"}}).encode(), timeout=10)).data)
    assert reply["ok"], reply
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = json.loads((await nc.request(f"{prefix}.v1.admin.servers.get",
                                           json.dumps({"name": name}).encode(), timeout=10)).data)
        if (got.get("status") or {}).get("state") == "online":
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{name} was never served")


def ppid_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def read_pid(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else None


async def test_a_worker_killed_mid_command_answers_lost_and_leaves_no_process(
        deployment: Deployment, conn: NATS, tmp_path: Path) -> None:
    deployment.add_worker()
    deployment.add_worker()  # the survivor that answers the retry
    await add_server(conn, deployment.prefix, "c1")
    fb = Client(conn, Names(deployment.prefix))
    pid_file, done = tmp_path / "pid", tmp_path / "done"
    # The shell records its pid, starts a child and would mark the run done after it.
    argv = ["sh", "-c", f"echo $$ > {pid_file}; sleep 60; touch {done}"]
    command_id = f"crash-{uuid.uuid4().hex[:12]}"
    original = asyncio.ensure_future(fb.exec("c1", argv, timeout_s=120, command_id=command_id))
    try:
        shell = await until(lambda: read_pid(pid_file), timeout=30, what="the command to start")
        await until(lambda: len(group_members(shell)) >= 2, what="the shell's child")
        worker_pid = ppid_of(shell)
        victim = next(w for w in deployment.workers if w.proc is not None and w.proc.pid == worker_pid)

        killed = time.monotonic()
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait()
        # No process of the command outlives its worker.
        await until(lambda: not group_members(shell), timeout=10, what="the command's group to be killed")
        orphan_gone = time.monotonic() - killed

        with pytest.raises(Lost, match="whether the process ran is unknown"):
            await asyncio.wait_for(original, 60)
        caller_told = time.monotonic() - killed

        retry_started = time.monotonic()
        with pytest.raises(Lost):
            await asyncio.wait_for(fb.exec("c1", argv, timeout_s=120, command_id=command_id), 60)
        retry_told = time.monotonic() - retry_started
        print(f"\nafter SIGKILL of the worker: command group gone in {orphan_gone:.2f} s, original caller "
              f"got `lost` in {caller_told:.2f} s, a retry with the same id in {retry_told:.2f} s")
        assert not done.exists()
    finally:
        original.cancel()
        await asyncio.gather(original, return_exceptions=True)


async def test_the_same_command_written_with_equal_values_is_the_same_command(
        deployment: Deployment, conn: NATS, tmp_path: Path) -> None:
    deployment.add_worker()
    await add_server(conn, deployment.prefix, "c2")
    marker = tmp_path / "runs"
    command_id = f"same-{uuid.uuid4().hex[:12]}"
    subject = f"{deployment.prefix}.v1.servers.c2.exec"
    shell = f"echo ran >> {marker}; echo $$"
    first = json.loads((await conn.request(subject, json.dumps(
        {"id": command_id, "shell": shell, "timeout_s": 10}).encode(), timeout=30)).data)
    # Key order, 10.0 for 10, and a default written out make no other command.
    again = json.loads((await conn.request(subject, json.dumps(
        {"timeout_s": 10.0, "env": {}, "shell": shell, "id": command_id}).encode(), timeout=30)).data)
    assert first["ok"] and again == first
    assert marker.read_text() == "ran\n"
    other = json.loads((await conn.request(subject, json.dumps(
        {"id": command_id, "shell": shell, "timeout_s": 11}).encode(), timeout=30)).data)
    assert other["error"]["code"] == "invalid_request" and "different" in other["error"]["message"]


async def test_a_stopped_worker_drops_a_request_whose_requester_gave_up(
        deployment: Deployment, conn: NATS, tmp_path: Path) -> None:
    worker = deployment.add_worker()
    await add_server(conn, deployment.prefix, "c3")
    assert worker.proc is not None
    ran = tmp_path / "ran"
    command_id = f"late-{uuid.uuid4().hex[:12]}"
    subject = f"{deployment.prefix}.v1.servers.c3.exec"
    late_answers: asyncio.Queue[Any] = asyncio.Queue()
    inbox = conn.new_inbox()
    sub = await conn.subscribe(inbox, cb=late_answers.put)

    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        # Sent while the worker is stopped, by a requester that waits 1 s and gives up.
        deadline = time.time() + 1.0
        await conn.publish(subject, json.dumps({"id": command_id, "argv": ["touch", str(ran)]}).encode(),
                           reply=inbox, headers={HDR_DEADLINE: f"{deadline:.3f}"})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(late_answers.get(), 1.0)
        # Until its deadline and the allowance for clock skew have passed.
        await until(lambda: time.time() > deadline + DEADLINE_SKEW_S + 0.2, timeout=10, what="the deadline")
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)

    late = await asyncio.wait_for(late_answers.get(), 30)
    answer = json.loads(late.data)
    assert answer["ok"] is False and answer["error"]["code"] == "timeout", answer
    assert "not run" in answer["error"]["message"]
    await sub.unsubscribe()
    # Nothing was claimed either: the same id with a fresh deadline runs it now.
    fresh = json.loads((await conn.request(subject, json.dumps(
        {"id": command_id, "argv": ["touch", str(ran)]}).encode(), timeout=30,
        headers={HDR_DEADLINE: f"{time.time() + 30:.3f}"})).data)
    assert fresh["ok"], fresh
    assert ran.exists()


async def test_a_late_request_without_a_deadline_still_runs(
        deployment: Deployment, conn: NATS, tmp_path: Path) -> None:
    """The deadline is the requester's to give: without the header nothing is dropped,
    so the drop above is the header's doing."""
    worker = deployment.add_worker()
    await add_server(conn, deployment.prefix, "c4")
    assert worker.proc is not None
    ran = tmp_path / "ran"
    inbox = conn.new_inbox()
    answers: asyncio.Queue[Any] = asyncio.Queue()
    sub = await conn.subscribe(inbox, cb=answers.put)
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        await conn.publish(f"{deployment.prefix}.v1.servers.c4.exec",
                           json.dumps({"argv": ["touch", str(ran)]}).encode(), reply=inbox)
        await conn.flush()
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    answer = json.loads((await asyncio.wait_for(answers.get(), 30)).data)
    await sub.unsubscribe()
    assert answer["ok"] and ran.exists()


async def test_a_request_no_worker_claimed_is_sent_again_with_its_id(nats_server: NatsServer) -> None:
    """A request lost on its way (with the NATS node its worker was on, which the
    client's own connection never saw go) is sent again once no worker has claimed it
    for a while, with the same id, instead of waiting out its whole time limit. Here a
    stand-in worker drops the first copy; the client must send the second itself."""
    from fleetbus import client as client_module
    from fleetbus.jetstream import open_state

    names = Names("u" + secrets.token_hex(4))
    conn = await nats.connect(nats_server.url)
    try:
        await open_state(conn, names)
        copies: list[dict[str, Any]] = []

        async def worker(msg: Any) -> None:
            copies.append(json.loads(msg.data))
            if len(copies) > 1:  # the first copy is "lost": nobody claims or answers it
                await msg.respond(json.dumps({"ok": True, "id": copies[-1]["id"], "exit_code": 0, "signal": None,
                                              "stdout": "", "stderr": ""}).encode())

        await conn.subscribe(names.server("s1", "exec"), cb=worker)
        fb = Client(conn, names)
        result = await asyncio.wait_for(fb.exec("s1", ["true"], timeout_s=60, command_id="resent-1"),
                                        client_module.UNCLAIMED_RESEND_S + 30)
        assert result.exit_code == 0
        # Sent again after the unclaimed wait: waiting out the 60 s limit misses the deadline above.
        assert [c["id"] for c in copies] == ["resent-1", "resent-1"]
    finally:
        await conn.close()
