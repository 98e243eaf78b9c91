"""The CLI and the Python client as a user (issue 21): a user made with `fleetbus users
add NAME --out NAME.nk` runs commands with `FLEETBUS_NATS_NKEY=NAME.nk fleetbus ...` (or
`--nats-nkey`, a context's nkey, a creds file) within its grants, is audited as itself,
and gets `forbidden` on one line outside them.

Against a real `fleetbus up` (embedded NATS with its FLEETBUS and USERS accounts, a real
worker with the `local` transport): the user's client finds its grant subjects through
nats-server's `$SYS.REQ.USER.INFO` and takes its inboxes under `_I.<its public key>.`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import pytest
from fleetbus.client import Client
from fleetbus.connection import ENV_NKEY, NatsSettings
from fleetbus.errors import Cancelled, Forbidden, InvalidRequest, ServerOffline
from fleetbus.home import Home
from fleetbus.subjects import HDR_REQUEST_INFO, HDR_REQUESTER, Names
from fleetbus.userroutes import ask_user_info
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.auditread import audit_records
from support.processes import Fleet
from test_users import add_user

NAMES = Names("fleetbus")


@dataclass(frozen=True)
class Granted:
    """A user with ``exec,info:role=web``; web8 is in role web, db8 is not."""

    seed: Path
    public_key: str
    name: str
    grant: str


def _public_key(seed: Path) -> str:
    return nkeys.from_seed(bytearray(seed.read_bytes().strip())).public_key.decode()


@pytest.fixture(scope="module")
def granted(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Granted:
    for name, role in (("web8", "web"), ("db8", "db")):
        added = fleet.cli("servers", "add", name, "--transport", "local", "--role", role)
        assert added.returncode == 0, added.stderr
    seed, made = add_user(fleet, tmp_path_factory.mktemp("user"), "cliuser", "--allow", "exec,info:role=web")
    return Granted(seed, made["user"]["public_key"], "cliuser", made["user"]["grants"][0]["id"])


@pytest.fixture
async def as_user(fleet: Fleet, granted: Granted) -> AsyncIterator[Client]:
    """The Python client as the user, once a worker serves web8 through its grant (the
    worker subscribes the grant's subject when the users bucket reaches it)."""
    settings = NatsSettings(url=fleet.nats_url, nkey_file=str(granted.seed))
    client = await Client.connect(settings, requester="someone-else@forged")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                await client.info("web8", timeout_s=10)
                break
            except (Forbidden, ServerOffline):  # nobody serves web8 on the grant yet
                assert time.monotonic() < deadline, "web8 never reachable through the user's grant"
                await asyncio.sleep(0.05)
        yield client
    finally:
        await client.close()


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


async def test_the_python_client_as_a_user_runs_within_its_grant_and_is_audited_as_itself(
        fleet_nc: NATS, granted: Granted, as_user: Client) -> None:
    # Its inboxes are its public key's, the only ones NATS lets it read.
    assert as_user.nc.new_inbox().startswith(f"_I.{granted.public_key}.")
    seen: list[bytes] = []
    command_id = f"py-{uuid.uuid4().hex[:12]}"
    outcome = await as_user.exec("web8", ["echo", "from the python client"], command_id=command_id,
                                 on_output=lambda _stream, data: seen.append(data))
    assert outcome.exit_code == 0 and outcome.stdout == "from the python client\n"
    assert b"".join(seen) == b"from the python client\n"  # live output on its own inbox
    # Outside the grant: db8 is not in role web; get is not granted anywhere.
    with pytest.raises(Forbidden, match="db8"):
        await as_user.exec("db8", ["true"])
    with pytest.raises(Forbidden, match="ping"):
        await as_user.ping("web8")
    records = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, {command_id})
    (record,) = records[command_id]
    assert record["identity"] == {"account": "USERS", "user": granted.public_key, "name": granted.name}
    assert record["requester"] == "someone-else@forged"  # what it declared, recorded as declared only


async def test_nobody_answering_a_user_says_outside_its_grants_or_offline(
        fleet: Fleet, as_user: Client) -> None:
    # NATS answers "no responders" alike for a server outside the user's grants and for
    # one inside them that nobody serves; the core's users.reach tells them apart, and
    # names no server the user could not reach anyway.
    added = fleet.cli("servers", "add", "web9", "--transport", "agent-outbound", "--role", "web")
    assert added.returncode == 0, added.stderr  # no agent will connect: nobody serves it
    try:
        with pytest.raises(ServerOffline) as offline:
            await as_user.exec("web9", ["true"])
    finally:  # the other tests' jobs over role web must not meet it
        assert fleet.cli("servers", "remove", "web9").returncode == 0
    assert not isinstance(offline.value, Forbidden)
    assert "nobody serves web9" in str(offline.value) and "never seen" in str(offline.value)
    with pytest.raises(Forbidden, match="db8 is outside your grants for exec"):
        await as_user.exec("db8", ["true"])
    with pytest.raises(Forbidden, match="nosuch9 is outside your grants for exec"):
        await as_user.exec("nosuch9", ["true"])  # the same words: no hint that it is not registered
    # Asked directly: only about itself, nothing about a server outside its grants.
    reach = await as_user.admin("users.reach", {"server": "db8", "op": "exec"})
    assert reach == {"ok": True, "server": "db8", "op": "exec", "reach": "outside"}
    reach = await as_user.admin("users.reach", {"server": "web8", "op": "exec"})
    assert reach["reach"] == "granted" and reach["status"]["state"] == "online"
    with pytest.raises(InvalidRequest):
        await as_user.admin("users.reach", {"server": "web8", "op": "format-disk"})


async def test_a_user_cancels_its_own_command_through_its_grant(as_user: Client) -> None:
    started = asyncio.Event()
    command_id = f"stop-{uuid.uuid4().hex[:12]}"
    running = asyncio.create_task(as_user.exec(
        "web8", shell="echo started; sleep 60", command_id=command_id, timeout_s=120,
        on_output=lambda _stream, data: started.set()))
    try:
        await asyncio.wait_for(started.wait(), 30)
        assert await as_user.cancel("web8", command_id) is True
        with pytest.raises(Cancelled):
            await asyncio.wait_for(running, 30)
    finally:
        running.cancel()


async def test_the_cli_as_a_user(fleet: Fleet, fleet_nc: NATS, granted: Granted, as_user: Client) -> None:
    env = {ENV_NKEY: str(granted.seed)}
    command_id = f"cli-{uuid.uuid4().hex[:12]}"
    done = fleet.cli("run", "--id", command_id, "web8", "--", "echo", "from the cli", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the cli\n"
    # The global option does the same.
    done = fleet.cli("--nats-nkey", str(granted.seed), "info", "web8", "--json")
    assert done.returncode == 0, done.stderr
    # Outside its grant: one line naming forbidden, no traceback, a non-zero exit.
    done = fleet.cli("run", "db8", "--", "true", env=env)
    assert done.returncode != 0
    line = _one_line(done.stderr)
    assert "forbidden" in line and "db8" in line, line
    done = fleet.cli("servers", "list", env=env)  # no admin endpoint granted
    assert done.returncode != 0
    line = _one_line(done.stderr)
    assert "forbidden" in line and "servers.list" in line, line
    # Audited as the user, not the owner: the token file in the same home was not sent.
    records = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, {command_id})
    (record,) = records[command_id]
    assert record["identity"] == {"account": "USERS", "user": granted.public_key, "name": granted.name}
    assert record["outcome"] == "ok" and record["server"] == "web8"


async def test_a_users_cli_job_and_audit_query(fleet: Fleet, granted: Granted, as_user: Client,
                                                tmp_path: Path) -> None:
    env = {ENV_NKEY: str(granted.seed)}
    # A job over the role its grant covers: the job service checks it, the CLI polls it.
    done = fleet.cli("run", "--role", "web", "--json", "--", "echo", "job as user", env=env)
    assert done.returncode == 0, done.stderr
    assert "job as user" in done.stdout
    # The owner's list names who started it as NATS verified it, beside what it declared.
    listed = fleet.cli("jobs", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "echo job as user" in line)
    assert "cliuser (declared: " in row, listed.stdout
    # An auditor reads the trail with the same CLI, as itself.
    seed, _ = add_user(fleet, tmp_path, "auditor8", "--admin", "audit.query")
    done = fleet.cli("audit", "--server", "web8", "--op", "exec", "--json", env={ENV_NKEY: str(seed)})
    assert done.returncode == 0, done.stderr
    names = {(r.get("identity") or {}).get("name") for r in json.loads(done.stdout)["records"]}
    assert granted.name in names, names


async def test_a_raw_client_forging_its_requester_is_audited_as_itself(
        fleet: Fleet, fleet_nc: NATS, granted: Granted, as_user: Client) -> None:
    nc = await nats.connect(fleet.nats_url, nkeys_seed=str(granted.seed),
                            inbox_prefix=f"_I.{granted.public_key}")
    try:
        command_id = f"raw-{uuid.uuid4().hex[:12]}"
        forged = {HDR_REQUESTER: "root@elsewhere",
                  HDR_REQUEST_INFO: json.dumps({"acc": "FLEETBUS", "user": "owner"})}
        msg = await nc.request(NAMES.grant(granted.grant, "web8", "exec"),
                               json.dumps({"id": command_id, "argv": ["true"]}).encode(),
                               timeout=30, headers=forged)
        assert json.loads(msg.data)["ok"] is True
    finally:
        await nc.close()
    records = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, {command_id})
    (record,) = records[command_id]
    assert record["identity"] == {"account": "USERS", "user": granted.public_key, "name": granted.name}
    assert record["requester"] == "root@elsewhere"


async def test_output_under_another_users_public_key_is_refused(
        fleet: Fleet, granted: Granted, as_user: Client, tmp_path: Path) -> None:
    other_seed, _ = add_user(fleet, tmp_path, "otheruser", "--allow", "info:role=web")
    other_key = _public_key(other_seed)
    other = await nats.connect(fleet.nats_url, nkeys_seed=str(other_seed), inbox_prefix=f"_I.{other_key}")
    try:
        stolen: list[Msg] = []

        async def keep(msg: Msg) -> None:
            stolen.append(msg)

        await other.subscribe(f"_I.{other_key}.>", cb=keep)
        await other.flush()
        subject = NAMES.grant(granted.grant, "web8", "exec")
        body = {"argv": ["echo", "secret"], "output_subject": f"_I.{other_key}.stolen"}
        with pytest.raises(Forbidden, match="not one of your inboxes"):
            await as_user._request(subject, body, 30, server="web8")
        # A later command with output on its own inbox ends: the refused one published nothing.
        seen: list[bytes] = []
        outcome = await as_user.exec("web8", ["echo", "mine"], on_output=lambda _s, d: seen.append(d))
        assert outcome.stdout == "mine\n" and b"".join(seen) == b"mine\n"
        await other.flush()
        assert stolen == []
    finally:
        await other.close()


async def test_nats_says_who_is_a_user_and_where_its_grants_lead(
        fleet: Fleet, fleet_nc: NATS, granted: Granted) -> None:
    # The owner may subscribe anywhere: not a user, so the client keeps _INBOX for it
    # (an owner or fleetbus process with an nkey on a shared NATS is answered there).
    owner = await ask_user_info(fleet_nc, NAMES, (f"_I.{granted.public_key}.", "_INBOX."))
    assert owner is not None and not owner.is_user
    nc = await nats.connect(fleet.nats_url, nkeys_seed=str(granted.seed))  # default _INBOX prefix
    try:
        routes = await ask_user_info(nc, NAMES, (f"_I.{granted.public_key}.", "_INBOX."))
        # Asked first where it may not subscribe: NATS's refusal moves it on to its own inbox
        # (waiting for an answer that cannot come would end in None).
        refused_first = await ask_user_info(nc, NAMES, ("_INBOX.", f"_I.{granted.public_key}."))
        assert refused_first is not None and set(refused_first.publish) == set(routes.publish)
    finally:
        await nc.close()
    assert routes is not None and routes.is_user and routes.account == "USERS"
    assert routes.subjects("web8", "exec") == [NAMES.grant(granted.grant, "web8", "exec")]
    assert routes.subjects("web8", "cancel") == [NAMES.grant(granted.grant, "web8", "cancel")]
    assert routes.subjects("web8", "get") == []


def test_users_add_says_how_to_use_the_seed_file(fleet: Fleet, tmp_path: Path) -> None:
    seed = tmp_path / "hint.nk"
    done = fleet.cli("users", "add", "hintuser", "--allow", "ping:db8", "--out", str(seed))
    assert done.returncode == 0, done.stderr
    assert f"use it with: FLEETBUS_NATS_NKEY={seed} fleetbus ..." in done.stdout
    secret = seed.read_text().strip()
    assert secret not in done.stdout and secret not in done.stderr
    done = fleet.cli("users", "add", "hintjson", "--allow", "ping:db8", "--out", str(tmp_path / "j.nk"), "--json")
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)  # --json: stdout is the record alone, the hint on stderr
    assert "use it with: FLEETBUS_NATS_NKEY=" in done.stderr


# Settings: where the nkey comes from, and what is read from it --------------------------

def _seed_file(path: Path) -> tuple[Path, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


def test_the_nkey_comes_from_the_flag_the_environment_or_a_context(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home(tmp_path / "home")
    home.nats_token.parent.mkdir(parents=True)
    home.nats_token.write_text("fbn_" + "0" * 64)
    (home.run_file).write_text(json.dumps({"nats_url": "nats://127.0.0.1:4222", "prefix": "fleetbus"}))
    for name in ("FLEETBUS_NATS_URL", "FLEETBUS_NATS_TOKEN", "FLEETBUS_NATS_CREDS", ENV_NKEY,
                 "FLEETBUS_NATS_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    flag, flag_key = _seed_file(tmp_path / "flag.nk")
    env, env_key = _seed_file(tmp_path / "env.nk")
    ctx, ctx_key = _seed_file(tmp_path / "ctx.nk")
    # No nkey: the owner, with the home's token.
    assert NatsSettings.resolve(home=home).token is not None
    monkeypatch.setenv(ENV_NKEY, str(env))
    settings = NatsSettings.resolve(home=home)
    assert settings.user_public_key() == env_key
    assert settings.token is None  # the owner's token does not ride along with a user's key
    assert NatsSettings.resolve(home=home, nkey_file=str(flag)).user_public_key() == flag_key
    monkeypatch.delenv(ENV_NKEY)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    contexts = tmp_path / "xdg" / "nats" / "context"
    contexts.mkdir(parents=True)
    (contexts / "ci.json").write_text(json.dumps({"url": "nats://127.0.0.1:4222", "nkey": str(ctx)}))
    assert NatsSettings.resolve(home=home, context="ci").user_public_key() == ctx_key


def test_a_creds_files_seed_gives_the_public_key(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    creds = tmp_path / "user.creds"
    creds.write_bytes(b"-----BEGIN NATS USER JWT-----\neyJhbGciOi.e30.sig\n------END NATS USER JWT------\n\n"
                      b"************************* IMPORTANT *************************\n"
                      b"NKEY Seed printed below can be used to sign and prove identity.\n\n"
                      b"-----BEGIN USER NKEY SEED-----\n" + seed + b"\n------END USER NKEY SEED------\n")
    assert NatsSettings(url="nats://x", creds_file=str(creds)).user_public_key() == public
    assert NatsSettings(url="nats://x").user_public_key() is None


def test_an_unusable_key_file_is_one_line_naming_the_file_never_the_seed(tmp_path: Path) -> None:
    missing = tmp_path / "missing.nk"
    with pytest.raises(InvalidRequest, match="missing.nk"):
        NatsSettings(url="nats://x", nkey_file=str(missing)).user_public_key()
    # An account seed is a seed, but not a user's: refused, and not quoted.
    account = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
    wrong = tmp_path / "account.nk"
    wrong.write_text(account + "\n")
    with pytest.raises(InvalidRequest) as caught:
        NatsSettings(url="nats://x", nkey_file=str(wrong)).user_public_key()
    assert "account.nk" in str(caught.value) and account not in str(caught.value)
    assert "\n" not in str(caught.value)
