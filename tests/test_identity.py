"""The verified requester and the confused-deputy rules for users (issue 21).

A real nats-server with fleetbus's two accounts (support/natsaccounts.py): a plugin host
with the ``local`` transport runs as the owner in FLEETBUS; alice and bob are nkey users
in USERS, driven with raw nats-py clients, their requests crossing the service import
so that nats-server writes ``Nats-Request-Info``. Every refusal is checked where it
lands: the subject that would have received something is watched.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from fleetbus.admin import AdminService
from fleetbus.admission import requester_of
from fleetbus.audit import AuditRecord
from fleetbus.client import Client
from fleetbus.errors import Forbidden
from fleetbus.home import Home
from fleetbus.host import HostSettings, PluginHost
from fleetbus.jetstream import open_state
from fleetbus.keys import AgentKeys
from fleetbus.records import Server
from fleetbus.registry import Registry
from fleetbus.subjects import HDR_REQUEST_INFO, HDR_REQUESTER, OWNER, Identity, Names, identity_in
from fleetbus.vault import Vault
from fleetbus_local.transport import LocalTransport
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.kv import KeyValue
from support.auditread import audit_records
from support.natsaccounts import AccountsNats, NkeyUser
from support.processes import own_user
from support.watching import watch

# alice's grant: exec on every server in role web, sent on its grant subjects.
WEB_GRANT = {"id": "gweb0001", "ops": ["exec"], "selector": {"role": "web"}}


@dataclass
class Bus:
    nats: AccountsNats
    names: Names
    host: PluginHost
    owner: NATS
    registry: Registry
    users: KeyValue
    alice: NkeyUser
    bob: NkeyUser


@pytest.fixture
async def bus(tmp_path: Path, prefix: str) -> AsyncIterator[Bus]:
    names = Names(prefix)
    web1 = f"{prefix}.v1.servers.web1.*"
    grant = [names.grant(WEB_GRANT["id"], "*", op) for op in ("exec", "cancel")]
    alice = NkeyUser.new("alice", [web1, *grant, names.admin("servers.remove")])
    bob = NkeyUser.new("bob", [web1])
    server = AccountsNats(tmp_path / "nats", prefix, [alice, bob]).start()
    owner = await server.owner()
    state = await open_state(owner, names)
    # What `users add` writes (the users module): the serving side reads it (grants.py).
    users = state.users
    await users.put("alice", alice.record([WEB_GRANT]))
    await users.put("bob", bob.record())
    registry = Registry(state.servers, state.status)
    host = PluginHost(owner, state, {"local": LocalTransport}, vault=None, settings=HostSettings(
        home=Home(tmp_path / "home"), transport_settings={"local": {"user": own_user()}}))
    try:
        await host.start()
        await registry.add(Server(name="web1", transport="local", roles=["web"]))
        await registry.add(Server(name="db1", transport="local"))
        assert await host.wait_served("web1", 20) and await host.wait_served("db1", 20)
        yield Bus(server, names, host, owner, registry, users, alice, bob)
    finally:
        await host.stop()
        await owner.close()
        server.stop()


async def _ask(nc: NATS, subject: str, body: dict[str, Any], headers: dict[str, str] | None = None,
               timeout: float = 30) -> dict[str, Any]:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout, headers=headers)
    return json.loads(msg.data)


def test_identity_is_read_from_nats_request_info_only() -> None:
    assert identity_in(None) is OWNER and identity_in({HDR_REQUESTER: "alice"}) is OWNER
    info = {HDR_REQUEST_INFO: json.dumps({"acc": "USERS", "user": "UABC", "name_tag": "ci", "rtt": 1})}
    alice = identity_in(info)
    assert alice == Identity("USERS", "UABC", "ci")
    # Its inboxes are its public key's, as NATS names it: no users bucket needed.
    key = NkeyUser.new("alice", []).public
    assert replace(alice, user=key).inbox_prefix == f"_I.{key}."
    assert replace(alice, user=key, name="alice").inbox_prefix == f"_I.{key}."
    # Not an nkey (a user/password user, a key with a dot or a wildcard), or the owner: none.
    assert alice.inbox_prefix is None and OWNER.inbox_prefix is None
    assert replace(alice, user="bob").inbox_prefix is None
    assert replace(alice, user=key[:-1] + ".").inbox_prefix is None
    assert replace(alice, user=key[:-1] + ">").inbox_prefix is None
    # Unreadable: not nats-server's; no user's.
    assert identity_in({HDR_REQUEST_INFO: "{"}).account == "?"
    # Fairness keys on the identity: every user's reply starts with the same _R_.<acc>.
    assert requester_of("_R_.abc123.xyz789", alice) == "id:USERS:UABC"
    assert requester_of("_R_.abc123.xyz789", identity_in({HDR_REQUEST_INFO: '{"acc":"USERS","user":"B"}'})) \
        != requester_of("_R_.abc123.xyz789", alice)
    assert requester_of("_INBOX.abc.1", OWNER) == "_INBOX.abc"


async def test_a_user_cannot_make_the_audit_trail_name_another(bus: Bus) -> None:
    alice = await bus.nats.user("alice")
    try:
        forged = {HDR_REQUESTER: "bob",
                  HDR_REQUEST_INFO: json.dumps({"acc": "USERS", "user": bus.bob.public})}
        reply = await _ask(alice, bus.names.server("web1", "exec"),
                           {"id": "forged-1", "argv": ["echo", "hi"]}, headers=forged)
        assert reply["ok"] and reply["stdout"] == "hi\n"  # answered on the import's _R_. reply
    finally:
        await alice.close()
    owned = await _ask(bus.owner, bus.names.server("web1", "exec"), {"id": "owned-1", "argv": ["true"]},
                       headers={HDR_REQUESTER: "bob"})
    assert owned["ok"]
    found = await audit_records(bus.owner, bus.names.audit_stream, bus.names.audit_all,
                                {"forged-1", "owned-1"})
    (record,) = found["forged-1"]
    assert record["identity"] == {"account": "USERS", "user": bus.alice.public, "name": "alice"}
    assert record["requester"] == "bob"  # recorded as declared, beside it
    assert AuditRecord.model_validate(record).identity is not None  # the documented model reads it
    (owner_record,) = found["owned-1"]
    assert owner_record["identity"] == {"account": None, "user": "owner"}


async def test_output_goes_only_to_the_users_own_inbox(bus: Bus) -> None:
    alice = await bus.nats.user("alice")
    bob = await bus.nats.user("bob")
    try:
        bobs = await watch(bob, f"{bus.bob.inbox}.>")
        fleetbus_inbox = await watch(bus.owner, "_INBOX.stolen.>")
        admin = await watch(bus.owner, bus.names.admin("servers.remove"))
        other_server = await watch(bus.owner, bus.names.server("web2", "exec"))
        exec_subject = bus.names.server("web1", "exec")
        for subject in (f"{bus.bob.inbox}.out", "_INBOX.stolen.out", bus.names.admin("servers.remove"),
                        bus.names.server("web2", "exec")):
            reply = await _ask(alice, exec_subject, {"argv": ["echo", "x"], "output_subject": subject})
            assert reply["error"]["code"] == "forbidden", (subject, reply)
            put = await _ask(alice, bus.names.server("web1", "put"),
                             {"path": "/tmp/never", "stream": {"subject": subject, "size": 1}})
            assert put["error"]["code"] == "forbidden", (subject, put)
        # Nor the object store, which holds everyone's files.
        for op, body in (("put", {"path": "/tmp/never", "object": "owners-upload"}),
                         ("get", {"path": "/etc/hostname", "object": "owners-upload"})):
            reply = await _ask(alice, bus.names.server("web1", op), body)
            assert reply["error"]["code"] == "forbidden", (op, reply)
            assert "streamed transfer" in reply["error"]["message"]
        # Her own inbox works, and a later command ran: everything before it was handled.
        own = f"{bus.alice.inbox}.out"
        ended = asyncio.Event()

        async def on_output(msg: Msg) -> None:
            if (msg.headers or {}).get("Fleetbus-End"):
                ended.set()

        await alice.subscribe(own, cb=on_output)
        reply = await _ask(alice, exec_subject, {"argv": ["echo", "mine"], "output_subject": own})
        assert reply["ok"] and reply["stdout"] == "mine\n"
        await asyncio.wait_for(ended.wait(), 10)
        await bob.flush()
        await bus.owner.flush()
        assert (bobs, fleetbus_inbox, admin, other_server) == ([], [], [], [])
        denied = bus.host.metrics.denied
        assert denied.labels(bus.alice.public, "exec")._value.get() == 4
        assert denied.labels(bus.alice.public, "put")._value.get() == 5
        assert denied.labels(bus.alice.public, "get")._value.get() == 1
    finally:
        await alice.close()
        await bob.close()


async def test_a_command_id_and_its_cancel_belong_to_its_sender(bus: Bus) -> None:
    alice = await bus.nats.user("alice")
    bob = await bus.nats.user("bob")
    exec_subject = bus.names.server("web1", "exec")
    try:
        first = await _ask(alice, exec_subject, {"id": "alices-1", "argv": ["echo", "secret"]})
        assert first["ok"]
        # bob's retry of her id (same body) would replay her output to him.
        retry = await _ask(bob, exec_subject, {"id": "alices-1", "argv": ["echo", "secret"]})
        assert retry["error"]["code"] == "forbidden" and "secret" not in json.dumps(retry)
        # And her own retry still replays.
        again = await _ask(alice, exec_subject, {"id": "alices-1", "argv": ["echo", "secret"]})
        assert again["ok"] and again["stdout"] == "secret\n"

        running = asyncio.create_task(_ask(alice, exec_subject, {"id": "alices-2", "argv": ["sleep", "30"]}))
        deadline = time.monotonic() + 20
        while "alices-2" not in bus.host.served["web1"].running:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.01)
        cancel = bus.names.server("web1", "cancel")
        refused = await _ask(bob, cancel, {"id": "alices-2"})
        assert refused["error"]["code"] == "forbidden"
        assert not running.done()
        assert bus.host.metrics.denied.labels(bus.bob.public, "cancel")._value.get() == 1
        assert (await _ask(alice, cancel, {"id": "alices-2"}))["cancelled"] is True
        assert (await running)["error"]["code"] == "cancelled"
    finally:
        await alice.close()
        await bob.close()
    # Two records under one id, written at different times: read until both are in.
    wanted = {("cancel", "forbidden", bus.bob.public), ("exec", "cancelled", bus.alice.public)}
    deadline = time.monotonic() + 30
    while True:
        found = await audit_records(bus.owner, bus.names.audit_stream, bus.names.audit_all, {"alices-2"})
        ops = {(r["op"], r["outcome"], r["identity"]["user"]) for r in found["alices-2"]}
        if wanted <= ops:
            break
        assert time.monotonic() < deadline, ops
        await asyncio.sleep(0.05)


async def test_the_client_turns_a_nats_permission_violation_into_forbidden(bus: Bus) -> None:
    errors: list[Exception] = []
    nc = await bus.nats.user("alice", errors)
    client = Client(nc, bus.names, requester="alice")
    try:
        with pytest.raises(Forbidden, match=r"db1\.ping"):
            # Refused by NATS (her permissions): without the mapping, `timeout` after 30 s.
            await client.ping("db1", timeout_s=30)
        assert (await client.ping("web1"))["ok"]  # the connection is still usable
        # A user reaches none of fleetbus's JetStream.
        await nc.publish("$JS.API.STREAM.DELETE." + bus.names.audit_stream, b"")
        await nc.flush()
        deadline = time.monotonic() + 10
        while not any("$js.api.stream.delete" in str(e) for e in errors):
            assert time.monotonic() < deadline, errors
            await asyncio.sleep(0.01)
    finally:
        await client.close()
    assert (await bus.owner.jetstream().stream_info(bus.names.audit_stream)).config.name


async def _served_through(bus: Bus, server: str, grant: str, wanted: bool) -> None:
    """Wait until the host does (or does not) serve ``server`` through ``grant``, and
    nats-server has the (un)subscription."""
    deadline = time.monotonic() + 20
    while (grant in bus.host.served[server].grant_subs) is not wanted:
        assert time.monotonic() < deadline, (server, grant, wanted)
        await asyncio.sleep(0.01)
    await bus.owner.flush()


async def _unreachable(nc: NATS, subject: str) -> None:
    """Wait until a request on ``subject`` gets no responders (see :func:`_reachable`)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            await _ask(nc, subject, {"argv": ["true"]}, timeout=1)
        except NoRespondersError:
            return
        except TimeoutError:
            pass  # delivered to a subscription nats-server had not dropped yet
        assert time.monotonic() < deadline, subject
        await asyncio.sleep(0.005)


async def _reachable(nc: NATS, subject: str) -> dict[str, Any]:
    """A request on ``subject`` answered (a command that does nothing), waiting for it.

    After the worker's subscription is flushed, a request crossing the import was seen to
    find no responders for a few milliseconds more (5 of 150 tries, nats-server 2.15.1):
    interest reaches the importing side a little later than the exporting account."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return await _ask(nc, subject, {"argv": ["true"]})
        except NoRespondersError:
            assert time.monotonic() < deadline, subject
            await asyncio.sleep(0.005)


async def test_a_grant_reaches_the_servers_its_selector_matches_as_the_registry_changes(bus: Bus) -> None:
    alice = await bus.nats.user("alice")
    grant = WEB_GRANT["id"]
    try:
        await _served_through(bus, "web1", grant, True)
        await _reachable(alice, bus.names.grant(grant, "web1", "exec"))
        ran = await _ask(alice, bus.names.grant(grant, "web1", "exec"), {"argv": ["echo", "via grant"]})
        assert ran["ok"] and ran["stdout"] == "via grant\n"
        # cancel works through the grant too (her permissions allow it there).
        running = asyncio.create_task(_ask(alice, bus.names.grant(grant, "web1", "exec"),
                                           {"id": "by-grant-1", "argv": ["sleep", "30"]}))
        deadline = time.monotonic() + 20
        while "by-grant-1" not in bus.host.served["web1"].running:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.01)
        assert (await _ask(alice, bus.names.grant(grant, "web1", "cancel"), {"id": "by-grant-1"}))["cancelled"]
        assert (await running)["error"]["code"] == "cancelled"
        # db1 is not in role web: nobody answers its grant subject.
        assert "db1" in bus.host.served and grant not in bus.host.served["db1"].grant_subs
        with pytest.raises(NoRespondersError):
            await _ask(alice, bus.names.grant(grant, "db1", "exec"), {"argv": ["true"]})
        # Added to role web: reachable, with no permission change and no restart.
        db1 = await bus.registry.find("db1")
        assert db1 is not None
        await bus.registry.add(db1.model_copy(update={"roles": ["web"]}), replace=True)
        await _served_through(bus, "db1", grant, True)
        assert (await _reachable(alice, bus.names.grant(grant, "db1", "exec")))["ok"]
        # The grant taken from alice's record: no server is served through it any more.
        await bus.users.put("alice", bus.alice.record())
        await _served_through(bus, "web1", grant, False)
        await _served_through(bus, "db1", grant, False)
        await _unreachable(alice, bus.names.grant(grant, "web1", "exec"))
    finally:
        await alice.close()
    found = await audit_records(bus.owner, bus.names.audit_stream, bus.names.audit_all, {ran["id"]})
    (record,) = found[ran["id"]]
    assert (record["server"], record["identity"]["name"]) == ("web1", "alice")


async def test_an_admin_change_by_a_user_is_answered_and_audited_with_its_identity(bus: Bus) -> None:
    state = bus.host.state
    admin = AdminService(bus.owner, bus.names, bus.registry, Vault(state.credentials, None),
                         AgentKeys(state.agent_keys), state.gateways, {"local": LocalTransport})
    await admin.start()
    alice = await bus.nats.user("alice")
    try:
        await bus.registry.add(Server(name="gone1", transport="local"))
        # Across the import: its reply is a _R_. subject, which the endpoint answers.
        reply = await _ask(alice, bus.names.admin("servers.remove"), {"name": "gone1"},
                           headers={HDR_REQUESTER: "root@elsewhere"})
        assert reply["ok"], reply
    finally:
        await alice.close()
        await admin.stop()
    assert await bus.registry.find("gone1") is None
    deadline = time.monotonic() + 30
    while True:
        found = await audit_records(bus.owner, bus.names.audit_stream, f"{bus.names.prefix}.v1.audit._admin.>",
                                    set(), timeout=0)
        records = [r for rs in found.values() for r in rs if r["op"] == "servers.remove"]
        if records:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    (record,) = records
    assert record["requester"] == "root@elsewhere"
    assert (record["identity"]["account"], record["identity"]["user"]) == ("USERS", bus.alice.public)
