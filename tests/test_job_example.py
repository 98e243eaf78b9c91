"""docs/examples/job_example.mjs, the Node.js worked example of a fleet job, runs as
another system would run it: its pinned `nats` package installed by npm from its own
lock file, then `node`, against a real `fleetbus up` with real `local` servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import nats
import pytest
from support.processes import Fleet

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
EXAMPLE = EXAMPLES / "job_example.mjs"
DOC = ROOT / "docs" / "bus-api.md"


def node_and_npm() -> tuple[str, str]:
    """The tools, or a skip where they cannot be had. `dev.py test` installs them with
    apt as root, so a root run without them is a broken setup, not a reason to skip."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node, npm
    if os.geteuid() != 0:
        pytest.skip("node and npm are not installed, and only root can install them (dev.py does)")
    pytest.fail("node or npm missing although dev.py installs them as root: run `python3 dev.py test`")


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example with its pinned dependency installed beside it, as a user would have it."""
    _, npm = node_and_npm()
    folder = tmp_path_factory.mktemp("node-example")
    for name in ("job_example.mjs", "package.json", "package-lock.json"):
        shutil.copy(EXAMPLES / name, folder / name)
    # `npm ci` installs exactly the lock file, and fails if it disagrees with package.json.
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


async def register(fleet: Fleet, names: list[str], labels: dict[str, str]) -> None:
    """Register `local` servers and wait until a worker serves each (status online)."""
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        for name in names:
            msg = await nc.request("fleetbus.v1.admin.servers.add", json.dumps(
                {"server": {"name": name, "transport": "local", "labels": labels}}).encode(), timeout=10)
            assert json.loads(msg.data)["ok"], msg.data
        give_up = time.monotonic() + 20
        for name in names:
            while True:
                msg = await nc.request("fleetbus.v1.admin.servers.get", json.dumps({"name": name}).encode(),
                                       timeout=10)
                if (json.loads(msg.data).get("status") or {}).get("state") == "online":
                    break
                assert time.monotonic() < give_up, f"{name} never served"
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


def run_example(folder: Path, fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    node, _ = node_and_npm()
    env = {"PATH": os.environ["PATH"], "FLEETBUS_NATS_URL": fleet.nats_url, "FLEETBUS_NATS_TOKEN": fleet.token or ""}
    return subprocess.run([node, "job_example.mjs", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


async def test_the_node_example_runs_a_job_on_exactly_the_selected_servers(fleet: Fleet, example_dir: Path) -> None:
    tag = secrets.token_hex(3)
    chosen = [f"{tag}-node-{i}" for i in range(1, 4)]
    await register(fleet, chosen, {"t": tag, "team": "core"})
    await register(fleet, [f"{tag}-node-other"], {"t": tag, "team": "edge"})  # must not be selected

    proc = await asyncio.to_thread(run_example, example_dir, fleet, f"t={tag}", "team=core")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(rf"job [0-9a-f]{{16}} on 3 servers: {' '.join(chosen)}", lines[0]), lines
    uname = (await asyncio.to_thread(subprocess.run, ["uname", "-a"], capture_output=True, text=True,
                                     check=True)).stdout.splitlines()[0]
    results = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(results) == chosen and len(lines) == 5, lines  # one line per selected server
    for line in results.values():
        assert re.match(r"\S+\s+ok\s+\d+\.\d\ds\s+", line) and line.endswith(uname), line
    assert re.fullmatch(r"job [0-9a-f]{16} succeeded: 3 ok, 0 failed, 0 cancelled, 0 skipped, "
                        r"0 unknown of 3 in \d+\.\d\ds", lines[-1]), lines[-1]


async def test_the_node_example_exits_like_the_cli(fleet: Fleet, example_dir: Path) -> None:
    # A selection matching nothing cannot start: 125 and one line on stderr.
    proc = await asyncio.to_thread(run_example, example_dir, fleet, f"t={secrets.token_hex(3)}")
    assert proc.returncode == 125, proc.stdout + proc.stderr
    assert "jobs.start failed: not_found: no server matches" in proc.stderr
    assert "    at " not in proc.stderr  # a message, not a stack trace


def test_the_node_example_in_the_doc_is_the_script() -> None:
    blocks = re.findall(r"^```js\n(.*?)^```$", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert EXAMPLE.read_text() in blocks


def test_the_lock_file_pins_what_package_json_asks_for() -> None:
    wanted = json.loads((EXAMPLES / "package.json").read_text())["dependencies"]
    locked = json.loads((EXAMPLES / "package-lock.json").read_text())["packages"]
    for name, version in wanted.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name}: pin an exact version, not {version}"
        assert locked[f"node_modules/{name}"]["version"] == version
