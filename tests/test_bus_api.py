"""The public bus API, driven with a plain NATS client as another system would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from support.processes import Fleet, pid_alive

S = "fleetbus.v1.servers"


async def test_exec_argv_reply_carries_exit_code_and_output(fleet_nc: NATS, bus) -> None:
    reply = await bus(fleet_nc, f"{S}.local.exec", {"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    assert reply["ok"] is True
    assert reply["exit_code"] == 3
    assert reply["stdout"] == "out\n" and reply["stderr"] == "err\n"
    assert reply["id"] and reply["duration_s"] >= 0


async def test_exec_shell_env_cwd_stdin(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    reply = await bus(fleet_nc, f"{S}.local.exec", {
        "shell": 'printf "%s|%s|" "$GREETING" "$(pwd)"; cat',
        "env": {"GREETING": "hello"}, "cwd": str(tmp_path), "stdin": "from-stdin",
    })
    assert reply["ok"] and reply["stdout"] == f"hello|{tmp_path}|from-stdin"


async def test_live_output_arrives_in_order_with_an_end_marker(fleet_nc: NATS, bus) -> None:
    inbox = fleet_nc.new_inbox()
    got: list[tuple[dict, bytes]] = []
    ended = asyncio.Event()

    async def on_msg(msg) -> None:
        got.append((dict(msg.headers or {}), msg.data))
        if (msg.headers or {}).get("Fleetbus-End"):
            ended.set()

    await fleet_nc.subscribe(inbox, cb=on_msg)
    reply = await bus(fleet_nc, f"{S}.local.exec", {
        "shell": "for i in 1 2 3; do echo line$i; done; echo oops >&2; exit 7",
        "output_subject": inbox,
    })
    await asyncio.wait_for(ended.wait(), 10)
    chunks = [(h, d) for h, d in got if not h.get("Fleetbus-End")]
    stdout = b"".join(d for h, d in chunks if h["Fleetbus-Stream"] == "stdout")
    stderr = b"".join(d for h, d in chunks if h["Fleetbus-Stream"] == "stderr")
    assert stdout == b"line1\nline2\nline3\n" and stderr == b"oops\n"
    seqs = [int(h["Fleetbus-Seq"]) for h, _ in got]
    assert seqs == sorted(seqs)
    end = got[-1][0]
    assert end["Fleetbus-End"] == "1" and end["Fleetbus-Exit-Code"] == "7"
    assert reply["exit_code"] == 7


async def test_output_tail_is_bounded(fleet_nc: NATS, bus) -> None:
    reply = await bus(fleet_nc, f"{S}.local.exec", {"shell": "head -c 300000 /dev/zero | tr '\\0' x"})
    assert reply["ok"] and reply["stdout_truncated"] is True
    assert len(reply["stdout"]) == 64 * 1024


async def test_put_and_get_inline(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "f.txt"
    data = os.urandom(1000)
    reply = await bus(fleet_nc, f"{S}.local.put", {
        "path": str(target), "mode": "0640", "content_b64": base64.b64encode(data).decode(),
    })
    assert reply["ok"] and reply["size"] == 1000 and reply["sha256"] == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data and (target.stat().st_mode & 0o777) == 0o640
    got = await bus(fleet_nc, f"{S}.local.get", {"path": str(target)})
    assert base64.b64decode(got["content_b64"]) == data and got["mode"] == "0640"


async def test_put_refuses_a_wrong_sha256_and_keeps_the_old_file(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    reply = await bus(fleet_nc, f"{S}.local.put", {
        "path": str(target), "content_b64": base64.b64encode(b"new").decode(), "sha256": "0" * 64,
    })
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


async def test_get_large_file_goes_through_the_object_store(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    reply = await bus(fleet_nc, f"{S}.local.get", {"path": str(src)})
    assert reply["ok"] and "content_b64" not in reply and reply["size"] == len(data)
    store = await fleet_nc.jetstream().object_store(reply["bucket"])
    obj = await store.get(reply["object"])  # the standard nats-py reader understands it
    assert obj.data == data and reply["sha256"] == hashlib.sha256(data).hexdigest()


async def test_info_and_ping(fleet_nc: NATS, bus) -> None:
    info = await bus(fleet_nc, f"{S}.local.info", {})
    assert info["ok"] and info["hostname"] and info["transport"] == "local" and info["arch"]
    ping = await bus(fleet_nc, f"{S}.local.ping", b"")
    assert ping["ok"] and ping["latency_s"] >= 0


async def test_unserved_server_fails_fast_with_no_responders(fleet_nc: NATS) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(nats.errors.NoRespondersError):
        await fleet_nc.request(f"{S}.nobody-here.exec", b'{"argv": ["true"]}', timeout=20)
    assert loop.time() - started < 10  # well before the request timeout: not a timeout


@pytest.mark.parametrize(
    "payload, code, words",
    [
        (b"\x00\xff\xfegarbage", "invalid_request", "not valid JSON"),
        (b"{not json", "invalid_request", "not valid JSON"),
        (b"[1,2,3]", "invalid_request", "JSON object"),
        (b'{"argv": ["true"], "bogus": 1}', "invalid_request", "bogus: unknown field"),
        (b'{"argv": "true"}', "invalid_request", "argv"),
        (b'{"argv": ["true"], "timeout_s": "soon"}', "invalid_request", "timeout_s"),
        (b'{}', "invalid_request", "exactly one"),
        (b'{"argv": ["true"], "id": "has spaces"}', "invalid_request", "id"),
        (b'{"argv": ["x' + b"a" * (2 * 1024 * 1024) + b'"]}', "too_large", "limit"),
    ],
)
async def test_bad_input_gets_a_clear_error_and_service_goes_on(
    fleet_nc: NATS, bus, payload: bytes, code: str, words: str
) -> None:
    reply = await bus(fleet_nc, f"{S}.local.exec", payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert words in reply["error"]["message"]
    assert "\n" not in reply["error"]["message"]
    after = await bus(fleet_nc, f"{S}.local.exec", {"argv": ["echo", "still-here"]})
    assert after["ok"] and after["stdout"] == "still-here\n"


async def test_unknown_operation_and_garbage_on_every_subject(fleet_nc: NATS, bus) -> None:
    reply = await bus(fleet_nc, f"{S}.local.explode", {})
    assert reply["error"]["code"] == "invalid_request" and "unknown operation" in reply["error"]["message"]
    for op in ("put", "get", "info", "ping"):
        reply = await bus(fleet_nc, f"{S}.local.{op}", b"\xde\xad\xbe\xef")
        assert reply["error"]["code"] == "invalid_request", op
    admin = await bus(fleet_nc, "fleetbus.v1.admin.servers.add", b"garbage")
    assert admin["ok"] is False and admin["error"]["code"] == "invalid_request"
    assert (await bus(fleet_nc, f"{S}.local.ping", {}))["ok"]


async def test_retried_command_id_runs_once(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    body = {"id": f"retry-{uuid.uuid4().hex}", "shell": f"echo ran >> {marker}; echo $$"}
    first = await bus(fleet_nc, f"{S}.local.exec", body)
    second = await bus(fleet_nc, f"{S}.local.exec", body)
    assert first["ok"] and second == first
    assert marker.read_text() == "ran\n"


async def test_concurrent_retry_waits_for_the_first_run(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    gate = tmp_path / "gate"
    body = {"id": f"race-{uuid.uuid4().hex}",
            "shell": f"echo ran >> {marker}; while [ ! -e {gate} ]; do sleep 0.02; done; echo done"}
    first = asyncio.create_task(bus(fleet_nc, f"{S}.local.exec", body))
    while not marker.exists():
        await asyncio.sleep(0.01)
    second = asyncio.create_task(bus(fleet_nc, f"{S}.local.exec", body))
    await asyncio.sleep(0)  # let the retry reach the host while the first still runs
    gate.touch()
    a, b = await asyncio.gather(first, second)
    assert a["ok"] and a == b and marker.read_text() == "ran\n"


async def test_timeout_kills_the_whole_process_group(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    reply = await bus(fleet_nc, f"{S}.local.exec", {
        "shell": f"sleep 300 & echo $! > {pidfile}; echo started; wait", "timeout_s": 1,
    })
    assert reply["ok"] is False and reply["error"]["code"] == "timeout"
    assert "started" in reply["error"]["details"]["stdout"]
    child = int(pidfile.read_text())
    deadline = asyncio.get_running_loop().time() + 10
    while pid_alive(child):
        assert asyncio.get_running_loop().time() < deadline, "grandchild survived the timeout"
        await asyncio.sleep(0.02)


async def test_cancel_stops_a_running_command(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    command_id = f"cancel-{uuid.uuid4().hex}"
    running = asyncio.create_task(bus(fleet_nc, f"{S}.local.exec", {
        "id": command_id, "shell": f"echo $$ > {pidfile}; exec sleep 300",
    }))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.01)
    ack = await bus(fleet_nc, f"{S}.local.cancel", {"id": command_id})
    assert ack == {"ok": True, "id": command_id, "cancelled": True}
    reply = await asyncio.wait_for(running, 15)
    assert reply["ok"] is False and reply["error"]["code"] == "cancelled"
    pid = int(pidfile.read_text())
    deadline = asyncio.get_running_loop().time() + 10
    while pid_alive(pid):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_per_server_concurrency_limit(fleet: Fleet, fleet_nc: NATS, bus, tmp_path: Path) -> None:
    add = await bus(fleet_nc, "fleetbus.v1.admin.servers.add",
                    {"server": {"name": "serial", "transport": "local", "max_concurrency": 1}})
    assert add["ok"], add
    await _wait_served(fleet_nc, "serial")
    log = tmp_path / "log"
    script = f"echo start >> {log}; sleep 0.3; echo end >> {log}"
    replies = await asyncio.gather(*[bus(fleet_nc, f"{S}.serial.exec", {"shell": script}) for _ in range(3)])
    assert all(r["ok"] for r in replies)
    assert log.read_text().split() == ["start", "end"] * 3  # never two at once


async def _wait_served(nc: NATS, name: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            await nc.request(f"{S}.{name}.ping", b"{}", timeout=5)
            return
        except nats.errors.NoRespondersError:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)


async def test_every_command_is_audited_including_raw_bus_ones(fleet_nc: NATS, bus) -> None:
    marker = f"audit-{uuid.uuid4().hex}"
    await fleet_nc.request(f"{S}.local.exec", json.dumps({"argv": ["echo", marker]}).encode(),
                           timeout=10, headers={"Fleetbus-Requester": "billing-system"})
    bad = await bus(fleet_nc, f"{S}.local.exec", b"garbage")
    js = fleet_nc.jetstream()
    sub = await js.subscribe("fleetbus.v1.audit.local.exec", ordered_consumer=True)
    records = []
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        try:
            msg = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            continue
        records.append(json.loads(msg.data))
        if any(r["id"] == bad["id"] for r in records) and any(marker in (r.get("summary") or "") for r in records):
            break
    await sub.unsubscribe()
    mine = next(r for r in records if marker in (r.get("summary") or ""))
    assert mine["requester"] == "billing-system" and mine["outcome"] == "ok" and mine["exit_code"] == 0
    assert mine["server"] == "local" and mine["transport"] == "local" and mine["duration_s"] >= 0
    garbage = next(r for r in records if r["id"] == bad["id"])
    assert garbage["outcome"] == "invalid_request"


async def test_replies_do_not_echo_the_request_headers(fleet_nc: NATS) -> None:
    # nats-py's Msg.respond() would copy them back: bytes on the wire and a header
    # block every requester parses, for nothing it did not already know.
    msg = await fleet_nc.request(f"{S}.local.ping", b"{}", timeout=10,
                                 headers={"Fleetbus-Requester": "billing-system"})
    assert json.loads(msg.data)["ok"] is True
    assert not msg.headers


async def test_command_id_reused_for_another_request_is_refused(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    cid = f"reuse-{uuid.uuid4().hex}"
    first = await bus(fleet_nc, f"{S}.local.exec", {"id": cid, "argv": ["echo", "one"]})
    assert first["ok"]
    other = await bus(fleet_nc, f"{S}.local.exec", {"id": cid, "argv": ["echo", "two"]})
    assert other["error"]["code"] == "invalid_request" and "different" in other["error"]["message"]
    target = tmp_path / "same-id.txt"
    put = await bus(fleet_nc, f"{S}.local.put", {"id": cid, "path": str(target),
                                                 "content_b64": base64.b64encode(b"x").decode()})
    assert put["ok"] and target.read_bytes() == b"x"  # another op: its own command


async def test_retry_of_a_timed_out_command_replays_its_output(fleet_nc: NATS, bus) -> None:
    cid = f"tmo-{uuid.uuid4().hex}"
    body = {"id": cid, "shell": "echo before-timeout; sleep 30", "timeout_s": 0.5}
    first = await bus(fleet_nc, f"{S}.local.exec", body)
    assert first["error"]["code"] == "timeout"
    inbox = fleet_nc.new_inbox()
    chunks: list[bytes] = []
    ended = asyncio.Event()

    async def on_msg(msg) -> None:
        if (msg.headers or {}).get("Fleetbus-End"):
            assert msg.headers["Fleetbus-Error"] == "timeout"
            ended.set()
        else:
            chunks.append(msg.data)

    await fleet_nc.subscribe(inbox, cb=on_msg)
    again = await bus(fleet_nc, f"{S}.local.exec", {**body, "output_subject": inbox})
    await asyncio.wait_for(ended.wait(), 10)
    assert again == first and b"".join(chunks) == b"before-timeout\n"


async def test_inline_put_over_the_limit_is_too_large(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    data = base64.b64encode(os.urandom(600 * 1024)).decode()
    reply = await bus(fleet_nc, f"{S}.local.put", {"path": str(tmp_path / "big"), "content_b64": data})
    assert reply["error"]["code"] == "too_large" and not (tmp_path / "big").exists()


async def test_a_queued_command_can_be_cancelled(fleet_nc: NATS, bus, tmp_path: Path) -> None:
    add = await bus(fleet_nc, "fleetbus.v1.admin.servers.add",
                    {"server": {"name": "one-slot", "transport": "local", "max_concurrency": 1}})
    assert add["ok"], add
    await _wait_served(fleet_nc, "one-slot")
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    blocker = asyncio.create_task(bus(fleet_nc, f"{S}.one-slot.exec", {
        "shell": f"touch {started}; while [ ! -e {gate} ]; do sleep 0.02; done"}))
    while not started.exists():
        await asyncio.sleep(0.01)
    queued_id = f"queued-{uuid.uuid4().hex}"
    queued = asyncio.create_task(bus(fleet_nc, f"{S}.one-slot.exec", {"id": queued_id, "argv": ["true"]}))
    ack = None
    deadline = asyncio.get_running_loop().time() + 10
    while ack is None:
        try:
            ack = await bus(fleet_nc, f"{S}.one-slot.cancel", {"id": queued_id}, timeout=0.5)
        except nats.errors.TimeoutError:
            assert asyncio.get_running_loop().time() < deadline
    assert ack["cancelled"] is True
    reply = await asyncio.wait_for(queued, 10)
    assert reply["error"]["code"] == "cancelled" and "queued" in reply["error"]["message"]
    gate.touch()
    assert (await blocker)["ok"]


async def test_admin_changes_are_audited_without_secrets(fleet_nc: NATS, bus) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    name = f"aud-{uuid.uuid4().hex[:8]}"
    reply = await bus(fleet_nc, "fleetbus.v1.admin.credentials.add", {
        "name": name, "type": "password", "secret_b64": base64.b64encode(secret.encode()).decode()})
    assert reply["ok"]
    js = fleet_nc.jetstream()
    sub = await js.subscribe("fleetbus.v1.audit._admin.credentials.add", ordered_consumer=True)
    found = None
    while found is None:
        msg = await sub.next_msg(timeout=10)
        assert secret.encode() not in msg.data
        record = json.loads(msg.data)
        if record["server"] == name:
            found = record
    await sub.unsubscribe()
    assert found["outcome"] == "ok" and found["transport"] == "admin"
