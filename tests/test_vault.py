"""The credential vault against a real JetStream KV bucket."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from fleetbus.errors import AuthFailed, InvalidRequest, NotFound
from fleetbus.home import Home
from fleetbus.jetstream import open_state
from fleetbus.records import CredentialInfo
from fleetbus.subjects import Names
from fleetbus.vault import MasterKey, Vault
from nats.aio.client import Client as NATS

SECRET = b"hunter2-correct-horse-battery-staple"


@pytest.fixture
async def state(nc: NATS, prefix: str):
    return await open_state(nc, Names(prefix))


def key(byte: int) -> MasterKey:
    return MasterKey(bytes([byte]) * 32, "test")


async def test_seal_and_open_round_trip(state) -> None:
    vault = Vault(state.credentials, key(1))
    await vault.add(CredentialInfo(name="db", type="password", user="ops"), SECRET)
    cred = await vault.get("db")
    assert cred.secret == SECRET and cred.user == "ops" and cred.type == "password"
    assert SECRET.decode() not in repr(cred)
    assert [c.name for c in await vault.list()] == ["db"]


async def test_bucket_dump_shows_no_secret(state) -> None:
    vault = Vault(state.credentials, key(2))
    await vault.add(CredentialInfo(name="k", type="ssh-key", user="deploy"), SECRET, b"passphrase-xyz")
    raw = (await state.credentials.get("k")).value
    for needle in (SECRET, base64.b64encode(SECRET), b"passphrase-xyz", base64.b64encode(b"passphrase-xyz")):
        assert needle not in raw
    assert b"deploy" in raw  # metadata stays readable


async def test_ciphertext_is_bound_to_its_name(state) -> None:
    vault = Vault(state.credentials, key(3))
    await vault.add(CredentialInfo(name="a", type="token"), SECRET)
    raw = (await state.credentials.get("a")).value
    moved = raw.replace(b'"name":"a"', b'"name":"b"')
    await state.credentials.put("b", moved)
    with pytest.raises(AuthFailed, match="altered"):
        await vault.get("b")


async def test_wrong_master_key_is_a_clear_error(state) -> None:
    await Vault(state.credentials, key(4)).add(CredentialInfo(name="c", type="token"), SECRET)
    with pytest.raises(AuthFailed, match="another master key") as info:
        await Vault(state.credentials, key(5)).get("c")
    assert SECRET.decode() not in str(info.value)


async def test_duplicate_missing_and_remove(state) -> None:
    vault = Vault(state.credentials, key(6))
    await vault.add(CredentialInfo(name="d", type="token"), SECRET)
    with pytest.raises(InvalidRequest, match="exists"):
        await vault.add(CredentialInfo(name="d", type="token"), SECRET)
    await vault.add(CredentialInfo(name="d", type="token"), b"new", replace=True)
    assert (await vault.get("d")).secret == b"new"
    await vault.remove("d")
    with pytest.raises(NotFound):
        await vault.get("d")
    with pytest.raises(InvalidRequest, match="empty"):
        await vault.add(CredentialInfo(name="e", type="token"), b"")


def test_master_key_file_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETBUS_MASTER_KEY", raising=False)
    home = Home(tmp_path / "home")
    first = MasterKey.load(home)
    assert stat.S_IMODE(os.stat(home.master_key).st_mode) == 0o600
    assert MasterKey.load(home).key == first.key  # reused, not regenerated
    assert first.key.hex() not in repr(first)
    os.chmod(home.master_key, 0o644)
    with pytest.raises(InvalidRequest, match="chmod 600"):
        MasterKey.load(home)


def test_master_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_MASTER_KEY", base64.b64encode(b"k" * 32).decode())
    assert MasterKey.load(Home(tmp_path), create=False).key == b"k" * 32
    monkeypatch.setenv("FLEETBUS_MASTER_KEY", "short")
    with pytest.raises(InvalidRequest, match="not base64 of 32 bytes"):
        MasterKey.load(Home(tmp_path), create=False)
