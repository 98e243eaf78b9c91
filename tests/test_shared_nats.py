"""Users on a shared NATS (issue 21, part 3): a nats-server fleetbus did not start,
configured the way docs/operations.md says: its config includes the block
`fleetbus nats accounts --fleetbus-nkey-out` printed, fleetbus's core and worker connect
in FLEETBUS with that nkey (through a NATS context), and `fleetbus core
--nats-users-file --nats-pid-file` keeps the USERS account's users file and makes the
server re-read it. A user made with `fleetbus users add` then runs a command on a
server its grant selects, and `users remove` disconnects it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from fleetbus.subjects import Names
from support.processes import FLEETBUS, NATS_SERVER, Daemon, own_user, stop_process, wait_for
from test_users import UserClient

NAMES = Names("fleetbus")
CONTEXT = "fleetbus-shared"


@dataclass
class SharedNats:
    """The operator's nats-server, its files, and the environment of fleetbus processes."""

    workdir: Path
    accounts: dict[str, Any]  # what `fleetbus nats accounts --json` printed
    seed_file: Path
    config: Path
    users_file: Path
    pid_file: Path
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLEETBUS, *args], capture_output=True, text=True, timeout=120,
                              env=env or self.env, check=False)

    def daemon(self, name: str, args: list[str], ready: str, env: dict[str, str] | None = None) -> Daemon:
        return Daemon(args, env or self.env, self.workdir / f"{name}.log", ready).start()


def fleetbus_env(home: Path, xdg: Path, prefix: str = "fleetbus") -> dict[str, str]:
    """A fleetbus process connecting through the NATS context (the nkey), no URL or token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env.update(FLEETBUS_NATS_CONTEXT=CONTEXT, XDG_CONFIG_HOME=str(xdg), FLEETBUS_PREFIX=prefix,
               FLEETBUS_HOME=str(home),
               FLEETBUS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode())
    return env


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedNats]:
    work = tmp_path_factory.mktemp("shared-nats")
    seed_file = work / "fleetbus.nk"
    printed = subprocess.run([FLEETBUS, "nats", "accounts", "--fleetbus-nkey-out", str(seed_file), "--json"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert printed.returncode == 0, printed.stderr
    accounts = json.loads(printed.stdout)
    # What an operator does with it (docs/operations.md, "Users on a shared NATS").
    (work / "fleetbus-accounts.conf").write_text(accounts["config"])
    users_file = work / accounts["users_file"]
    users_file.write_text("users: []\n")
    pid_file = work / "nats.pid"
    config = work / "nats-server.conf"
    config.write_text("\n".join([
        'host: "127.0.0.1"',
        "port: -1",
        f"ports_file_dir: {json.dumps(str(work))}",
        f"pid_file: {json.dumps(str(pid_file))}",
        f"jetstream {{ store_dir: {json.dumps(str(work / 'js'))} }}",
        'include "fleetbus-accounts.conf"',
        "",
    ]))
    with open(work / "nats.log", "ab") as log:
        proc = subprocess.Popen([NATS_SERVER, "-c", str(config)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    ports = work / f"nats-server_{proc.pid}.ports"

    def listening() -> str | None:
        if proc.poll() is not None:
            raise RuntimeError((work / "nats.log").read_text()[-2000:])
        try:
            return json.loads(ports.read_text())["nats"][0] if ports.exists() else None
        except (ValueError, KeyError):
            return None

    try:
        url = wait_for(listening, what="the shared nats-server to listen")
        context_dir = work / "xdg" / "nats" / "context"
        context_dir.mkdir(parents=True)
        (context_dir / f"{CONTEXT}.json").write_text(json.dumps({"url": url, "nkey": str(seed_file)}))
        yield SharedNats(work, accounts, seed_file, config, users_file, pid_file, url,
                         fleetbus_env(work / "home", work / "xdg"), proc)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def fleet_on_shared(shared: SharedNats) -> Iterator[SharedNats]:
    """A core keeping the shared server's users and a worker serving `local`, both FLEETBUS by nkey."""
    core = shared.daemon("core", ["core", "-v", "--check-interval", "0",
                                  "--nats-users-file", str(shared.users_file),
                                  "--nats-pid-file", str(shared.pid_file),
                                  "--nats-config", str(shared.config)], "fleetbus core")
    worker = shared.daemon("worker", ["worker", "--transports", "local", "--local-user", own_user()],
                           "serving local")
    try:
        yield shared
    finally:
        worker.stop()
        core.stop()


def test_printed_accounts_parse_and_hold_no_secret(shared: SharedNats) -> None:
    checked = subprocess.run([NATS_SERVER, "-t", "-c", str(shared.config)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    seed = shared.seed_file.read_text().strip()
    assert seed.startswith("SU") and (shared.seed_file.stat().st_mode & 0o777) == 0o600
    public = shared.accounts["fleetbus_nkey"]["public_key"]
    printed = json.dumps(shared.accounts)
    assert public in shared.accounts["config"]
    assert seed not in printed and "password" not in printed.lower() and '"SU' not in printed
    # A second run never overwrites the seed file.
    again = subprocess.run([FLEETBUS, "nats", "accounts", "--fleetbus-nkey-out", str(shared.seed_file)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode != 0 and "exists" in again.stderr and again.stdout == ""
    assert shared.seed_file.read_text().strip() == seed


async def test_a_user_on_a_shared_nats_runs_where_granted_and_is_removed(
        fleet_on_shared: SharedNats, tmp_path: Path) -> None:
    shared = fleet_on_shared
    added = shared.cli("servers", "add", "web1", "--transport", "local", "--role", "web")
    assert added.returncode == 0, added.stderr
    seed = tmp_path / "deployer.nk"
    made = shared.cli("users", "add", "deployer", "--allow", "exec:role=web", "--out", str(seed), "--json")
    assert made.returncode == 0, made.stderr
    reply = json.loads(made.stdout)
    assert reply["applied"] is True, reply
    assert reply["user"]["public_key"] in shared.users_file.read_text()

    user = await UserClient().connect(shared.url, seed, "deployer")
    try:
        assert user.nc is not None
        grant = reply["user"]["grants"][0]["id"]
        body = json.dumps({"id": f"shared-{uuid.uuid4().hex[:12]}", "argv": ["echo", "on shared nats"],
                           "timeout_s": 30}).encode()
        deadline = time.monotonic() + 15
        while True:  # the worker subscribes the grant's subject once the users bucket reaches it
            try:
                answer = json.loads((await user.nc.request(NAMES.grant(grant, "web1", "exec"), body,
                                                           timeout=10)).data)
                break
            except nats.errors.NoRespondersError:
                assert time.monotonic() < deadline, "web1 never reachable through the deployer's grant"
                await asyncio.sleep(0.05)
        assert answer["ok"] is True and answer["exit_code"] == 0, answer
        assert "on shared nats" in answer["stdout"], answer
        # NATS itself refuses what the grant does not give.
        assert await user.refused(NAMES.server("web1", "get"))

        removed = shared.cli("users", "remove", "deployer", "--json")
        assert removed.returncode == 0, removed.stderr
        assert json.loads(removed.stdout)["applied"] is True
        deadline = time.monotonic() + 15
        while not user.closed:
            assert time.monotonic() < deadline, "the removed user is still connected"
            await asyncio.sleep(0.02)
    finally:
        await user.close()
    assert "deployer" not in shared.users_file.read_text()
    assert not shared.users_file.with_name(shared.users_file.name + ".previous").exists()


def test_a_users_file_that_cannot_be_written_leaves_the_core_serving(shared: SharedNats) -> None:
    # A core of its own prefix, so that only it answers these admin requests.
    env = fleetbus_env(shared.workdir / "home-bad", shared.workdir / "xdg", prefix="badfile")
    target = shared.workdir / "no-such-folder" / "users.conf"
    core = shared.daemon("core-bad", ["core", "--check-interval", "0", "--nats-users-file", str(target),
                                      "--nats-pid-file", str(shared.pid_file)], "fleetbus core", env)
    try:
        made = shared.cli("users", "add", "nobody-here", "--allow", "ping:all",
                          "--out", str(shared.workdir / "nobody.nk"), "--json", env=env)
        assert made.returncode == 0, made.stderr
        reply = json.loads(made.stdout)
        assert reply["applied"] is False and reply["warnings"], reply
        listed = shared.cli("users", "list", "--json", env=env)
        assert listed.returncode == 0 and [u["name"] for u in json.loads(listed.stdout)] == ["nobody-here"]
        log = (shared.workdir / "core-bad.log").read_text()
        assert f"could not update NATS users: cannot write the NATS users file {target}" in log, log[-2000:]
        assert not target.parent.exists()
    finally:
        core.stop()


async def test_a_failed_reload_puts_the_previous_users_file_back(tmp_path: Path) -> None:
    from fleetbus.errors import InvalidRequest
    from fleetbus.natsaccounts import SharedUsers

    users = tmp_path / "users.conf"
    users.write_text("users: []\n")
    users_file = SharedUsers(users, tmp_path / "missing.pid").open(NATS_SERVER)
    with pytest.raises(InvalidRequest, match="pid file"):
        await users_file.apply('users: [ {nkey: "UX"} ]\n')
    assert users.read_text() == "users: []\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.conf"]
