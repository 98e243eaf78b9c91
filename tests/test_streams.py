"""Streamed put/get: content sent straight between the requester and the worker.

Most tests speak the documented message protocol (docs/bus-api.md, "Streamed
transfers") with a plain NATS client against a real `fleetbus up`, so they also check
that another system can use it; the rest drive the Python client, against the real
stack or against a fake worker that misbehaves on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from fleetbus.client import Client
from fleetbus.connection import NatsSettings
from fleetbus.errors import InvalidRequest, Timeout, TransportError
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.pagecache import require_droppable_cache, resident_fraction
from support.processes import Fleet, NatsServer
from support.transfermsgs import Inbox, send

S = "fleetbus.v1.servers.local"
KIB = 1024
MIB = 1024 * 1024


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".fleetbus-" in p.name]




def request(nc: NATS, op: str, body: dict[str, Any], timeout: float = 60) -> asyncio.Task[dict[str, Any]]:
    async def run() -> dict[str, Any]:
        msg = await nc.request(f"{S}.{op}", json.dumps(body).encode(), timeout=timeout)
        return json.loads(msg.data)

    return asyncio.ensure_future(run())


async def raw_put(nc: NATS, path: Path, content: bytes, chunk: int = 256 * KIB, **stream: Any) -> dict[str, Any]:
    """A put streamed by hand, the way the docs describe it."""
    inbox = await Inbox(nc).start()
    reply = request(nc, "put", {"path": str(path), "stream": {"subject": inbox.subject, "size": len(content), **stream}})
    credit, to = 0, None
    for seq, offset in enumerate(range(0, len(content), chunk), start=1):
        piece = content[offset : offset + chunk]
        while credit <= 0:
            msg = await inbox.next("credit")
            credit += int(msg.headers["Fleetbus-Credit"])
            to = msg.headers["Fleetbus-Subject"]
        await send(nc, to, "data", piece, **{"Fleetbus-Seq": str(seq)})
        credit -= len(piece)
    if to is None:  # an empty file still needs the worker's subject
        to = (await inbox.next("credit")).headers["Fleetbus-Subject"]
    await send(nc, to, "end", **{"Fleetbus-Size": str(len(content)),
                                 "Fleetbus-Sha256": hashlib.sha256(content).hexdigest()})
    return await reply


async def test_documented_protocol_put_and_get_round_trip(fleet_nc: NATS, tmp_path: Path) -> None:
    content = os.urandom(3 * MIB + 17)
    dest = tmp_path / "sub" / "file.bin"
    reply = await raw_put(fleet_nc, dest, content)
    assert reply["ok"], reply
    assert reply["size"] == len(content) and reply["sha256"] == hashlib.sha256(content).hexdigest()
    assert dest.read_bytes() == content

    inbox = await Inbox(fleet_nc).start()
    got = request(fleet_nc, "get", {"path": str(dest), "stream": {"subject": inbox.subject, "window": 8 * MIB}})
    data, seq = bytearray(), 0
    while True:
        msg = await inbox.next()
        kind = msg.headers["Fleetbus-Transfer"]
        if kind == "data":
            seq += 1
            assert int(msg.headers["Fleetbus-Seq"]) == seq
            if seq == 1:
                assert int(msg.headers["Fleetbus-Size"]) == len(content)
            data += msg.data
        elif kind == "end":
            assert int(msg.headers["Fleetbus-Size"]) == len(content)
            assert msg.headers["Fleetbus-Sha256"] == hashlib.sha256(content).hexdigest()
            break
    reply = await got
    assert reply["ok"] and reply["size"] == len(content) and reply["mode"] == "0644"
    assert reply["sha256"] == hashlib.sha256(content).hexdigest() and bytes(data) == content


async def test_small_file_with_a_stream_comes_back_inline(fleet_nc: NATS, tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"tiny")
    reply = await request(fleet_nc, "get", {"path": str(tmp_path / "small"),
                                            "stream": {"subject": fleet_nc.new_inbox()}})
    assert base64.b64decode(reply["content_b64"]) == b"tiny"


async def test_get_sends_no_more_than_the_granted_window(fleet_nc: NATS, tmp_path: Path) -> None:
    content = os.urandom(4 * MIB)
    (tmp_path / "big").write_bytes(content)
    window = 256 * KIB
    inbox = await Inbox(fleet_nc).start()
    got = request(fleet_nc, "get", {"path": str(tmp_path / "big"),
                                    "stream": {"subject": inbox.subject, "window": window}})
    data = bytearray()
    credit_to = None
    while len(data) < window:
        msg = await inbox.next("data")
        data += msg.data
        credit_to = msg.headers["Fleetbus-Subject"]
    # Without more credit the worker sends nothing but keepalives: prove it by asking
    # the worker a question it can only answer after everything it sent before.
    await asyncio.wait_for(request(fleet_nc, "ping", {}), 30)
    while not inbox.queue.empty():
        msg = inbox.queue.get_nowait()
        assert msg.headers["Fleetbus-Transfer"] == "alive", "data beyond the window"
    assert len(data) == window
    await send(fleet_nc, credit_to, "credit", **{"Fleetbus-Credit": str(len(content))})
    while True:
        msg = await inbox.next()
        if msg.headers["Fleetbus-Transfer"] == "end":
            break
        data += msg.data
    assert (await got)["ok"] and bytes(data) == content


async def test_stalled_put_requester_times_out_and_leaves_no_file(fleet_nc: NATS, tmp_path: Path) -> None:
    dest = tmp_path / "stalled.bin"
    dest.write_bytes(b"old content")
    inbox = await Inbox(fleet_nc).start()
    reply = request(fleet_nc, "put", {"path": str(dest), "stream": {"subject": inbox.subject, "size": 4 * MIB,
                                                                   "idle_s": 1}})
    credit = await inbox.next("credit")
    await send(fleet_nc, credit.headers["Fleetbus-Subject"], "data", b"x" * 1000, **{"Fleetbus-Seq": "1"})
    # While this transfer waits for us, the worker serves other commands on the server.
    other = await request(fleet_nc, "exec", {"argv": ["echo", "still served"]})
    assert other["ok"] and other["stdout"] == "still served\n"
    assert not reply.done()
    result = await reply
    assert result["error"]["code"] == "timeout", result
    assert "no message from the requester" in result["error"]["message"]
    assert dest.read_bytes() == b"old content" and no_temp_files(tmp_path)


async def test_stalled_get_requester_times_out_and_frees_the_worker(fleet_nc: NATS, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(os.urandom(2 * MIB))
    inbox = await Inbox(fleet_nc).start()
    reply = await request(fleet_nc, "get", {"path": str(tmp_path / "big"), "stream": {
        "subject": inbox.subject, "window": 64 * KIB, "idle_s": 1}})
    assert reply["error"]["code"] == "timeout", reply
    assert (await request(fleet_nc, "ping", {}))["ok"]


async def test_content_not_matching_its_sha256_never_replaces_the_file(fleet_nc: NATS, tmp_path: Path) -> None:
    dest = tmp_path / "keep.bin"
    dest.write_bytes(b"original")
    inbox = await Inbox(fleet_nc).start()
    reply = request(fleet_nc, "put", {"path": str(dest), "stream": {"subject": inbox.subject}})
    to = (await inbox.next("credit")).headers["Fleetbus-Subject"]
    await send(fleet_nc, to, "data", b"a" * (1 * MIB), **{"Fleetbus-Seq": "1"})
    await send(fleet_nc, to, "end", **{"Fleetbus-Size": str(MIB), "Fleetbus-Sha256": "0" * 64})
    result = await reply
    assert result["error"]["code"] == "invalid_request" and "sha256" in result["error"]["message"]
    assert dest.read_bytes() == b"original" and no_temp_files(tmp_path)


async def test_a_lost_message_fails_the_put(fleet_nc: NATS, tmp_path: Path) -> None:
    dest = tmp_path / "gap.bin"
    inbox = await Inbox(fleet_nc).start()
    reply = request(fleet_nc, "put", {"path": str(dest), "stream": {"subject": inbox.subject}})
    to = (await inbox.next("credit")).headers["Fleetbus-Subject"]
    await send(fleet_nc, to, "data", b"1" * 1000, **{"Fleetbus-Seq": "1"})
    await send(fleet_nc, to, "data", b"3" * 1000, **{"Fleetbus-Seq": "3"})
    result = await reply
    assert result["error"]["code"] == "transport_error" and "lost" in result["error"]["message"]
    assert not dest.exists() and no_temp_files(tmp_path)


async def test_size_other_than_announced_fails_the_put(fleet_nc: NATS, tmp_path: Path) -> None:
    dest = tmp_path / "short.bin"
    inbox = await Inbox(fleet_nc).start()
    reply = request(fleet_nc, "put", {"path": str(dest), "stream": {"subject": inbox.subject, "size": 5000}})
    to = (await inbox.next("credit")).headers["Fleetbus-Subject"]
    await send(fleet_nc, to, "data", b"x" * 1000, **{"Fleetbus-Seq": "1"})
    await send(fleet_nc, to, "end", **{"Fleetbus-Size": "1000"})
    result = await reply
    assert result["error"]["code"] == "transport_error", result
    assert not dest.exists() and no_temp_files(tmp_path)


async def test_requester_abort_and_cancel_end_the_transfer(fleet_nc: NATS, tmp_path: Path) -> None:
    dest = tmp_path / "aborted.bin"
    inbox = await Inbox(fleet_nc).start()
    reply = request(fleet_nc, "put", {"path": str(dest), "stream": {"subject": inbox.subject}})
    to = (await inbox.next("credit")).headers["Fleetbus-Subject"]
    await send(fleet_nc, to, "abort", b"disk on fire", **{"Fleetbus-Error": "transport_error"})
    result = await reply
    # The requester's own code never passes for the worker's: it cancelled its command.
    assert result["error"]["code"] == "cancelled" and "disk on fire" in result["error"]["message"]

    command = uuid.uuid4().hex
    inbox = await Inbox(fleet_nc).start()
    reply = request(fleet_nc, "put", {"id": command, "path": str(dest),
                                      "stream": {"subject": inbox.subject}})
    await inbox.next("credit")
    cancel = await fleet_nc.request(f"{S}.cancel", json.dumps({"id": command}).encode(), timeout=10)
    assert json.loads(cancel.data)["cancelled"] is True
    assert (await reply)["error"]["code"] == "cancelled"
    abort = await inbox.next("abort")  # the worker tells the requester to stop sending
    assert abort.headers["Fleetbus-Error"] == "cancelled"
    assert not dest.exists() and no_temp_files(tmp_path)


async def test_retry_waiting_for_a_running_put_keeps_its_requester_alive(fleet_nc: NATS, tmp_path: Path) -> None:
    dest = tmp_path / "retried.bin"
    command = uuid.uuid4().hex
    first_inbox = await Inbox(fleet_nc).start()
    first = request(fleet_nc, "put", {"id": command, "path": str(dest),
                                      "stream": {"subject": first_inbox.subject, "size": 2000}})
    to = (await first_inbox.next("credit")).headers["Fleetbus-Subject"]
    await send(fleet_nc, to, "data", b"a" * 1000, **{"Fleetbus-Seq": "1"})
    # The same put again (another inbox, as a retrying client would use) waits for the
    # first run, and meanwhile tells its requester it is alive instead of going silent.
    retry_inbox = await Inbox(fleet_nc).start()
    retry = request(fleet_nc, "put", {"id": command, "path": str(dest),
                                      "stream": {"subject": retry_inbox.subject, "size": 2000}})
    await retry_inbox.next("alive")
    await send(fleet_nc, to, "data", b"b" * 1000, **{"Fleetbus-Seq": "2"})
    await send(fleet_nc, to, "end", **{"Fleetbus-Size": "2000"})
    reply = await first
    assert reply["ok"] and dest.read_bytes() == b"a" * 1000 + b"b" * 1000
    assert await retry == reply
    while not retry_inbox.queue.empty():  # the retry never asked for content
        assert retry_inbox.queue.get_nowait().headers["Fleetbus-Transfer"] == "alive"


async def test_stream_and_object_are_exclusive(fleet_nc: NATS, tmp_path: Path) -> None:
    reply = await request(fleet_nc, "put", {"path": str(tmp_path / "x"), "object": "a",
                                            "stream": {"subject": "x.y"}})
    assert reply["error"]["code"] == "invalid_request"
    reply = await request(fleet_nc, "get", {"path": str(tmp_path / "x"), "object": "a",
                                            "stream": {"subject": "x.y"}})
    assert reply["error"]["code"] == "invalid_request"
    reply = await request(fleet_nc, "get", {"path": str(tmp_path / "x"),
                                            "stream": {"subject": "x.*"}})
    assert reply["error"]["code"] == "invalid_request"


# The Python client -------------------------------------------------------------------


@pytest.fixture
async def client(fleet: Fleet):
    c = await Client.connect(NatsSettings(url=fleet.nats_url, token=fleet.token), requester="test")
    yield c
    await c.close()


@pytest.mark.parametrize("via", ["stream", "object"])
async def test_client_put_and_get_any_size(client: Client, tmp_path: Path, via: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5 * MIB + 3))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    seen: list[tuple[int, int]] = []
    reply = await client.put("local", src, str(tmp_path / "remote.bin"), mode=0o600, via=via,
                             progress=lambda done, total: seen.append((done, total)))
    assert reply["sha256"] == digest and reply["mode"] == "0600"
    assert seen[-1] == (src.stat().st_size, src.stat().st_size)
    back = tmp_path / "back.bin"
    reply, data = await client.get("local", str(tmp_path / "remote.bin"), back, via=via)
    assert data is None and reply["sha256"] == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    reply, data = await client.get("local", str(tmp_path / "remote.bin"), via=via)
    assert data is not None and hashlib.sha256(data).hexdigest() == digest
    reply = await client.put("local", data, str(tmp_path / "from-bytes.bin"), via=via)  # stdin's way
    assert reply["sha256"] == digest and (tmp_path / "from-bytes.bin").read_bytes() == data
    assert no_temp_files(tmp_path)


async def test_client_get_keeps_a_large_download_out_of_the_page_cache(
        client: Client, tmp_path: Path) -> None:
    require_droppable_cache(tmp_path)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(48 * MIB))
    back = tmp_path / "back.bin"
    reply, _ = await client.get("local", str(src), back)
    # Asked before reading it back, which would cache it again.
    assert resident_fraction(back) < 0.05
    assert reply["sha256"] == hashlib.sha256(back.read_bytes()).hexdigest()


async def test_client_retry_of_a_streamed_put_is_not_run_twice(client: Client, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * MIB))
    dest = tmp_path / "once.bin"
    command = uuid.uuid4().hex
    first = await client.put("local", src, str(dest), command_id=command)
    dest.write_bytes(b"changed since")
    again = await client.put("local", src, str(dest), command_id=command)
    assert again == first and dest.read_bytes() == b"changed since"


async def test_client_get_of_a_missing_file_leaves_nothing(client: Client, tmp_path: Path) -> None:
    from fleetbus.errors import NotFound

    with pytest.raises(NotFound):
        await client.get("local", str(tmp_path / "missing"), tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# A worker that misbehaves -----------------------------------------------------------------


@pytest.fixture
async def fake(nats_server: NatsServer):
    """A client on a plain NATS under its own prefix, and that NATS for a fake worker."""
    prefix = "fbfake" + uuid.uuid4().hex[:6]
    worker = await nats.connect(nats_server.url)
    conn = await nats.connect(nats_server.url)
    yield Client(conn, Names(prefix), requester="test"), worker, f"{prefix}.v1.servers.ghost"
    await conn.close()
    await worker.close()


async def serve(client: Client, worker: NATS, subject: str, cb: Any) -> None:
    """Subscribe the fake worker, and wait until the client's connection reaches it.

    A flush on the worker's side was not enough: about one run in ten, right after the
    previous test's connections closed, nats-server answered the client's next request
    with "no responders" although the subscription had been flushed. So wait for the
    condition itself: a probe on the same connection answered, within a deadline.
    """
    await worker.subscribe(subject, cb=cb)

    async def pong(msg: Msg) -> None:
        await msg.respond(b"")

    await worker.subscribe(subject + ".probe", cb=pong)
    await worker.flush()
    async with asyncio.timeout(10):
        while True:
            try:
                await client.nc.request(subject + ".probe", b"", timeout=1)
                return
            except nats.errors.NoRespondersError:
                await worker.flush()


async def test_client_put_to_a_vanished_worker_times_out(fake, tmp_path: Path) -> None:
    client, worker, subject = fake

    async def vanish(msg: Msg) -> None:  # grants a little, then never speaks again
        to = json.loads(msg.data)["stream"]["subject"]
        await send(worker, to, "credit", **{"Fleetbus-Credit": str(64 * KIB),
                                            "Fleetbus-Subject": client.names.xfer(uuid.uuid4().hex)})

    await serve(client, worker, f"{subject}.put", vanish)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * MIB))
    with pytest.raises(Timeout, match="no message from the worker"):
        await client.put("ghost", src, "/nowhere", idle_s=1)


async def test_client_get_from_a_vanished_worker_times_out_and_keeps_dest(fake, tmp_path: Path) -> None:
    client, worker, subject = fake

    async def vanish(msg: Msg) -> None:  # one chunk, then silence
        to = json.loads(msg.data)["stream"]["subject"]
        await send(worker, to, "data", b"partial", **{"Fleetbus-Seq": "1", "Fleetbus-Subject": client.names.xfer(uuid.uuid4().hex)})

    await serve(client, worker, f"{subject}.get", vanish)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"previous download")
    with pytest.raises(Timeout, match="no message from the worker"):
        await client.get("ghost", "/somewhere", dest, idle_s=1)
    assert dest.read_bytes() == b"previous download"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest.bin"]


async def test_client_refuses_a_get_whose_content_does_not_match(fake, tmp_path: Path) -> None:
    client, worker, subject = fake

    async def corrupt(msg: Msg) -> None:
        to = json.loads(msg.data)["stream"]["subject"]
        await send(worker, to, "data", b"content", **{"Fleetbus-Seq": "1", "Fleetbus-Subject": client.names.xfer(uuid.uuid4().hex)})
        await send(worker, to, "end", **{"Fleetbus-Size": "7", "Fleetbus-Sha256": "f" * 64})
        await msg.respond(json.dumps({"ok": True, "id": "x", "path": "/p", "size": 7, "sha256": "f" * 64,
                                      "mode": None}).encode())

    await serve(client, worker, f"{subject}.get", corrupt)
    with pytest.raises(InvalidRequest, match="sha256"):
        await client.get("ghost", "/p", tmp_path / "dest.bin")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("named", ["_INBOX.worker", "{p}.v1.servers.other.exec", "{p}.v1.admin.servers.remove",
                                   "{p}.v1.xfer.one.two", "fleetbus.v1.xfer.elsewhere", "{p}.v1.xfer."])
async def test_client_sends_only_to_a_worker_transfer_subject(fake, tmp_path: Path, named: str) -> None:
    # The first credit names where the data goes; anything but one token under this
    # deployment's xfer root (an inbox, another server's command, an admin subject,
    # another deployment's transfer) would have the client publish the file there.
    client, worker, subject = fake
    named = named.format(p=client.names.prefix)
    seen: list[Msg] = []

    async def on_misdirected(msg: Msg) -> None:
        seen.append(msg)

    await worker.subscribe(named.rstrip("."), cb=on_misdirected)

    async def mislead(msg: Msg) -> None:
        to = json.loads(msg.data)["stream"]["subject"]
        await send(worker, to, "credit", **{"Fleetbus-Credit": str(4 * MIB), "Fleetbus-Subject": named})

    await serve(client, worker, f"{subject}.put", mislead)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * MIB))
    with pytest.raises(TransportError, match="not a worker's transfer subject"):
        await client.put("ghost", src, "/nowhere", idle_s=5)
    await worker.flush()
    assert seen == []
