"""Hostile bodies on the bus get ``invalid_request``, never ``internal`` or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from support.processes import Fleet

DEEP = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    # Under the JSON parser's own limit, deep enough for a model or a later json.dumps.
    b'{"server": {"name": "deep", "transport": "local", "options": {"x": '
    + b"[" * 900 + b"]" * 900 + b"}}}",
]


@pytest.mark.parametrize("subject", ["fleetbus.v1.servers.local.exec", "fleetbus.v1.servers.local.put",
                                     "fleetbus.v1.admin.servers.add", "fleetbus.v1.admin.credentials.add"])
async def test_deeply_nested_json_is_an_invalid_request(fleet: Fleet, fleet_nc: NATS, subject: str) -> None:
    for body in DEEP:
        reply = json.loads((await fleet_nc.request(subject, body, timeout=30)).data)
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
        assert "nests deeper than 32" in reply["error"]["message"]
    log = fleet.output()
    assert "RecursionError" not in log and "Traceback" not in log


@pytest.mark.parametrize("mode", ["-0", "0o777", "  0644", "+644", "0644 ", "0644\n"])
async def test_loose_mode_strings_write_nothing(fleet_nc: NATS, tmp_path: Path, mode: str) -> None:
    target = tmp_path / "file"
    body = {"path": str(target), "mode": mode, "content_b64": "aGk="}
    msg = await fleet_nc.request("fleetbus.v1.servers.local.put", json.dumps(body).encode(), timeout=30)
    reply = json.loads(msg.data)
    assert reply["error"]["code"] == "invalid_request" and "mode" in reply["error"]["message"], reply
    assert not target.exists()


async def test_a_strict_mode_string_is_applied(fleet_nc: NATS, tmp_path: Path) -> None:
    target = tmp_path / "file"
    body = {"path": str(target), "mode": "0640", "content_b64": "aGk="}
    reply = json.loads((await fleet_nc.request("fleetbus.v1.servers.local.put",
                                               json.dumps(body).encode(), timeout=30)).data)
    assert reply["ok"] and reply["mode"] == "0640" and (target.stat().st_mode & 0o7777) == 0o640


async def test_a_subject_with_a_trailing_newline_keeps_fleetbus_connected(fleet_nc: NATS) -> None:
    # "\n" would end fleetbus's protocol line early: NATS would close its connection.
    body = {"argv": ["echo", "x"], "output_subject": fleet_nc.new_inbox() + "\n"}
    reply = json.loads((await fleet_nc.request("fleetbus.v1.servers.local.exec",
                                               json.dumps(body).encode(), timeout=30)).data)
    assert reply["error"]["code"] == "invalid_request"
    again = json.loads((await fleet_nc.request("fleetbus.v1.servers.local.exec",
                                               b'{"argv": ["echo", "y"]}', timeout=30)).data)
    assert again["ok"] and again["stdout"] == "y\n"
