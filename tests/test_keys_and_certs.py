"""Agent keys (hashed at rest, constant-time checked), the failure throttle, gateway certs."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest
from fleetbus.certs import GatewayFiles, create_gateway_identity, fingerprint_pem, server_context
from fleetbus.errors import AuthFailed, NotFound
from fleetbus.home import Home
from fleetbus.jetstream import open_state
from fleetbus.keys import AgentKeys, parse_key
from fleetbus.subjects import Names
from fleetbus.vault import MasterKey
from fleetbus_base.throttle import FailureThrottle
from nats.aio.client import Client as NATS


@pytest.fixture
async def keys(nc: NATS, prefix: str) -> AgentKeys:
    return AgentKeys((await open_state(nc, Names(prefix))).agent_keys)


async def test_issue_and_verify(keys: AgentKeys) -> None:
    issued = await keys.issue("web1")
    assert parse_key(issued.key) is not None and issued.key not in repr(issued)
    match = await keys.verify(issued.key)
    assert match.server == "web1" and match.key_id == issued.key_id


async def test_keys_are_stored_only_as_hashes(keys: AgentKeys) -> None:
    issued = await keys.issue("web2")
    secret = issued.key.rsplit("_", 1)[1]
    raw = (await keys.kv.get(f"id.{issued.key_id}")).value
    assert secret.encode() not in raw and issued.key.encode() not in raw


async def test_every_server_gets_its_own_key(keys: AgentKeys) -> None:
    a, b = await keys.issue("a1"), await keys.issue("b1")
    assert a.key != b.key
    assert (await keys.verify(a.key)).server == "a1" and (await keys.verify(b.key)).server == "b1"


@pytest.mark.parametrize("bad", ["", "garbage", "fbk1_0123456789abcdef_" + "A" * 43])
async def test_wrong_keys_fail_without_detail(keys: AgentKeys, bad: str) -> None:
    with pytest.raises(AuthFailed) as info:
        await keys.verify(bad)
    assert info.value.message == "unknown or revoked key"


async def test_tampered_secret_fails(keys: AgentKeys) -> None:
    issued = await keys.issue("web3")
    flipped = issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B")
    with pytest.raises(AuthFailed):
        await keys.verify(flipped)


async def test_rotate_and_revoke(keys: AgentKeys) -> None:
    old = await keys.issue("web4")
    new = await keys.issue("web4")
    with pytest.raises(AuthFailed):
        await keys.verify(old.key)
    assert (await keys.verify(new.key)).server == "web4"
    await keys.revoke("web4")
    with pytest.raises(AuthFailed):
        await keys.verify(new.key)
    with pytest.raises(NotFound):
        await keys.revoke("web4")


def test_throttle_locks_out_and_backs_off() -> None:
    now = [0.0]
    t = FailureThrottle(limit=3, window_s=10, lockout_s=5, max_lockout_s=12, clock=lambda: now[0])
    assert not t.failure("1.2.3.4") and not t.failure("1.2.3.4")
    assert t.failure("1.2.3.4") and t.blocked_for("1.2.3.4") == 5
    assert t.blocked_for("5.6.7.8") == 0  # other addresses are unaffected
    now[0] = 6.0
    assert t.blocked_for("1.2.3.4") == 0
    for _ in range(3):
        t.failure("1.2.3.4")
    assert t.blocked_for("1.2.3.4") == 10  # doubled
    for _ in range(3):
        t.failure("1.2.3.4")
    assert t.blocked_for("1.2.3.4") == 12  # capped
    t.success("1.2.3.4")
    assert t.blocked_for("1.2.3.4") == 0


def test_throttle_memory_is_bounded() -> None:
    t = FailureThrottle(max_tracked=100)
    for i in range(1000):
        t.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(t.snapshot()) == 100


def test_gateway_identity_is_encrypted_and_loads(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.ensure()
    master = MasterKey(os.urandom(32), "test")
    files = create_gateway_identity(home, master, ["gw.example", "127.0.0.1"])
    assert b"ENCRYPTED PRIVATE KEY" in files.key.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in files.ca_key.read_bytes()
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert fingerprint_pem(files.cert.read_bytes()).startswith("sha256:")
    assert isinstance(server_context(files, master), ssl.SSLContext)
    with pytest.raises(ssl.SSLError):
        server_context(files, MasterKey(os.urandom(32), "other"))
    again = create_gateway_identity(home, master)
    assert again.cert.read_bytes() == files.cert.read_bytes()  # kept, not regenerated
    with pytest.raises(NotFound, match="gateway cert"):
        server_context(GatewayFiles(tmp_path / "none"), master)
