"""Real processes for tests: nats-server, `fleetbus up`, the fleetbus CLI.

Everything listens on loopback on ports chosen at run time, and readiness is waited for
with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
FLEETBUS = str(BIN / "fleetbus")
NATS_SERVER = str(BIN / "nats-server")


def own_user() -> str:
    """The name of the user the tests run as."""
    return pwd.getpwuid(os.geteuid()).pw_name


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def shared_env(nats_url: str, prefix: str, home: Path, master_key: bool = True, **more: str) -> dict[str, str]:
    """The environment of fleetbus processes sharing one NATS under ``prefix`` (`core`,
    `worker`, the CLI): none of the caller's own FLEETBUS_ settings, a home of its own,
    and a fresh master key unless ``master_key`` is False."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env.update(FLEETBUS_NATS_URL=nats_url, FLEETBUS_PREFIX=prefix, FLEETBUS_HOME=str(home), **more)
    if master_key:
        env["FLEETBUS_MASTER_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
    return env


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Wait for ``predicate()`` to be true without blocking the event loop; its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_members(pgid: int) -> list[int]:
    """Every live process whose process group is ``pgid`` (zombies are gone already)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int | None:
    """Signal ``proc`` and wait for it; kill it if it has not stopped within 30 s."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class NatsServer:
    """A plain nats-server with JetStream, no auth, on a free loopback port."""

    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> NatsServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        store = self.workdir / "js"
        conf = self.workdir / "nats.conf"
        conf.write_text(
            'host: "127.0.0.1"\nport: -1\nmax_payload: 8388608\n'
            f"ports_file_dir: {json.dumps(str(self.workdir))}\n"
            f"jetstream {{ store_dir: {json.dumps(str(store))} }}\n"
        )
        with open(self.workdir / "nats.log", "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(conf)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        ports = self.workdir / f"nats-server_{self.proc.pid}.ports"

        def ready() -> str | None:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "nats.log").read_text()[-2000:])
            if ports.exists():
                try:
                    return json.loads(ports.read_text())["nats"][0]
                except (ValueError, KeyError):
                    return None
            return None

        self.url = wait_for(ready, what="nats-server to listen")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Fleet:
    """A `fleetbus up` process tree with its own home folder.

    ``local_user`` is passed as ``--local-user``: by default the tests' own user, since
    most tests have `local` write and read under pytest's tmp folders, which only that
    user may enter (and under root fleetbus would otherwise default to `nobody`). None
    leaves fleetbus's own default, for the tests of that default.
    """

    home: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    local_user: str | None = field(default_factory=own_user)
    proc: subprocess.Popen[bytes] | None = None
    nats_url: str = ""
    token: str = ""

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
        env.update(self.env)
        env["FLEETBUS_HOME"] = str(self.home)
        return env

    def start(self) -> Fleet:
        self.home.mkdir(parents=True, exist_ok=True)
        # Kept open for the life of the stack; stop() closes it.
        self.log = open(self.home.parent / f"{self.home.name}-up.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [FLEETBUS, "up", "--nats-port", "0", "--gateway-listen", "127.0.0.1:0",
             "--metrics-addr", "127.0.0.1:0", "-v",
             *(["--local-user", self.local_user] if self.local_user else []),
             *self.extra_args],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=self.environ(),
        )
        run_file = self.home / "run.json"

        def ready() -> dict[str, Any] | None:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(self.output()[-3000:])
            try:
                return json.loads(run_file.read_text())
            except (FileNotFoundError, ValueError):
                return None

        info = wait_for(ready, timeout=30, what="fleetbus up")
        self.nats_url = info["nats_url"]
        self.metrics_url = info.get("metrics_url")
        token_file = self.home / "nats.token"
        self.token = token_file.read_text().strip() if info.get("embedded") else ""
        return self

    def output(self) -> str:
        return (self.home.parent / f"{self.home.name}-up.log").read_text(errors="replace")

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        merged = self.environ()
        merged.update(env or {})
        proc = subprocess.run(
            [FLEETBUS, *args], input=input, capture_output=True, timeout=timeout, env=merged, check=False,
        )
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = stop_process(self.proc, sig)
        self.log.close()
        return code


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


@dataclass
class Daemon:
    """A long-running fleetbus process (core, worker) with its output in a log file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    ready_text: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        # A restart appends to the same log: wait for one more ready line than it has.
        seen = self.log_path.read_text(errors="replace").count(self.ready_text) if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([FLEETBUS, *self.args], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=self.env)

        def ready() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text()[-3000:])
            return self.log_path.read_text(errors="replace").count(self.ready_text) > seen

        wait_for(ready, timeout=30, what=f"fleetbus {self.args}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_process(self.proc, sig)
