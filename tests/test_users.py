"""Users (issue 21): accounts in the embedded NATS, user records, generated permissions,
reload on every change, expiry, and the owner keeping everything the single token had.

Against a real `fleetbus up`: users are added with the CLI and connect with raw nats-py
as another system would, with the seed file the CLI wrote. The services do not answer
users yet (reply rule and grant subscriptions are another part of issue 21), so what is
checked here is what NATS lets each identity publish and subscribe: a refusal is a
permission violation in ``error_cb``, seen by the PONG of a flush.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from support.processes import Fleet, until


class UserClient:
    """A raw nats-py connection as a user, recording what NATS refused."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.sent = 0
        self.closed = False
        self.nc: NATS | None = None
        self.name = ""
        #: Its inbox prefix, ``_I.<its public key>.`` (with the dot).
        self.inbox = ""

    async def connect(self, url: str, seed_file: Path, user: str, **opts: Any) -> UserClient:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        async def on_closed() -> None:
            self.closed = True

        self.name = user
        public = nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key.decode()
        self.inbox = Names.user_inbox(public)
        self.nc = await nats.connect(url, nkeys_seed=str(seed_file), inbox_prefix=self.inbox.rstrip("."),
                                     error_cb=on_error, closed_cb=on_closed, allow_reconnect=False,
                                     **opts)
        return self

    async def refused(self, subject: str) -> bool:
        """Publish on ``subject``: True if NATS refused it.

        nats-py hands each -ERR to ``error_cb`` in a task of its own, in order, so a
        refusal may land after the flush's PONG. A publish on a subject no user may use
        follows, and once its refusal is in, any refusal of ``subject`` is in too.
        """
        assert self.nc is not None
        self.sent += 1
        before = len(self.errors)
        sentinel = f"$SYS.fleetbus-test.{self.sent}"
        await self.nc.publish(subject, b"{}")
        await self.nc.publish(sentinel, b"{}")
        await self.nc.flush(timeout=5)
        await until(lambda: any(f'"{sentinel.lower()}"' in e for e in self.errors[before:]),
                    what=f"the refusal of {sentinel}")
        text = f'permissions violation for publish to "{subject.lower()}"'
        return any(text in e for e in self.errors[before:])

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


def add_user(fleet: Fleet, tmp_path: Path, name: str, *args: str) -> tuple[Path, dict[str, Any]]:
    seed = tmp_path / f"{name}.nk"
    done = fleet.cli("users", "add", name, *args, "--out", str(seed), "--json")
    assert done.returncode == 0, done.stderr
    return seed, json.loads(done.stdout)


@pytest.fixture(scope="module")
def names() -> Names:
    return Names("fleetbus")


async def test_owner_keeps_everything_the_token_had(fleet: Fleet) -> None:
    # The CLI and fleetbus's own processes present the token file as before.
    ran = fleet.cli("run", "local", "--", "echo", "hello")
    assert ran.returncode == 0 and "hello" in ran.stdout, ran.stderr
    # A raw client presents the same secret as owner's password, with JetStream as before.
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        kv = await nc.jetstream().key_value("fleetbus_servers")
        assert (await kv.get("local")).value
    finally:
        await nc.close()
    # As a NATS token it is refused: a token cannot sit beside account users.
    with pytest.raises(Exception):  # noqa: B017  (nats-py raises several types here)
        await nats.connect(fleet.nats_url, token=fleet.token, allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=3)
    conf = (fleet.home / "nats.conf").read_text()
    assert fleet.token not in conf and "$FLEETBUS_EMBEDDED_NATS_TOKEN" in conf


async def test_user_may_publish_only_what_it_was_granted(fleet: Fleet, fleet_nc: NATS, tmp_path: Path,
                                                         names: Names) -> None:
    seed, added = add_user(fleet, tmp_path, "ci-deploy", "--allow", "exec,put:role=web",
                           "--allow", "info:local", "--admin", "servers.list")
    assert added["applied"] is True
    grant = added["user"]["grants"][0]["id"]
    # Stands in for a worker serving web1 through the grant (another part of issue 21).
    async def answer(msg: Any) -> None:
        await msg.respond(json.dumps({"ok": True, "via": msg.subject}).encode())

    served = await fleet_nc.subscribe(names.grant(grant, "*", "exec"), cb=answer)
    await fleet_nc.flush()
    user = await UserClient().connect(fleet.nats_url, seed, "ci-deploy")
    try:
        # The grant's subject crosses the import and is answered on the user's own inbox.
        reply = await user.nc.request(names.grant(grant, "web1", "exec"), b"{}", timeout=10)  # type: ignore[union-attr]
        assert json.loads(reply.data) == {"ok": True, "via": names.grant(grant, "web1", "exec")}
        for allowed in (names.grant(grant, "web1", "put"), names.grant(grant, "web1", "cancel"),
                        names.server("local", "info"), names.admin("servers.list"),
                        names.jobs("start"), names.jobs("get")):  # jobs: checked by the job service
            assert not await user.refused(allowed), (allowed, user.errors)
        for denied in (names.grant(grant, "web1", "get"), names.server("db1", "exec"),
                       names.server("local", "exec"), names.admin("servers.add"),
                       names.admin("users.add"), names.event("x"), names.job_event("x", "progress"),
                       "$JS.API.STREAM.NAMES", "$KV.fleetbus_servers.local"):
            assert await user.refused(denied), (denied, user.errors)
        # It may read its own inbox only.
        await user.nc.subscribe("_I.other.>")  # type: ignore[union-attr]
        await user.nc.flush(timeout=5)  # type: ignore[union-attr]
        await until(lambda: any('subscription to "_i.other.>"' in e for e in user.errors), what="refusal")
        assert not user.closed  # refusals do not close the connection
    finally:
        await user.close()
        await served.unsubscribe()


async def test_seed_written_0600_and_never_shown_again(fleet: Fleet, tmp_path: Path) -> None:
    seed, added = add_user(fleet, tmp_path, "auditor", "--allow", "info,ping:all")
    assert stat.S_IMODE(os.stat(seed).st_mode) == 0o600
    secret = seed.read_text().strip()
    assert secret.startswith("SU")
    shown = fleet.cli("users", "show", "auditor", "--json")
    listed = fleet.cli("users", "list", "--json")
    assert shown.returncode == 0 and listed.returncode == 0
    everything = [json.dumps(added), shown.stdout, listed.stdout, fleet.output(),
                  (fleet.home / "nats.log").read_text(errors="replace"),
                  (fleet.home / "nats-users.conf").read_text()]
    assert not any(secret in text for text in everything)
    assert json.loads(shown.stdout)["public_key"] in (fleet.home / "nats-users.conf").read_text()
    assert stat.S_IMODE(os.stat(fleet.home / "nats-users.conf").st_mode) == 0o600

    # The change is audited by name, never with the seed.
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        js = nc.jetstream()
        records: list[dict[str, Any]] = []

        async def audited() -> bool:
            try:
                msg = await js.get_last_msg("FLEETBUS_AUDIT", "fleetbus.v1.audit._admin.users.add")
            except Exception:
                return False
            records.append(json.loads(msg.data))
            return secret not in msg.data.decode()

        deadline = asyncio.get_running_loop().time() + 30
        while not await audited():
            assert asyncio.get_running_loop().time() < deadline, "no audit record of users.add"
            await asyncio.sleep(0.1)
        assert (records[-1]["op"], records[-1]["server"], records[-1]["outcome"]) == ("users.add", "auditor", "ok")
    finally:
        await nc.close()


async def test_removed_user_is_disconnected_and_refused(fleet: Fleet, tmp_path: Path, names: Names) -> None:
    seed, _ = add_user(fleet, tmp_path, "oncall", "--allow", "exec:local")
    user = await UserClient().connect(fleet.nats_url, seed, "oncall")
    try:
        assert not await user.refused(names.server("local", "exec"))
        removed = fleet.cli("users", "remove", "oncall")
        assert removed.returncode == 0, removed.stderr
        await until(lambda: user.closed, timeout=15, what="the removed user's connection closed")
    finally:
        await user.close()
    with pytest.raises(Exception):  # noqa: B017
        await UserClient().connect(fleet.nats_url, seed, "oncall", max_reconnect_attempts=0, connect_timeout=3)
    assert fleet.cli("users", "show", "oncall").returncode != 0


async def test_rotated_key_replaces_the_old_one(fleet: Fleet, tmp_path: Path, names: Names) -> None:
    old, _ = add_user(fleet, tmp_path, "rotor", "--allow", "ping:local")
    user = await UserClient().connect(fleet.nats_url, old, "rotor")
    new = tmp_path / "rotor-new.nk"
    try:
        done = fleet.cli("users", "rotate", "rotor", "--out", str(new))
        assert done.returncode == 0, done.stderr
        await until(lambda: user.closed, timeout=15, what="the old key's connection closed")
    finally:
        await user.close()
    with pytest.raises(Exception):  # noqa: B017
        await UserClient().connect(fleet.nats_url, old, "rotor", max_reconnect_attempts=0, connect_timeout=3)
    fresh = await UserClient().connect(fleet.nats_url, new, "rotor")
    try:
        assert not await fresh.refused(names.server("local", "ping"))
        assert await fresh.refused(names.server("local", "exec"))
    finally:
        await fresh.close()
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o600


async def test_changed_grants_apply_to_the_connected_client(fleet: Fleet, tmp_path: Path, names: Names) -> None:
    _, made = add_user(fleet, tmp_path, "shifter", "--allow", "ping:local", "--expires", "1d")
    ping_grant = made["user"]["grants"][0]["id"]
    user = await UserClient().connect(fleet.nats_url, tmp_path / "shifter.nk", "shifter")
    try:
        assert await user.refused(names.server("local", "exec"))
        done = fleet.cli("users", "change", "shifter", "--allow", "exec:local", "--revoke", ping_grant,
                         "--admin", "servers.list", "--expires", "never", "--json")
        assert done.returncode == 0, done.stderr
        changed = json.loads(done.stdout)
        assert changed["applied"] is True
        assert [g["text"] for g in changed["user"]["grants"]] == ["exec:local"]
        assert changed["user"]["admin"] == ["servers.list"] and changed["user"]["expires"] is None
        assert changed["user"]["public_key"] == made["user"]["public_key"]  # the same key
        # Applied to the connection it already has: no reconnect, new permissions.
        assert not await user.refused(names.server("local", "exec"))
        assert await user.refused(names.server("local", "ping"))
        assert not await user.refused(names.admin("servers.list"))
        assert not user.closed
        # Taking the rest away by text; nothing left is refused, as is a grant it lacks.
        done = fleet.cli("users", "change", "shifter", "--revoke", "exec:local", "--revoke-admin", "servers.list")
        assert done.returncode != 0 and "could do nothing" in done.stderr, done.stderr
        done = fleet.cli("users", "change", "shifter", "--revoke", "g00000000")
        assert done.returncode != 0 and "no grant 'g00000000'" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        done = fleet.cli("users", "show", "shifter", "--json")
        assert [g["text"] for g in json.loads(done.stdout)["grants"]] == ["exec:local"]  # unchanged
    finally:
        await user.close()


async def test_expired_user_is_removed_from_nats(fleet: Fleet, tmp_path: Path) -> None:
    seed, added = add_user(fleet, tmp_path, "brief", "--allow", "ping:local", "--expires", "1s")
    assert added["user"]["expires"]

    async def refused() -> bool:
        try:
            c = await UserClient().connect(fleet.nats_url, seed, "brief", max_reconnect_attempts=0,
                                           connect_timeout=3)
        except Exception:
            return True
        await c.close()
        return False

    deadline = asyncio.get_running_loop().time() + 30
    while not await refused():
        assert asyncio.get_running_loop().time() < deadline, "the expired user still connects"
        await asyncio.sleep(0.2)
    listed = json.loads(fleet.cli("users", "list", "--json").stdout)
    assert next(u for u in listed if u["name"] == "brief")["expired"] is True


async def test_bad_requests_change_nothing(fleet: Fleet, tmp_path: Path) -> None:
    before = (fleet.home / "nats-users.conf").read_text()
    for args in (["--allow", "exec"], ["--allow", "rm:role=web"], ["--allow", "exec:colour=red"],
                 ["--admin", "servers.nuke"], []):
        done = fleet.cli("users", "add", "badone", *args, "--out", str(tmp_path / "bad.nk"))
        assert done.returncode != 0, args
        assert not (tmp_path / "bad.nk").exists()
    assert fleet.cli("users", "add", "owner", "--allow", "ping:all").returncode != 0
    assert (fleet.home / "nats-users.conf").read_text() == before
    # A key nats-server would refuse is refused before it is stored: one such record would
    # keep every later change from reaching NATS.
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        for key in ("U" + "A" * 55, "not-a-key"):
            msg = await nc.request("fleetbus.v1.admin.users.add", json.dumps(
                {"name": "badkey", "public_key": key, "allow": ["ping:all"]}).encode(), timeout=10)
            assert json.loads(msg.data)["error"]["code"] == "invalid_request"
        # Nor a key another user holds: NATS could not tell the two apart.
        taken = add_user(fleet, tmp_path, "keyholder", "--allow", "ping:local")[1]["user"]["public_key"]
        msg = await nc.request("fleetbus.v1.admin.users.add", json.dumps(
            {"name": "twin", "public_key": taken, "allow": ["ping:all"]}).encode(), timeout=10)
        assert json.loads(msg.data)["error"]["code"] == "invalid_request"
    finally:
        await nc.close()


async def test_upgrade_keeps_jetstream_data_of_the_token_era(tmp_path: Path) -> None:
    """A home whose NATS ran without accounts keeps its data: it moves to FLEETBUS."""
    from fleetbus.embedded import EmbeddedNats, nats_server_binary
    from fleetbus.home import Home

    home = Home(tmp_path / "home")
    home.ensure()
    home.nats_data.mkdir()
    # The token-era server: no accounts, so JetStream data is the global account's.
    conf = tmp_path / "old.conf"
    conf.write_text(f'port: -1\nports_file_dir: "{tmp_path}"\njetstream {{ store_dir: "{home.nats_data}" }}\n')
    old = await asyncio.create_subprocess_exec(nats_server_binary(), "-c", str(conf),
                                               stdout=asyncio.subprocess.DEVNULL,
                                               stderr=asyncio.subprocess.DEVNULL)
    try:
        ports = await until(lambda: next(tmp_path.glob(f"nats-server_{old.pid}.ports"), None), what="ports")
        url = await until(lambda: json.loads(ports.read_text() or "null"), what="ports file")
        nc = await nats.connect(url["nats"][0])
        kv = await nc.jetstream().create_key_value(bucket="fleetbus_servers")
        await kv.put("web1", b"kept")
        await nc.close()
    finally:
        old.terminate()
        await old.wait()
    embedded = EmbeddedNats(home, port=0)
    await embedded.start()
    try:
        nc = await nats.connect(embedded.url, user="owner", password=embedded.token)
        try:
            kv = await nc.jetstream().key_value("fleetbus_servers")
            assert (await kv.get("web1")).value == b"kept"
        finally:
            await nc.close()
        assert not (home.nats_data / "jetstream" / "$G").exists()
    finally:
        await embedded.stop()


async def test_a_users_file_nats_refuses_leaves_the_running_users(tmp_path: Path) -> None:
    from fleetbus.embedded import EmbeddedNats
    from fleetbus.errors import InvalidRequest
    from fleetbus.home import Home

    embedded = EmbeddedNats(Home(tmp_path / "home"), port=0)
    await embedded.start()
    try:
        before = embedded.users_file.path.read_text()
        with pytest.raises(InvalidRequest, match="refused"):
            await embedded.users_file.apply('users: [ {nkey: "not-a-key"} ]\n')
        assert embedded.users_file.path.read_text() == before
        assert await embedded.users_file.apply(before) is False  # unchanged: no reload
    finally:
        await embedded.stop()


@pytest.mark.parametrize(("text", "ops", "selection"), [
    ("exec,put:role=web", ["exec", "put"], {"role": "web"}),
    ("info,ping:all", ["info", "ping"], {"all": True}),
    ("exec:role=web env=prod", ["exec"], {"role": "web", "environment": "prod"}),
    ("get:label team=payments", ["get"], {"labels": {"team": "payments"}}),
    ("exec:db1 db2 web-*", ["exec"], {"servers": ["db1", "db2", "web-*"]}),
    ("*:local", ["exec", "put", "get", "info", "ping"], {"servers": ["local"]}),
])
def test_grants_read_like_sentences(text: str, ops: list[str], selection: dict[str, Any]) -> None:
    from fleetbus.selection import Selection
    from fleetbus.users import parse_grant

    grant = parse_grant(text)
    assert grant.ops == ops
    assert grant.selector == Selection.model_validate(selection)
    assert grant.text == text


@pytest.mark.parametrize("text", ["exec", ":role=web", "exec:", "rm:all", "exec:colour=red",
                                  "exec:label team", "exec:role=a role=b", "exec:WEB1"])
def test_bad_grants_are_refused(text: str) -> None:
    from fleetbus.errors import InvalidRequest
    from fleetbus.users import parse_grant

    with pytest.raises(InvalidRequest):
        parse_grant(text)


def test_permissions_are_exactly_the_grants(names: Names) -> None:
    from datetime import timedelta

    from fleetbus.cli.users import new_user_key
    from fleetbus.records import utcnow
    from fleetbus.userperms import permissions, render_users
    from fleetbus.users import UserRecord, parse_grant

    key = new_user_key()[1]
    user = UserRecord(name="ci", public_key=key, grants=[parse_grant("exec:role=web", "g00000001"),
                                                        parse_grant("ping:db1", "g00000002")],
                      admin=["servers.list"])
    assert permissions(names, user) == {
        "publish": sorted([
            "fleetbus.v1.grants.g00000001.*.exec", "fleetbus.v1.grants.g00000001.*.cancel",
            "fleetbus.v1.grants.g00000002.*.ping", "fleetbus.v1.grants.g00000002.*.cancel",
            "fleetbus.v1.servers.db1.ping", "fleetbus.v1.servers.db1.cancel",
            "fleetbus.v1.admin.servers.list", "fleetbus.v1.xfer.>", "$SYS.REQ.USER.INFO",
            "fleetbus.v1.admin.users.reach",
            *(f"fleetbus.v1.jobs.{verb}" for verb in ("start", "get", "list", "cancel", "rerun"))]),
        # Its inboxes are its public key's: the client and the worker know them without its name.
        "subscribe": [f"_I.{key}.>"],
    }
    gone = new_user_key()[1]
    expired = user.model_copy(update={"name": "gone", "public_key": gone,
                                      "expires": utcnow() - timedelta(seconds=1)})
    text = render_users(names, [user, expired])
    assert text.count('"nkey"') == 1 and f"_I.{key}.>" in text and gone not in text


def test_fleetbus_clients_send_the_embedded_token_as_owner() -> None:
    from fleetbus.connection import NatsSettings
    from fleetbus.embedded import new_token

    token = new_token()
    assert NatsSettings(url="nats://x", token=token).auth_options() == {"user": "owner", "password": token}
    # Any other token stays a NATS token (a NATS of your own, a cluster's token).
    assert NatsSettings(url="nats://x", token="s3cret").auth_options() == {"token": "s3cret"}
    # An explicit user wins: the token is not turned into another user's password.
    assert NatsSettings(url="nats://x", token=token, user="svc", password="pw").auth_options() == {
        "token": token, "user": "svc", "password": "pw"}


async def test_users_outlive_a_restart_of_the_stack(tmp_path: Path, names: Names) -> None:
    stack = Fleet(tmp_path / "home").start()
    try:
        seed, _ = add_user(stack, tmp_path, "keeper", "--allow", "ping:local")
    finally:
        stack.stop()
    stack = Fleet(tmp_path / "home").start()
    try:
        user = await UserClient().connect(stack.nats_url, seed, "keeper")
        try:
            assert not await user.refused(names.server("local", "ping"))
            assert await user.refused(names.server("local", "exec"))
            assert stack.cli("users", "remove", "keeper").returncode == 0
            await until(lambda: user.closed, timeout=15, what="the removed user's connection closed")
        finally:
            await user.close()
    finally:
        stack.stop()


async def test_without_out_the_seed_is_shown_once_on_stderr(fleet: Fleet) -> None:
    done = fleet.cli("users", "add", "shown-once", "--allow", "ping:local")
    assert done.returncode == 0, done.stderr
    seed = next(word for word in done.stderr.split() if word.startswith("SU"))
    assert seed not in done.stdout
    again = fleet.cli("users", "show", "shown-once")
    assert again.returncode == 0 and seed not in again.stdout + again.stderr


def test_an_out_file_that_cannot_be_written_adds_no_user(fleet: Fleet, tmp_path: Path) -> None:
    # The seed file comes first: a user whose seed was lost could never connect.
    done = fleet.cli("users", "add", "lostseed", "--allow", "ping:local",
                     "--out", str(tmp_path / "no-such-dir" / "lost.nk"))
    assert done.returncode != 0 and "cannot create" in done.stderr, done.stderr
    assert fleet.cli("users", "show", "lostseed").returncode != 0
