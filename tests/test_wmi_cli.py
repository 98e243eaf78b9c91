"""A Windows server from the CLI, against the WS-Management test server (docs/wmi.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import Fleet
from support.wsman_server import WsmanServer, make_certs


@pytest.fixture(scope="module")
def wsman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsmanServer]:
    certs = make_certs(tmp_path_factory.mktemp("wsman-cli-certs"))
    server = WsmanServer(tmp_path_factory.mktemp("wsman-cli"), certs=certs, auth=("basic",)).start()
    yield server
    server.stop()


def test_register_and_run_on_windows(fleet: Fleet, wsman: WsmanServer) -> None:
    cred = fleet.cli("credentials", "add", "win-admin", "--type", "windows", "--user", "DOMAIN\\ops",
                     input=b"s3cret\n")
    assert cred.returncode == 0, cred.stderr
    add = fleet.cli("servers", "add", "win1", "--transport", "wmi", "--host", "127.0.0.1",
                    "--port", str(wsman.port), "--auth", "basic", "--ca", str(wsman.ca_path),
                    "--credential", "win-admin")
    assert add.returncode == 0, add.stderr
    options = json.loads(fleet.cli("servers", "show", "win1", "--json").stdout)["server"]["options"]
    assert options == {"auth": "basic", "ca": str(Path(wsman.ca_path).resolve())}
    run = fleet.cli("run", "win1", "--", "echo", "hello")
    assert run.returncode == 0 and run.stdout.strip() == "hello", run.stderr
    assert fleet.cli("ping", "win1").returncode == 0
    info = json.loads(fleet.cli("info", "win1", "--json").stdout)
    assert info["transport"] == "wmi" and "Windows" in (info["os"] or "")
    assert "s3cret" not in fleet.output()


def test_wrong_password_and_unverified_certificate(fleet: Fleet, wsman: WsmanServer) -> None:
    assert fleet.cli("credentials", "add", "win-wrong", "--type", "windows", "--user", "DOMAIN\\ops",
                     input=b"nope\n").returncode == 0
    assert fleet.cli("servers", "add", "win-bad", "--transport", "wmi", "--host", "127.0.0.1",
                     "--port", str(wsman.port), "--auth", "basic", "--ca", str(wsman.ca_path),
                     "--credential", "win-wrong").returncode == 0
    run = fleet.cli("run", "win-bad", "--", "echo", "x")
    assert run.returncode == 125 and "nope" not in run.stderr
    assert fleet.cli("servers", "add", "win-noca", "--transport", "wmi", "--host", "127.0.0.1",
                     "--port", str(wsman.port), "--auth", "basic", "--credential", "win-wrong").returncode == 0
    refused = fleet.cli("run", "win-noca", "--", "echo", "x")
    assert refused.returncode == 125 and "certificate" in refused.stderr.lower()
    both = fleet.cli("servers", "add", "win-x", "--transport", "wmi", "--host", "h", "--ca", str(wsman.ca_path),
                     "--insecure-skip-verify")
    assert both.returncode != 0 and "not both" in both.stderr
