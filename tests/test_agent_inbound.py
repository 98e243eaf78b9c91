"""Inbound agents: `fleetbus-agent listen` as a separate process, fleetbus connecting in over TLS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from support.agents import AGENT
from support.ports import free_port
from support.processes import Fleet, stop_process, wait_for

S = "fleetbus.v1.servers"


@dataclass
class Listener:
    proc: object
    port: int
    fingerprint: str
    key: str
    workdir: Path

    def log(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")


def start_listener(workdir: Path, key: str, *extra: str) -> Listener:
    workdir.mkdir(parents=True, exist_ok=True)
    key_file = workdir / "key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, key.encode())
    os.close(fd)
    out = workdir / "agent.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    with open(workdir / "agent.log", "ab") as log, open(out, "wb") as stdout:
        proc = subprocess.Popen([AGENT, "listen", "--bind", "127.0.0.1", "--port", str(extra_port(extra)),
                                 "--key-file", str(key_file), *strip_port(extra)],
                                stdout=stdout, stderr=log, stdin=subprocess.DEVNULL, env=env)

    def ready() -> tuple[int, str] | None:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "agent.log").read_text())
        text = out.read_text() if out.exists() else ""
        fp = re.search(r"fingerprint (sha256:[0-9a-f]{64})", text)
        port = re.search(r"listening on [^\s]*:(\d+)", text)
        return (int(port.group(1)), fp.group(1)) if fp and port else None

    port, fp = wait_for(ready, what="agent listening")
    return Listener(proc, port, fp, key, workdir)


def extra_port(extra: tuple[str, ...]) -> int:
    return int(extra[extra.index("--port") + 1]) if "--port" in extra else 0


def strip_port(extra: tuple[str, ...]) -> list[str]:
    out = list(extra)
    if "--port" in out:
        i = out.index("--port")
        del out[i:i + 2]
    return out


def established(port: int) -> int:
    """Established TCP connections on the agent's side of 127.0.0.1:port."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            count += 1
    return count


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator:
    started: list[Listener] = []

    def make(name: str, key: str | None = None, *extra: str) -> Listener:
        listener = start_listener(tmp_path / name, key or secrets.token_urlsafe(32), *extra)
        started.append(listener)
        return listener

    yield make
    for listener in started:
        stop_process(listener.proc)


def register(fleet: Fleet, name: str, listener: Listener, *extra: str, key: str | None = None):
    args = ["servers", "add", name, "--transport", "agent-inbound", "--host", "127.0.0.1",
            "--port", str(listener.port), *extra]
    if "--trust-on-first-use" not in extra and "--fingerprint" not in extra:
        args += ["--fingerprint", listener.fingerprint]
    return fleet.cli(*args, input=(key or listener.key).encode())


def test_pinned_agent_behaves_like_local(fleet: Fleet, listeners, tmp_path: Path) -> None:
    agent = listeners("db1")
    add = register(fleet, "db1", agent)
    assert add.returncode == 0, add.stderr
    run = fleet.cli("run", "db1", "--", "sh", "-c", "echo hi; echo err >&2; exit 4")
    assert (run.returncode, run.stdout, run.stderr) == (4, "hi\n", "err\n")
    info = json.loads(fleet.cli("info", "db1", "--json").stdout)
    assert info["transport"] == "agent-inbound" and info["extra"]["agent_version"]
    assert fleet.cli("ping", "db1").returncode == 0

    src = tmp_path / "big.bin"
    with open(src, "wb") as fh:
        fh.writelines(os.urandom(1024 * 1024) for _ in range(100))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    remote = tmp_path / "r" / "big.bin"
    put = fleet.cli("put", "db1", str(src), str(remote), "--json", timeout=300)
    assert put.returncode == 0 and json.loads(put.stdout)["sha256"] == digest
    back = tmp_path / "back.bin"
    assert fleet.cli("get", "db1", str(remote), str(back), timeout=300).returncode == 0
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest

    listed = next(s for s in json.loads(fleet.cli("servers", "list", "--json").stdout) if s["name"] == "db1")
    assert listed["status"]["state"] == "online" and listed["status"]["agent_version"].startswith("fleetbus-agent/")
    assert agent.key not in fleet.output() and agent.key not in agent.log()
    assert agent.key not in fleet.cli("servers", "show", "db1", "--json").stdout


def test_without_a_key_fleetbus_issues_one_and_the_printed_commands_work(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    # Nothing on standard input, no --key-file: fleetbus issues the key.
    add = fleet.cli("servers", "add", "db9", "--transport", "agent-inbound", "--host", "127.0.0.1",
                    "--port", str(port), input=b"")
    assert add.returncode == 0, add.stderr
    key = re.search(r"secret key for db9 [^\n]*:\n  (\S+)\n", add.stdout)[1]
    assert len(key) >= 40
    assert f"fleetbus-agent listen --port {port} --key-file /etc/fleetbus-agent/key" in add.stdout
    # The fingerprint step stays: the agent makes its certificate on first start, and
    # the printed command pins it.
    pin = re.search(r"  fleetbus (servers add db9 .* --fingerprint) sha256:\.\.\. --replace", add.stdout)[1]
    agent = start_listener(tmp_path / "db9", key, "--port", str(port))
    try:
        pinned = fleet.cli(*pin.split(), agent.fingerprint, "--replace")
        assert pinned.returncode == 0, pinned.stderr
        assert "secret key" not in pinned.stdout  # the credential was given: nothing issued
        wait_for(lambda: fleet.cli("run", "db9", "--", "echo", "hi").stdout == "hi\n",
                 timeout=60, what="db9's agent answering with the issued key")
    finally:
        stop_process(agent.proc)
    shown = fleet.cli("servers", "show", "db9", "--json").stdout
    assert "agent-db9" in shown and key not in shown
    assert key not in fleet.output()  # never in a log


def test_mismatched_fingerprint_is_refused(fleet: Fleet, listeners, tmp_path: Path) -> None:
    agent = listeners("mitm")
    marker = tmp_path / "ran"
    add = register(fleet, "mitm", agent, "--fingerprint", "sha256:" + "ab" * 32)
    assert add.returncode == 0, add.stderr
    run = fleet.cli("run", "mitm", "--", "touch", str(marker))
    assert run.returncode == 125 and "not the pinned" in run.stderr
    assert not marker.exists()


def test_trust_on_first_use_pins_what_it_saw(fleet: Fleet, listeners) -> None:
    agent = listeners("tofu")
    assert register(fleet, "tofu", agent, "--trust-on-first-use").returncode == 0
    assert fleet.cli("run", "tofu", "--", "true").returncode == 0
    pinned = json.loads(fleet.cli("servers", "show", "tofu", "--json").stdout)["server"]["options"]["fingerprint"]
    assert pinned == agent.fingerprint
    stop_process(agent.proc)
    again = start_listener(agent.workdir, agent.key, "--port", str(agent.port), "--new-cert")
    try:
        assert again.fingerprint != agent.fingerprint
        def refused() -> subprocess.CompletedProcess[str] | None:
            p = fleet.cli("run", "tofu", "--", "true")
            return p if p.returncode != 0 and "pinned" in p.stderr else None

        run = wait_for(refused, what="the new certificate refused")
        assert "not the pinned" in run.stderr
    finally:
        stop_process(again.proc)


def test_wrong_key_is_refused_without_leaking_it(fleet: Fleet, listeners) -> None:
    agent = listeners("wrongkey")
    wrong = secrets.token_urlsafe(32)
    assert register(fleet, "wrongkey", agent, key=wrong).returncode == 0
    run = fleet.cli("run", "wrongkey", "--", "true")
    assert run.returncode == 125 and "refused fleetbus's proof" in run.stderr
    wait_for(lambda: "127.0.0.1" in agent.log(), what="the failure logged by address")
    for text in (agent.log(), fleet.output(), run.stderr):
        assert wrong not in text and agent.key not in text


async def test_concurrent_commands_share_one_connection(fleet: Fleet, fleet_nc: NATS, bus, listeners) -> None:
    agent = listeners("busy")
    assert register(fleet, "busy", agent).returncode == 0
    replies = await asyncio.gather(*(bus(fleet_nc, f"{S}.busy.exec", {"shell": f"sleep 0.2; echo {i}"})
                                     for i in range(20)))
    assert sorted(r["stdout"] for r in replies) == sorted(f"{i}\n" for i in range(20))
    assert established(agent.port) == 1


async def test_path_restrictions(fleet: Fleet, fleet_nc: NATS, bus, listeners, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("no")
    (allowed / "link").symlink_to(outside)
    agent = listeners("jail", None, "--allow-path", str(allowed))
    assert register(fleet, "jail", agent).returncode == 0
    content = base64.b64encode(b"data").decode()

    ok = await bus(fleet_nc, f"{S}.jail.put", {"path": str(allowed / "sub" / "f.txt"), "content_b64": content})
    assert ok["ok"], ok
    for path in (outside / "f.txt", allowed / ".." / "outside" / "f.txt", allowed / "link" / "f.txt"):
        reply = await bus(fleet_nc, f"{S}.jail.put", {"path": str(path), "content_b64": content})
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", path
        assert "outside the allowed paths" in reply["error"]["message"]
    assert not (outside / "f.txt").exists()
    for path in (outside / "secret.txt", allowed / ".." / "outside" / "secret.txt", allowed / "link" / "secret.txt"):
        reply = await bus(fleet_nc, f"{S}.jail.get", {"path": str(path)})
        assert reply["ok"] is False and "outside the allowed paths" in reply["error"]["message"], path
    got = await bus(fleet_nc, f"{S}.jail.get", {"path": str(allowed / "sub" / "f.txt")})
    assert base64.b64decode(got["content_b64"]) == b"data"


def test_agent_restart_mid_use(fleet: Fleet, listeners) -> None:
    agent = listeners("phoenix-in")
    assert register(fleet, "phoenix-in", agent).returncode == 0
    assert fleet.cli("run", "phoenix-in", "--", "true").returncode == 0
    stop_process(agent.proc)
    down = fleet.cli("run", "phoenix-in", "--", "true")
    assert down.returncode == 125
    again = start_listener(agent.workdir, agent.key, "--port", str(agent.port))
    try:
        assert again.fingerprint == agent.fingerprint  # same identity after a restart
        wait_for(lambda: fleet.cli("run", "phoenix-in", "--", "true").returncode == 0, what="re-opened")
    finally:
        stop_process(again.proc)


class SilentTLS:
    """A TLS server that completes the TLS handshake and then never says a word."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
                self.conns.append(self.ctx.wrap_socket(raw, server_side=True))
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_silent_agent_and_idle_close(tmp_path: Path, listeners) -> None:
    from cryptography.hazmat.primitives import serialization
    from fleetbus.certs import create_gateway_identity, fingerprint_pem, key_password
    from fleetbus.home import Home
    from fleetbus.vault import MasterKey

    stack = Fleet(tmp_path / "home", extra_args=[
        "--transport-setting", "agent-inbound.idle_timeout_s=1",
        "--transport-setting", "agent-inbound.connect_timeout_s=2"]).start()
    try:
        master = MasterKey(os.urandom(32), "t")
        files = create_gateway_identity(Home(tmp_path / "certs"), master)
        key_pem = serialization.load_pem_private_key(
            files.key.read_bytes(), password=key_password(master))
        plain = tmp_path / "plain.key"
        plain.write_bytes(key_pem.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
        silent = SilentTLS(files.cert, plain)
        try:
            fp = fingerprint_pem(files.cert.read_bytes())
            add = stack.cli("servers", "add", "mute", "--transport", "agent-inbound", "--host", "127.0.0.1",
                            "--port", str(silent.port), "--fingerprint", fp, input=b"some-key")
            assert add.returncode == 0, add.stderr
            run = stack.cli("run", "mute", "--", "true", timeout=60)
            assert run.returncode == 125 and "handshake" in run.stderr
        finally:
            silent.close()

        agent = listeners("idle")
        assert register(stack, "idle", agent).returncode == 0
        assert stack.cli("run", "idle", "--", "true").returncode == 0
        wait_for(lambda: established(agent.port) == 1, what="connection open")
        wait_for(lambda: established(agent.port) == 0, timeout=20, what="idle connection closed")
        assert stack.cli("run", "idle", "--", "true").returncode == 0  # re-opened on use
    finally:
        stack.stop()
