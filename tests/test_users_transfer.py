"""Streamed put/get for users (issue 21), on `fleetbus up`'s own NATS with a real worker.

A user moves files of any size by streaming: the worker's side of the transfer is
``<p>.v1.xfer.<token>`` in fleetbus's account, which users reach through the service
import, and the worker takes a transfer's messages only from the identity that sent
the command (nats-server writes ``Nats-Request-Info`` on every message crossing the
import, plain publishes too), so another user can neither inject into nor abort it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fleetbus.client import Client
from fleetbus.errors import Forbidden
from fleetbus.limits import MAX_INLINE_BYTES
from fleetbus.subjects import Names, identity_in
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.auditread import audit_records
from support.processes import Fleet
from support.transfermsgs import Inbox, send
from test_users import UserClient, add_user

NAMES = Names("fleetbus")
SERVER = "files9"
MIB = 1024 * 1024
KIB = 1024


@pytest.fixture(scope="module")
def users(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """alice may put and get on files9, bob may only put there."""
    added = fleet.cli("servers", "add", SERVER, "--transport", "local")
    assert added.returncode == 0, added.stderr
    seeds = tmp_path_factory.mktemp("seeds")
    return {"alice": add_user(fleet, seeds, "alice", "--allow", f"put,get:{SERVER}"),
            "bob": add_user(fleet, seeds, "bob", "--allow", f"put:{SERVER}")}


async def _served(fleet_nc: NATS) -> None:
    # The owner's client retries a server registered a moment ago until a worker serves it.
    await Client(fleet_nc, NAMES, requester="test").ping(SERVER)


@pytest.fixture
async def alice(fleet: Fleet, fleet_nc: NATS, users: dict[str, Any]) -> AsyncIterator[UserClient]:
    await _served(fleet_nc)
    user = await UserClient().connect(fleet.nats_url, users["alice"][0], "alice")
    yield user
    await user.close()


@pytest.fixture
async def bob(fleet: Fleet, users: dict[str, Any]) -> AsyncIterator[UserClient]:
    user = await UserClient().connect(fleet.nats_url, users["bob"][0], "bob")
    yield user
    await user.close()




def request(nc: NATS, op: str, body: dict[str, Any]) -> asyncio.Task[dict[str, Any]]:
    async def run() -> dict[str, Any]:
        msg = await nc.request(NAMES.server(SERVER, op), json.dumps(body).encode(), timeout=60)
        return json.loads(msg.data)

    return asyncio.ensure_future(run())


async def inject(stranger: NATS, victim_key: str, subject: str) -> None:
    """What a stranger would send to end or corrupt a transfer, claiming to be the victim;
    flushed, so nats-server has routed all of it before the victim's next message."""
    forged = {"Nats-Request-Info": json.dumps({"acc": "USERS", "user": victim_key})}
    await send(stranger, subject, "abort", b"bob says stop", **{"Fleetbus-Error": "cancelled"}, **forged)
    await send(stranger, subject, "data", b"garbage" * 1000, **{"Fleetbus-Seq": "1"}, **forged)
    await send(stranger, subject, "credit", **{"Fleetbus-Credit": str(1 << 30)}, **forged)
    await send(stranger, subject, "end", **{"Fleetbus-Size": "7", "Fleetbus-Sha256": "0" * 64}, **forged)
    await stranger.flush()


async def test_a_user_puts_and_gets_a_large_file_by_streaming_audited_as_itself(
        alice: UserClient, fleet_nc: NATS, users: dict[str, Any], tmp_path: Path) -> None:
    assert alice.nc is not None
    client = Client(alice.nc, NAMES, requester="alice-test")
    content = os.urandom(3 * MIB)
    assert len(content) > MAX_INLINE_BYTES
    src, remote, back = tmp_path / "src.bin", tmp_path / "remote" / "a.bin", tmp_path / "back.bin"
    src.write_bytes(content)

    put = await client.put(SERVER, src, str(remote))
    assert put["sha256"] == hashlib.sha256(content).hexdigest() and put["size"] == len(content)
    assert remote.read_bytes() == content
    got, _ = await client.get(SERVER, str(remote), back)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == got["sha256"] == put["sha256"]

    records = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, {put["id"], got["id"]})
    key = users["alice"][1]["user"]["public_key"]
    for command_id, op in ((put["id"], "put"), (got["id"], "get")):
        (record,) = records[command_id]
        assert record["op"] == op and record["outcome"] == "ok", record
        assert record["identity"]["name"] == "alice" and record["identity"]["user"] == key, record


async def test_another_user_cannot_inject_into_or_abort_a_put(
        alice: UserClient, bob: UserClient, fleet_nc: NATS, users: dict[str, Any], tmp_path: Path) -> None:
    assert alice.nc is not None and bob.nc is not None
    alice_key = users["alice"][1]["user"]["public_key"]
    bob_key = users["bob"][1]["user"]["public_key"]
    # As the owner, what reaches the worker's side: who nats-server says sent each message.
    seen: list[tuple[str, str]] = []

    async def watch(msg: Msg) -> None:
        seen.append((msg.data[:7].decode(errors="replace"), identity_in(msg.headers).key))

    watcher = await fleet_nc.subscribe(f"{NAMES.xfer_root}>", cb=watch)
    await fleet_nc.flush()

    content = os.urandom(2 * MIB + 123)
    chunk = 256 * KIB
    remote = tmp_path / "put.bin"
    inbox = await Inbox(alice.nc).start()
    reply = request(alice.nc, "put", {"path": str(remote), "stream": {"subject": inbox.subject, "size": len(content)}})
    # The worker's first message (credit) names its side of the transfer.
    first = await inbox.next("credit")
    to = first.headers["Fleetbus-Subject"]
    assert to.startswith(NAMES.xfer_root) and "." not in to[len(NAMES.xfer_root):]
    credit = int(first.headers["Fleetbus-Credit"])

    await inject(bob.nc, alice_key, to)  # before alice sends anything
    for seq, offset in enumerate(range(0, len(content), chunk), start=1):
        while credit <= 0:
            credit += int((await inbox.next("credit")).headers["Fleetbus-Credit"])
        piece = content[offset : offset + chunk]
        await send(alice.nc, to, "data", piece, **{"Fleetbus-Seq": str(seq)})
        credit -= len(piece)
        if seq == 2:
            await alice.nc.flush()
            await inject(bob.nc, alice_key, to)  # and in the middle
    await send(alice.nc, to, "end", **{"Fleetbus-Size": str(len(content)),
                                       "Fleetbus-Sha256": hashlib.sha256(content).hexdigest()})
    done = await reply
    assert done["ok"] is True, done
    assert done["sha256"] == hashlib.sha256(content).hexdigest()
    assert remote.read_bytes() == content
    await fleet_nc.flush()
    await watcher.unsubscribe()
    # Bob's forged header was replaced by his own: that is what the worker compares.
    assert ("bob say", f"USERS:{bob_key}") in seen and ("garbage", f"USERS:{bob_key}") in seen
    assert not any(who == f"USERS:{alice_key}" and data in ("bob say", "garbage") for data, who in seen)


async def test_another_user_cannot_abort_or_overrun_a_get(
        alice: UserClient, bob: UserClient, users: dict[str, Any], tmp_path: Path) -> None:
    assert alice.nc is not None and bob.nc is not None
    alice_key = users["alice"][1]["user"]["public_key"]
    content = os.urandom(2 * MIB)
    remote = tmp_path / "get.bin"
    remote.write_bytes(content)
    window = 256 * KIB
    inbox = await Inbox(alice.nc).start()
    reply = request(alice.nc, "get", {"path": str(remote),
                                      "stream": {"subject": inbox.subject, "window": window}})
    received = bytearray()
    outstanding = 0  # bytes sent within the credit alice granted and not yet granted again
    to = None
    while True:
        msg = await inbox.next()
        kind = msg.headers.get("Fleetbus-Transfer")
        if kind == "end":
            break
        assert kind != "abort", msg.data  # the worker took bob's abort for alice's
        if kind != "data":
            continue
        received += msg.data
        outstanding += len(msg.data)
        # Bob's credit of a GiB, had the worker taken it, would show here.
        assert outstanding <= window, "the worker sent beyond the credit alice granted"
        if to is None:
            to = msg.headers["Fleetbus-Subject"]
            await inject(bob.nc, alice_key, to)
        if outstanding >= window:
            await send(alice.nc, to, "credit", **{"Fleetbus-Credit": str(outstanding)})
            outstanding = 0
    done = await reply
    assert done["ok"] is True, done
    assert bytes(received) == content and done["sha256"] == hashlib.sha256(content).hexdigest()


async def test_a_user_names_only_its_own_inboxes_and_streams_only(
        alice: UserClient, tmp_path: Path) -> None:
    assert alice.nc is not None
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MAX_INLINE_BYTES + 1))
    elsewhere = ["_I.bob.stolen", "_INBOX.fleetbus-own", NAMES.admin("servers.remove"),
                 NAMES.xfer("someone-elses")]
    for subject in elsewhere:
        put = await request(alice.nc, "put", {"path": str(tmp_path / "x"), "stream": {"subject": subject, "size": 1}})
        get = await request(alice.nc, "get", {"path": str(big), "stream": {"subject": subject}})
        for done in (put, get):
            assert done["ok"] is False and done["error"]["code"] == "forbidden", (subject, done)
    # Without a stream a large file would go to the object store, fleetbus's own.
    done = await request(alice.nc, "get", {"path": str(big)})
    assert done["ok"] is False and done["error"]["code"] == "forbidden", done
    assert "stream" in done["error"]["message"]
    client = Client(alice.nc, NAMES, requester="alice-test")
    for call in (client.put(SERVER, big, str(tmp_path / "y"), via="object"),
                 client.get(SERVER, str(big), via="object")):
        with pytest.raises(Forbidden, match="as a user, move files by streaming"):
            await call
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


async def test_a_user_without_get_is_forbidden_to_get(bob: UserClient, fleet_nc: NATS, tmp_path: Path) -> None:
    assert bob.nc is not None
    await _served(fleet_nc)
    remote = tmp_path / "secret.bin"
    remote.write_bytes(os.urandom(MAX_INLINE_BYTES + 1))
    client = Client(bob.nc, NAMES, requester="bob-test")
    with pytest.raises(Forbidden):
        await client.get(SERVER, str(remote), tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()
