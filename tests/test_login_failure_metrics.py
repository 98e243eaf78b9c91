"""Logins the ssh and wmi transports are refused count in fleetbus_auth_failures_total,
like the agents' failed authentications: read from the fleet's /metrics, with no
secret in any label."""

from __future__ import annotations

import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.processes import Fleet, wait_for
from support.sshd import Sshd, ensure_password_user, require_sshd
from support.wsman_server import WsmanServer, make_certs

METRIC = "fleetbus_auth_failures_total"


def scrape(fleet: Fleet) -> str:
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        return resp.read().decode()


def failures(fleet: Fleet, transport: str) -> dict[str, float]:
    """This fleet's auth failures of ``transport``, by reason."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(scrape(fleet)):
        for sample in family.samples:
            if sample.name == METRIC and sample.labels.get("transport") == transport:
                found[sample.labels["reason"]] = sample.value
    return found


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    require_sshd()
    server = Sshd(tmp_path_factory.mktemp("sshd-login")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def wsman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsmanServer]:
    certs = make_certs(tmp_path_factory.mktemp("wsman-login-certs"))
    server = WsmanServer(tmp_path_factory.mktemp("wsman-login"), certs=certs, auth=("basic",),
                         users={"DOMAIN\\ops": "s3cret", "DOMAIN\\guest": "g3st"},
                         denied_users=("DOMAIN\\guest",)).start()
    yield server
    server.stop()


def test_a_wrong_ssh_password_is_counted(fleet: Fleet, sshd: Sshd, tmp_path: Path) -> None:
    user, password = ensure_password_user()
    wrong = password + b"-wrong-" + secrets.token_hex(4).encode()
    added = fleet.cli("credentials", "add", "ssh-wrong", "--type", "password", "--user", user, input=wrong)
    assert added.returncode == 0, added.stderr
    added = fleet.cli("servers", "add", "ssh-login1", "--transport", "ssh", "--host", sshd.host,
                      "--port", str(sshd.port), "--credential", "ssh-wrong", "--host-key", sshd.host_key_line)
    assert added.returncode == 0, added.stderr
    before = failures(fleet, "ssh").get("bad_credentials", 0)
    refused = fleet.cli("ping", "ssh-login1")
    assert refused.returncode != 0 and f"ssh authentication failed for {user}@ssh-login1" in refused.stderr
    wait_for(lambda: failures(fleet, "ssh").get("bad_credentials", 0) > before, what="the ssh failure counted")
    text = scrape(fleet)
    assert wrong.decode() not in text and password.decode() not in text
    assert all(user not in labels.values() for labels in labels_of_failures(fleet))


def test_an_unverifiable_certificate_is_not_a_login_failure(fleet: Fleet, wsman: WsmanServer) -> None:
    # First of the wmi tests: no server of this module's fleet logs in to WinRM with a
    # wrong password yet, so no server check can count one meanwhile.
    assert fleet.cli("credentials", "add", "win-right", "--type", "windows", "--user", "DOMAIN\\ops",
                     input=b"s3cret\n").returncode == 0
    added = fleet.cli("servers", "add", "win-noca1", "--transport", "wmi", "--host", "127.0.0.1",
                      "--port", str(wsman.port), "--auth", "basic", "--credential", "win-right")
    assert added.returncode == 0, added.stderr
    before = failures(fleet, "wmi")
    refused = fleet.cli("ping", "win-noca1")
    assert refused.returncode != 0 and "certificate" in refused.stderr.lower()
    assert failures(fleet, "wmi") == before


def test_a_wrong_wmi_password_is_counted(fleet: Fleet, wsman: WsmanServer) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    added = fleet.cli("credentials", "add", "win-login", "--type", "windows", "--user", "DOMAIN\\ops",
                      input=wrong.encode() + b"\n")
    assert added.returncode == 0, added.stderr
    added = fleet.cli("servers", "add", "win-login1", "--transport", "wmi", "--host", "127.0.0.1",
                      "--port", str(wsman.port), "--auth", "basic", "--ca", str(wsman.ca_path),
                      "--credential", "win-login")
    assert added.returncode == 0, added.stderr
    before = failures(fleet, "wmi").get("bad_credentials", 0)
    refused = fleet.cli("ping", "win-login1")
    assert refused.returncode != 0 and "refused the credentials" in refused.stderr
    wait_for(lambda: failures(fleet, "wmi").get("bad_credentials", 0) > before, what="the wmi failure counted")
    assert wrong not in scrape(fleet)
    for labels in labels_of_failures(fleet):
        assert set(labels) == {"transport", "reason"} and "ops" not in labels["reason"]


def test_a_login_without_winrm_access_is_counted(fleet: Fleet, wsman: WsmanServer) -> None:
    assert fleet.cli("credentials", "add", "win-guest", "--type", "windows", "--user", "DOMAIN\\guest",
                     input=b"g3st\n").returncode == 0
    added = fleet.cli("servers", "add", "win-denied1", "--transport", "wmi", "--host", "127.0.0.1",
                      "--port", str(wsman.port), "--auth", "basic", "--ca", str(wsman.ca_path),
                      "--credential", "win-guest")
    assert added.returncode == 0, added.stderr
    before = failures(fleet, "wmi").get("access_denied", 0)
    refused = fleet.cli("ping", "win-denied1")
    assert refused.returncode != 0 and "denied access" in refused.stderr, refused.stderr
    wait_for(lambda: failures(fleet, "wmi").get("access_denied", 0) > before, what="the denied login counted")


def labels_of_failures(fleet: Fleet) -> list[dict[str, str]]:
    return [s.labels for f in text_string_to_metric_families(scrape(fleet))
            for s in f.samples if s.name == METRIC]
