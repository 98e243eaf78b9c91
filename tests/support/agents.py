"""Real fleetbus agents as separate processes, for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .processes import BIN, Fleet, stop_process, wait_for

AGENT = str(BIN / "fleetbus-agent")
SWARM = str(Path(__file__).with_name("agent_swarm.py"))


def gateway_of(fleet: Fleet) -> dict[str, Any]:
    """The running gateway's address and fingerprint, as `fleetbus gateway info` shows them."""

    def found() -> dict[str, Any] | None:
        proc = fleet.cli("gateway", "info", "--json")
        records = json.loads(proc.stdout) if proc.returncode == 0 else []
        return records[0] if records else None

    return wait_for(found, what="a gateway record")


def add_agent_server(fleet: Fleet, name: str) -> str:
    proc = fleet.cli("servers", "add", name, "--transport", "agent-outbound", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["key"]


@dataclass
class Agent:
    """`fleetbus-agent connect` (or the zipapp) with its key in a 0600 file."""

    workdir: Path
    gateway: str
    fingerprint: str | None
    key: str
    ca: str | None = None
    command: list[str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    more_gateways: list[str] = field(default_factory=list)
    """Further ``--gateway`` values, tried after ``gateway`` in this order."""
    extra: list[str] = field(default_factory=list)
    """Further arguments to ``connect``."""

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start(self) -> Agent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key_file = self.workdir / "key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, self.key.encode() + b"\n")
        os.close(fd)
        args = [*(self.command or [AGENT]), "connect", "--gateway", self.gateway, "--key-file", str(key_file)]
        for more in self.more_gateways:
            args += ["--gateway", more]
        if self.fingerprint:
            args += ["--fingerprint", self.fingerprint]
        if self.ca:
            args += ["--ca", self.ca, "--server-name", "localhost"]
        args += self.extra
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = 15) -> int | None:
        return stop_process(self.proc, sig)


def wait_online(fleet: Fleet, server: str, timeout: float = 20) -> None:
    wait_for(lambda: fleet.cli("ping", server).returncode == 0, timeout=timeout, what=f"{server} online")


def start_swarm(workdir: Path, gateway: str, fingerprint: str, keys: list[str],
                sources: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Many real agent connections (fleetbus_agent.connect) in one process; with
    ``sources``, the agents dial from those local addresses in turn."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys_file = workdir / "keys.json"
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps(keys).encode())
    os.close(fd)
    with open(workdir / "swarm.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, SWARM, gateway, fingerprint, str(keys_file),
                                 *([",".join(sources)] if sources else [])],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    return proc
