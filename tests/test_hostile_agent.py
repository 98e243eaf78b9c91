"""A keyed but hostile outbound agent: it authenticates with a real key, then lies.

The agent here is the real protocol (fleetbus_base.wire) with a handler that
answers with wrong types, so everything between the TLS gateway and the bus reply is
the production code. What it says must never reach a bus reply as it is, never become
``internal``, and never reach an operator's terminal with its control characters.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fleetbus_base.wire import AgentStream, Connection, agent_handshake
from fleetbus_base.wire.frames import encode_frame
from nats.aio.client import Client as NATS
from support.agents import add_agent_server, gateway_of
from support.processes import FLEETBUS, Fleet

Answer = Callable[[AgentStream], Awaitable[Any]]
EVIL_AGENT = "x\x1b]0;pwned\x07\x1b[2J"


def done(result: Any) -> Answer:
    """Finish the stream with ``result`` as sent, whatever its type."""

    async def answer(stream: AgentStream) -> None:
        stream._end({"t": "done", "s": stream.id, "result": result})

    return answer


def fail(code: str, message: str) -> Answer:
    async def answer(stream: AgentStream) -> None:
        await stream.fail(code, message)

    return answer


def meta(size: Any, mode: Any = None) -> Answer:
    async def answer(stream: AgentStream) -> dict[str, Any]:
        await stream.send_meta(size, mode)
        return {"size": 0}

    return answer


def output_on(name: str) -> Answer:
    async def answer(stream: AgentStream) -> dict[str, Any]:
        stream.conn._enqueue_data(stream.id, encode_frame({"t": "out", "s": stream.id, "stream": name}, b"hi"), 2)
        return {"exit_code": 0, "signal": None}

    return answer


class Script:
    """What the hostile agent answers next, per operation (ping is always honest)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}

    async def __call__(self, stream: AgentStream) -> Any:
        if stream.op == "ping":
            return {}
        return await self.answers[stream.op](stream)


async def _connect(fleet: Fleet, key: str, script: Script, agent: str) -> Connection:
    host, port = gateway_of(fleet)["address"].rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="localhost")
    welcome = await agent_handshake(reader, writer, {"method": "key", "key": key}, {}, agent=agent)
    conn = Connection.from_welcome(reader, writer, welcome, on_open=script)
    conn.start()
    return conn


async def _bus(nc: NATS, server: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(f"fleetbus.v1.servers.{server}.{op}", json.dumps(body).encode(), timeout=30)
    return json.loads(msg.data)


async def _wait_online(nc: NATS, server: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await _bus(nc, server, "ping", {}))["ok"]:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server} did not come online")
        await asyncio.sleep(0.05)


async def _cli(fleet: Fleet, *args: str) -> tuple[int, bytes, bytes]:
    """The CLI without blocking the loop the hostile agent answers on."""
    proc = await asyncio.create_subprocess_exec(FLEETBUS, *args, env=fleet.environ(),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.fixture
async def hostile(fleet: Fleet, fleet_nc: NATS, request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Script]]:
    name = "hostile-" + request.node.name.split("[")[0][-20:].replace("_", "-").strip("-")
    key = add_agent_server(fleet, name)
    script = Script()
    conn = await _connect(fleet, key, script, EVIL_AGENT)
    try:
        await _wait_online(fleet_nc, name)
        yield name, script
    finally:
        await conn.close("test over")


WRONG_RESULTS: list[tuple[str, dict[str, Any], Answer]] = [
    ("exec", {"argv": ["true"]}, done({"exit_code": "rm -rf /", "signal": None})),
    ("exec", {"argv": ["true"]}, done({"exit_code": True, "signal": None})),
    ("exec", {"argv": ["true"]}, done({"exit_code": 1.5, "signal": None})),
    ("exec", {"argv": ["true"]}, done({"exit_code": None, "signal": "KILL"})),
    ("exec", {"argv": ["true"]}, done({"signal": None})),
    ("exec", {"argv": ["true"]}, done(["exit", 0])),
    ("exec", {"argv": ["true"]}, output_on("evil")),
    ("put", {"path": "/tmp/x", "content_b64": "aGk="}, done({"size": "2", "mode": None})),
    ("put", {"path": "/tmp/x", "content_b64": "aGk="}, done({"size": -2, "mode": None})),
    ("put", {"path": "/tmp/x", "content_b64": "aGk="}, done({"size": 2, "mode": "0644"})),
    ("put", {"path": "/tmp/x", "content_b64": "aGk="}, done({"size": 2, "mode": 0o77777})),
    ("put", {"path": "/tmp/x", "content_b64": "aGk="}, done("written")),
    ("get", {"path": "/tmp/x"}, meta("huge")),
    ("get", {"path": "/tmp/x"}, meta(-1)),
    ("get", {"path": "/tmp/x"}, meta(3, 0o77777)),
    ("info", {}, done({"hostname": {"name": "h"}})),
    ("info", {}, done({"hostname": "h" * 10_000})),
    ("info", {}, done({"uptime_s": "forever"})),
    ("info", {}, done({"extra": "x"})),
    ("info", {}, done({"extra": {"k": ["nested"]}})),
    ("info", {}, done({"extra": {f"k{i}": i for i in range(1000)}})),
    ("info", {}, done(7)),
    ("info", {}, fail("internal", "agent blew up")),
    ("info", {}, fail("made_up_code", "who knows")),
]


async def test_results_of_the_wrong_type_are_transport_errors(hostile, fleet_nc: NATS) -> None:
    name, script = hostile
    for i, (op, body, answer) in enumerate(WRONG_RESULTS):
        script.answers[op] = answer
        reply = await _bus(fleet_nc, name, op, body)
        case = f"WRONG_RESULTS[{i}] ({op}): {reply}"
        assert reply["ok"] is False, case
        assert reply["error"]["code"] == "transport_error", case
        assert "rm -rf" not in json.dumps(reply), case
    # The link survived all of it, and a well-typed answer still goes through as it is.
    script.answers["exec"] = done({"exit_code": 3, "signal": None})
    reply = await _bus(fleet_nc, name, "exec", {"argv": ["true"]})
    assert reply["ok"] and reply["exit_code"] == 3 and reply["signal"] is None
    script.answers["info"] = done({"hostname": "h1", "os": "Linux", "uptime_s": 12,
                                   "extra": {"agent_version": "9", "user": "u"}})
    reply = await _bus(fleet_nc, name, "info", {})
    assert reply["ok"] and reply["hostname"] == "h1" and reply["extra"] == {"agent_version": "9", "user": "u"}


async def test_a_signal_and_an_agent_error_keep_their_meaning(hostile, fleet_nc: NATS) -> None:
    name, script = hostile
    script.answers["exec"] = done({"exit_code": None, "signal": 9})
    reply = await _bus(fleet_nc, name, "exec", {"argv": ["true"]})
    assert reply["ok"] and reply["exit_code"] is None and reply["signal"] == 9
    script.answers["get"] = fail("not_found", "no such file")
    reply = await _bus(fleet_nc, name, "get", {"path": "/nope"})
    assert reply["error"] == {"code": "not_found", "message": "no such file"}


async def test_an_agent_version_with_escapes_is_shown_escaped(hostile, fleet: Fleet, tmp_path: Path) -> None:
    name, _ = hostile
    code, out, err = await _cli(fleet, "servers", "list")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith(name.encode()))
    assert b"\x1b" not in out and b"\x07" not in out
    assert b"x\\x1b]0;pwned\\x07\\x1b[2J" in line
    code, out, _ = await _cli(fleet, "servers", "show", name)
    assert code == 0 and b"\x1b" not in out and b"\x07" not in out
    # Escaped where it was recorded too, so no other reader of the status sees the bytes.
    code, out, _ = await _cli(fleet, "servers", "list", "--json")
    status = next(s["status"] for s in json.loads(out) if s["name"] == name)
    assert status["agent_version"] == "x\\x1b]0;pwned\\x07\\x1b[2J"


def test_the_cli_escapes_what_the_registry_holds(fleet: Fleet) -> None:
    # Stored as given (a description is free text), escaped when shown: the rendering
    # is the last line of defence for every field, not only the status.
    add = fleet.cli("servers", "add", "described", "--transport", "local", "--replace",
                    "--description", "ok\x1b[31mred\x1b]8;;http://x\x07link\u202e")
    assert add.returncode == 0, add.stderr
    shown = fleet.cli("servers", "show", "described")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout and "\u202e" not in shown.stdout
    assert "ok\\x1b[31mred\\x1b]8;;http://x\\x07link\\u202e" in shown.stdout
    listed = fleet.cli("servers", "list", "--json")  # JSON escapes control characters itself
    assert "\x1b" not in listed.stdout
    assert any(s.get("description") == "ok\x1b[31mred\x1b]8;;http://x\x07link\u202e"
               for s in json.loads(listed.stdout))
