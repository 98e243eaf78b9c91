"""fleetbus publishes for a requester only on reply subjects (the confused-deputy rule).

Each refused subject is one a requester could use to act as fleetbus: its admin API,
another server's commands, the audit stream, JetStream's API. The tests subscribe to
the subject itself and check that nothing arrived there, not only the error reply.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from fleetbus.client import Client
from fleetbus.errors import TransportError
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.processes import Fleet, NatsServer
from support.watching import watch

S = "fleetbus.v1.servers"

DEPUTY_SUBJECTS = [
    "fleetbus.v1.admin.servers.remove",
    "fleetbus.v1.servers.web2.exec",
    "fleetbus.v1.servers.local.cancel",
    "fleetbus.v1.audit.web2.exec",  # a forged audit record (web2 runs nothing here)
    "$JS.API.STREAM.DELETE.FLEETBUS_AUDIT",
]


async def _request(nc: NATS, op: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(f"{S}.local.{op}", json.dumps(body).encode(), timeout=30)
    return json.loads(msg.data)


async def _a_later_command_completes(nc: NATS) -> None:
    """A command with live output on an inbox, run to its end marker: the worker
    has handled everything sent before it (one connection, in order)."""
    inbox = nc.new_inbox()
    ended = asyncio.Event()

    async def on_output(msg: Msg) -> None:
        if (msg.headers or {}).get("Fleetbus-End"):
            ended.set()

    await nc.subscribe(inbox, cb=on_output)
    reply = await _request(nc, "exec", {"argv": ["echo", "later"], "output_subject": inbox})
    assert reply["ok"] and reply["stdout"] == "later\n"
    await asyncio.wait_for(ended.wait(), 10)
    await nc.flush()


@pytest.mark.parametrize("subject", DEPUTY_SUBJECTS)
async def test_no_output_transfer_or_end_marker_goes_to_a_non_reply_subject(
    fleet_nc: NATS, tmp_path: Path, subject: str
) -> None:
    seen = await watch(fleet_nc, subject)
    src = tmp_path / "file"
    src.write_bytes(b"x" * 1024)
    attempts = {
        "exec": {"argv": ["echo", "hello"], "output_subject": subject},
        "put": {"path": str(tmp_path / "put"), "stream": {"subject": subject, "size": 10}},
        "get": {"path": str(src), "max_inline": 0, "stream": {"subject": subject}},
    }
    for op, body in attempts.items():
        reply = await _request(fleet_nc, op, body)
        assert reply["ok"] is False, (op, reply)
        assert reply["error"]["code"] == "invalid_request"
        assert "not a reply subject" in reply["error"]["message"]
    # A retry of a finished command replays its output: on an inbox, never elsewhere.
    done = await _request(fleet_nc, "exec", {"id": "deputy-replay", "argv": ["echo", "once"]})
    assert done["ok"]
    replay = await _request(fleet_nc, "exec", {"id": "deputy-replay", "argv": ["echo", "once"],
                                               "output_subject": subject})
    assert replay["error"]["code"] == "invalid_request"
    await _a_later_command_completes(fleet_nc)
    assert seen == [], [(m.subject, m.headers) for m in seen]
    assert not (tmp_path / "put").exists()


async def test_the_audit_stream_survives_a_delete_named_as_output(fleet_nc: NATS) -> None:
    reply = await _request(fleet_nc, "exec", {"argv": ["true"],
                                              "output_subject": "$JS.API.STREAM.DELETE.FLEETBUS_AUDIT"})
    assert reply["error"]["code"] == "invalid_request"
    await _a_later_command_completes(fleet_nc)
    info = await fleet_nc.jetstream().stream_info("FLEETBUS_AUDIT")
    assert info.config.name == "FLEETBUS_AUDIT"


async def test_an_inbox_still_gets_output_and_transfers(fleet_nc: NATS, tmp_path: Path) -> None:
    await _a_later_command_completes(fleet_nc)  # exec with live output on _INBOX.
    src = tmp_path / "big"
    src.write_bytes(b"y" * 200_000)
    inbox = fleet_nc.new_inbox()
    got: list[Msg] = []
    ended = asyncio.Event()

    async def on_data(msg: Msg) -> None:
        got.append(msg)
        if (msg.headers or {}).get("Fleetbus-Transfer") == "end":
            ended.set()

    await fleet_nc.subscribe(inbox, cb=on_data)
    reply = await _request(fleet_nc, "get", {"path": str(src), "max_inline": 0, "stream": {"subject": inbox}})
    await asyncio.wait_for(ended.wait(), 10)
    assert reply["ok"] and reply["size"] == 200_000
    data = b"".join(m.data for m in got if m.headers and m.headers.get("Fleetbus-Transfer") == "data")
    assert data == src.read_bytes()


async def test_the_client_and_cli_use_inboxes(fleet: Fleet, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"z" * (3 * 1024 * 1024))  # above 512 KiB: a streamed put and get
    assert fleet.cli("put", "local", str(src), str(tmp_path / "remote.bin")).returncode == 0
    got = fleet.cli("get", "local", str(tmp_path / "remote.bin"), str(tmp_path / "back.bin"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    run = fleet.cli("run", "local", "--", "echo", "live")
    assert run.returncode == 0 and run.stdout == "live\n", run.stderr


@pytest.mark.parametrize("op", ["servers.local.ping", "admin.servers.list"])
async def test_a_reply_subject_outside_the_namespace_gets_no_reply(fleet_nc: NATS, op: str) -> None:
    # The reply of a request is published by fleetbus too: here, into the audit stream
    # as a record about web3 that nobody ran.
    seen = await watch(fleet_nc, "fleetbus.v1.audit.web3.exec")
    await fleet_nc.publish(f"fleetbus.v1.{op}", b"{}", reply="fleetbus.v1.audit.web3.exec")
    # The same endpoint answers in order (the admin service one request at a time).
    assert json.loads((await fleet_nc.request(f"fleetbus.v1.{op}", b"{}", timeout=10)).data)["ok"]
    await _a_later_command_completes(fleet_nc)
    assert seen == [], [m.data for m in seen]


# The client's side: a peer learned from a message ---------------------------------------


@pytest.fixture
async def fake(nats_server: NatsServer) -> AsyncIterator[tuple[Client, NATS, str]]:
    """A client on a plain NATS under its own prefix, and a connection for a fake worker."""
    prefix = "fbdep" + uuid.uuid4().hex[:6]
    worker = await nats.connect(nats_server.url)
    conn = await nats.connect(nats_server.url)
    yield Client(conn, Names(prefix), requester="test"), worker, prefix
    await conn.close()
    await worker.close()


async def _serve(client: Client, worker: NATS, subject: str, cb: Any) -> None:
    await worker.subscribe(subject, cb=cb)
    await worker.flush()
    await client.nc.flush()


async def test_the_client_sends_no_file_where_a_fake_worker_points_it(fake, tmp_path: Path) -> None:
    client, worker, prefix = fake
    target = f"{prefix}.v1.admin.servers.remove"
    seen = await watch(worker, target)

    async def misdirect(msg: Msg) -> None:  # grants credit, naming the admin API as its inbox
        to = json.loads(msg.data)["stream"]["subject"]
        await worker.publish(to, b"", headers={"Fleetbus-Transfer": "credit", "Fleetbus-Credit": str(1 << 20),
                                               "Fleetbus-Subject": target})

    await _serve(client, worker, f"{prefix}.v1.servers.ghost.put", misdirect)
    src = tmp_path / "src.bin"
    src.write_bytes(b"s" * (2 * 1024 * 1024))
    with pytest.raises(TransportError, match="not a worker.s transfer subject"):
        await client.put("ghost", src, "/anywhere", idle_s=5)

    async def misdirect_get(msg: Msg) -> None:  # data whose sender names the admin API for credit
        to = json.loads(msg.data)["stream"]["subject"]
        await worker.publish(to, b"x" * 1000, headers={"Fleetbus-Transfer": "data", "Fleetbus-Seq": "1",
                                                       "Fleetbus-Subject": target})

    await _serve(client, worker, f"{prefix}.v1.servers.ghost.get", misdirect_get)
    with pytest.raises(TransportError, match="not a worker.s transfer subject"):
        await client.get("ghost", "/anywhere", tmp_path / "dest.bin", idle_s=5)
    await worker.flush()
    await client.nc.flush()
    assert seen == []


async def test_a_configured_reply_prefix_serves_clients_with_that_inbox_prefix(tmp_path: Path) -> None:
    stack = Fleet(tmp_path / "home", env={"FLEETBUS_REPLY_PREFIXES": "_INBOX, ci.replies"}).start()
    try:
        nc = await nats.connect(stack.nats_url, user="owner", password=stack.token, inbox_prefix="ci.replies")
        try:
            await _a_later_command_completes(nc)  # live output on ci.replies.<nuid>
            client = Client(nc, Names("fleetbus"), requester="test")
            src = tmp_path / "src.bin"
            src.write_bytes(b"c" * (2 * 1024 * 1024))  # streamed both ways, on ci.replies inboxes
            await client.put("local", src, str(tmp_path / "copy.bin"))
            _, data = await client.get("local", str(tmp_path / "copy.bin"))
            assert data == src.read_bytes()
            reply = await _request(nc, "exec", {"argv": ["true"], "output_subject": "ci.repliesX.y"})
            assert reply["error"]["code"] == "invalid_request"
        finally:
            await nc.close()
    finally:
        stack.stop()


def test_a_reply_prefix_under_fleetbus_subjects_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="reply prefix"):
        Fleet(tmp_path / "home", env={"FLEETBUS_REPLY_PREFIXES": "fleetbus.v1"}).start()
