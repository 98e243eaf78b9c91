"""Separate `fleetbus core` and `fleetbus worker` processes sharing one NATS."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import FLEETBUS, Daemon, Fleet, NatsServer, own_user, pid_alive, wait_for


@pytest.fixture
def shared(nats_server: NatsServer, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env.update(
        FLEETBUS_NATS_URL=nats_server.url,
        FLEETBUS_PREFIX="s" + secrets.token_hex(4),
        FLEETBUS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        FLEETBUS_HOME=str(tmp_path / "home"),
    )
    yield env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETBUS, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_core_and_two_workers_share_the_load_and_survive_a_worker_loss(
    shared: dict[str, str], tmp_path: Path
) -> None:
    core = Daemon(["core"], shared, tmp_path / "core.log", "fleetbus core").start()
    workers = [Daemon(["worker", "--transports", "local", "--local-user", own_user()], shared,
                      tmp_path / f"w{i}.log", "serving local").start() for i in range(2)]
    try:
        assert cli(shared, "servers", "add", "shared1", "--transport", "local").returncode == 0
        wait_for(lambda: cli(shared, "ping", "shared1").returncode == 0, what="shared1 served")
        audit = subprocess.run(
            [str(Path(FLEETBUS).parent / "python"), "-c", AUDIT_WORKERS, shared["FLEETBUS_NATS_URL"],
             shared["FLEETBUS_PREFIX"]], capture_output=True, text=True, timeout=60, check=False)
        assert audit.returncode == 0, audit.stderr
        served_by = set(json.loads(audit.stdout))
        assert len(served_by) == 2, "both workers in the queue group took commands"

        workers[0].stop()
        for _ in range(5):
            assert cli(shared, "run", "shared1", "--", "true").returncode == 0
        workers[1].stop()
        gone = cli(shared, "ping", "shared1")
        assert gone.returncode != 0 and "nobody serves shared1" in gone.stderr
    finally:
        for w in workers:
            w.stop()
        core.stop()


AUDIT_WORKERS = """
import asyncio, json, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    for _ in range(40):
        reply = json.loads((await nc.request(sys.argv[2] + ".v1.servers.shared1.exec",
                                             b'{"argv": ["true"]}', timeout=10)).data)
        assert reply["ok"] and reply["exit_code"] == 0, reply
    js = nc.jetstream()
    sub = await js.subscribe(sys.argv[2] + ".v1.audit.shared1.exec", ordered_consumer=True)
    workers = set()
    while True:
        try:
            msg = await sub.next_msg(timeout=2)
        except Exception:
            break
        workers.add(json.loads(msg.data)["worker"])
    print(json.dumps(sorted(workers)))
    await nc.close()
asyncio.run(main())
"""


def test_up_with_an_existing_nats(nats_server: NatsServer, tmp_path: Path) -> None:
    prefix = "u" + secrets.token_hex(4)
    stack = Fleet(tmp_path / "home", extra_args=[],
                  env={"FLEETBUS_NATS_URL": nats_server.url, "FLEETBUS_PREFIX": prefix})
    stack.start()
    try:
        assert json.loads((stack.home / "run.json").read_text())["embedded"] is False
        assert not (stack.home / "nats.conf").exists()  # no embedded NATS was started
        proc = stack.cli("run", "local", "--", "echo", "via-shared-nats")
        assert proc.returncode == 0 and proc.stdout == "via-shared-nats\n"
    finally:
        stack.stop()


STOP_MID_COMMAND = """
import asyncio, json, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    body = json.dumps({"shell": "echo $$ > " + sys.argv[3] + "; exec sleep 300"}).encode()
    reply = await nc.request(sys.argv[2] + ".v1.servers.shared1.exec", body, timeout=60)
    print(reply.data.decode())
    await nc.close()
asyncio.run(main())
"""


def test_a_worker_stopping_mid_command_stops_it_and_tells_the_requester(
    shared: dict[str, str], tmp_path: Path
) -> None:
    core = Daemon(["core"], shared, tmp_path / "core.log", "fleetbus core").start()
    worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], shared,
                    tmp_path / "w.log", "serving local").start()
    requester = None
    try:
        assert cli(shared, "servers", "add", "shared1", "--transport", "local").returncode == 0
        wait_for(lambda: cli(shared, "ping", "shared1").returncode == 0, what="shared1 served")
        pidfile = tmp_path / "pid"
        requester = subprocess.Popen(
            [str(Path(FLEETBUS).parent / "python"), "-c", STOP_MID_COMMAND, shared["FLEETBUS_NATS_URL"],
             shared["FLEETBUS_PREFIX"], str(pidfile)], stdout=subprocess.PIPE, text=True)
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="command started"))
        worker.stop()
        out, _ = requester.communicate(timeout=60)
        reply = json.loads(out)
        assert reply["ok"] is False and reply["error"]["code"] == "cancelled"
        assert "shutting down" in reply["error"]["message"]
        assert not pid_alive(pid)  # the command's process went with the worker
    finally:
        if requester is not None and requester.poll() is None:
            requester.kill()
        worker.stop()
        core.stop()
