"""The plugin host's short ways on the command path (core/fleetbus/commandrun.py) answer
as the long way does: a ping or info with an empty body skips the JSON parse and the
model, and any other body still goes through both."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

S = "fleetbus.v1.servers"


@pytest.mark.parametrize("op", ["ping", "info"])
@pytest.mark.parametrize("body", [b"{}", b""])
async def test_an_empty_ping_or_info_is_answered(fleet_nc: NATS, bus, op: str, body: bytes) -> None:
    reply = await bus(fleet_nc, f"{S}.local.{op}", body)
    assert reply["ok"] and reply["transport"] == "local" and reply["id"], reply


@pytest.mark.parametrize("op", ["ping", "info"])
async def test_a_ping_or_info_with_a_body_is_still_validated(fleet_nc: NATS, bus, op: str) -> None:
    refused = await bus(fleet_nc, f"{S}.local.{op}", b'{"bogus": 1}')
    assert not refused["ok"] and refused["error"]["code"] == "invalid_request", refused
    assert "bogus: unknown field" in refused["error"]["message"]
    named = await bus(fleet_nc, f"{S}.local.{op}", {"id": f"{op}-given-id"})
    assert named["ok"] and named["id"] == f"{op}-given-id", named
