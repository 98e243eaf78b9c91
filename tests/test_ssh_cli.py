"""The ssh transport from the CLI, against a real OpenSSH sshd: credentials, trust, commands."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import Fleet
from support.sshd import Sshd, generate_key, require_sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, Path]]:
    require_sshd()
    base = tmp_path_factory.mktemp("sshcli")
    key = generate_key(base, "id_deploy")
    server = Sshd(base / "sshd")
    server.authorize(key.public)
    server.start()
    key_file = base / "id_deploy"
    os.chmod(key_file, 0o600)
    yield server, key_file
    server.stop()


@pytest.fixture(scope="module")
def deploy_key(fleet: Fleet, sshd: tuple[Sshd, Path]) -> str:
    _, key_file = sshd
    add_key = fleet.cli("credentials", "add", "deploy-key", "--type", "ssh-key", "--user", "root",
                        "--private-key-file", str(key_file), input=b"")
    assert add_key.returncode == 0, add_key.stderr
    return "deploy-key"


def test_ssh_server_end_to_end_with_trust(fleet: Fleet, sshd: tuple[Sshd, Path], deploy_key: str,
                                          tmp_path: Path) -> None:
    server, key_file = sshd
    add = fleet.cli("servers", "add", "web2", "--transport", "ssh", "--host", server.host,
                    "--port", str(server.port), "--credential", "deploy-key")
    assert add.returncode == 0, add.stderr

    untrusted = fleet.cli("run", "web2", "--", "true")
    assert untrusted.returncode == 125 and "not trusted yet" in untrusted.stderr
    assert "fleetbus servers trust web2" in untrusted.stderr

    trust = fleet.cli("servers", "trust", "web2", "--yes")
    assert trust.returncode == 0, trust.stderr
    assert server.host_fingerprint in trust.stdout
    pinned = json.loads(fleet.cli("servers", "show", "web2", "--json").stdout)["server"]["options"]["host_key"]
    assert pinned == server.host_key_line

    run = fleet.cli("run", "web2", "--env", "X=1", "--", "sh", "-c", 'echo "out $X"; echo err >&2; exit 3')
    assert (run.returncode, run.stdout, run.stderr) == (3, "out 1\n", "err\n")
    assert fleet.cli("run", "web2", "--timeout", "0.5", "--", "sleep", "30").returncode == 124
    info = json.loads(fleet.cli("info", "web2", "--json").stdout)
    assert info["transport"] == "ssh" and info["kernel"]
    assert fleet.cli("ping", "web2").returncode == 0

    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    remote = tmp_path / "remote" / "f.bin"
    assert fleet.cli("put", "web2", str(src), str(remote), "--mode", "0600").returncode == 0
    back = tmp_path / "back.bin"
    assert fleet.cli("get", "web2", str(remote), str(back)).returncode == 0
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert (remote.stat().st_mode & 0o777) == 0o600

    again = fleet.cli("servers", "trust", "web2", "--yes")
    assert again.returncode == 0 and "already trusted" in again.stdout
    assert key_file.read_text() not in fleet.output()


def test_a_changed_host_key_is_refused_until_replaced(fleet: Fleet, sshd: tuple[Sshd, Path],
                                                      deploy_key: str) -> None:
    server, _ = sshd
    add = fleet.cli("servers", "add", "moved", "--transport", "ssh", "--host", server.host,
                    "--port", str(server.port), "--credential", "deploy-key",
                    "--host-key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKm1Vt8O9oDKCfnMPFb1zW8kBk1ZAtYh6kGxjU5ZYH3a")
    assert add.returncode == 0, add.stderr
    run = fleet.cli("run", "moved", "--", "true")
    assert run.returncode == 125 and "host key mismatch" in run.stderr
    refused = fleet.cli("servers", "trust", "moved", "--yes")
    assert refused.returncode != 0 and "--replace" in refused.stderr
    assert fleet.cli("servers", "trust", "moved", "--yes", "--replace").returncode == 0
    assert fleet.cli("run", "moved", "--", "true").returncode == 0
