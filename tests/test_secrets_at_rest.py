"""The vault key stays in the core: what `local` commands and fleetbus's children can see.

Real processes throughout: `fleetbus up`, a `fleetbus worker`, an outbound agent, and
commands that walk their own ancestors in /proc. Tests that switch users need root (the
tests here run as root); they are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fleetbus.errors import InvalidRequest, NotFound, TransportError
from fleetbus.home import Home
from fleetbus.records import Server
from fleetbus.transport import ExecSpec, PutSpec, Session
from fleetbus.vault import MasterKey
from fleetbus_base.ops.runas import RunAs
from fleetbus_local.transport import LocalTransport
from fleetbus_local.users import local_user
from support.agents import AGENT, add_agent_server, gateway_of, wait_online
from support.ops_helpers import RecordingSink, chunks, temp_files, wait_until
from support.processes import Daemon, Fleet, children_of, own_user, stop_process, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

# Run as a `local` (or agent) command: one line per ancestor, from the parent up to
# pid 1: "PID ok BASE64-OF-ENVIRON" or "PID denied". Shell and coreutils only, so it
# runs as any user.
WALK_ANCESTORS = r"""
p=$PPID
while [ -n "$p" ] && [ "$p" -gt 0 ]; do
  if e=$(base64 -w0 "/proc/$p/environ" 2>/dev/null); then echo "$p ok $e"; else echo "$p denied"; fi
  [ "$p" -eq 1 ] && break
  p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status")
done
"""


def new_master_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def ancestors(output: str) -> dict[int, bytes | None]:
    """What WALK_ANCESTORS printed: pid -> its environ, None where it was unreadable."""
    out: dict[int, bytes | None] = {}
    for line in output.splitlines():
        pid, state, *rest = line.split(" ")
        out[int(pid)] = base64.b64decode(rest[0]) if state == "ok" and rest else None
    return out


def environ_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return fh.read()


def assert_holds_none(environ: bytes, secrets_: dict[str, str], where: str) -> None:
    for name, value in secrets_.items():
        assert value.encode() not in environ, f"{name}'s value is readable in {where}"
        assert f"{name}=".encode() not in environ, f"{name} is still named in {where}"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder any user may write to, outside pytest's root-only tmp folders."""
    path = Path(tempfile.mkdtemp(prefix="fleetbus-secrets-", dir="/tmp"))
    path.chmod(0o1777)  # sticky, like /tmp: only a file's owner may replace it
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------- the stack, end to end


def test_no_ancestor_of_a_local_command_and_no_nats_server_holds_a_secret(tmp_path: Path) -> None:
    master = new_master_key()
    agent_key = "fbk1_" + secrets.token_hex(24)  # never used; it must vanish all the same
    # `up` holds the master key in its environment and runs nats-server; a separate
    # worker holds the master key, the NATS token and an agent key, and serves `local`
    # as its own user, so the ancestors' /proc entries are readable to the command.
    fleet = Fleet(tmp_path / "home", env={"FLEETBUS_MASTER_KEY": master, "FLEETBUS_AGENT_KEY": agent_key},
                  extra_args=["--transports", "agent-outbound"]).start()
    worker = None
    try:
        env = {**fleet.environ(), "FLEETBUS_HOME": str(tmp_path / "worker-home"),
               "FLEETBUS_NATS_URL": fleet.nats_url, "FLEETBUS_NATS_TOKEN": fleet.token,
               "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
        worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], env,
                        tmp_path / "worker.log", "serving local").start()
        wait_for(lambda: fleet.cli("ping", "local").returncode == 0, what="local served by the worker")
        held = {"FLEETBUS_MASTER_KEY": master, "FLEETBUS_NATS_TOKEN": fleet.token,
                "FLEETBUS_AGENT_KEY": agent_key}

        run = fleet.cli("run", "local", "--", "sh", "-c", WALK_ANCESTORS)
        assert run.returncode == 0, run.stderr
        seen = ancestors(run.stdout)
        assert worker.proc is not None and seen.get(worker.proc.pid) is not None, \
            "the worker's environ was readable to the command, so the check below means something"
        assert 1 in seen
        for pid, environ in seen.items():
            if environ is not None:
                assert_holds_none(environ, held, f"/proc/{pid}/environ")
        # The command itself got none of them either.
        own = fleet.cli("run", "local", "--", "env")
        assert own.returncode == 0 and "FLEETBUS_MASTER_KEY" not in own.stdout
        assert "CREDENTIALS_DIRECTORY" not in own.stdout  # nor where a key file would be
        assert master not in own.stdout and fleet.token not in own.stdout

        # `up` itself, and the nats-server it started.
        assert fleet.proc is not None
        assert_holds_none(environ_of(fleet.proc.pid), held, "fleetbus up's environ")
        nats = [pid for pid in children_of(fleet.proc.pid) if "nats-server" in Path(f"/proc/{pid}/exe").resolve().name]
        assert len(nats) == 1
        names = {entry.split(b"=", 1)[0].decode() for entry in environ_of(nats[0]).split(b"\0") if entry}
        assert "FLEETBUS_EMBEDDED_NATS_TOKEN" in names
        assert names <= {"PATH", "TZ", "LANG", "LC_ALL", "TMPDIR", "GOMAXPROCS", "GOMEMLIMIT", "GOGC",
                         "GODEBUG", "FLEETBUS_EMBEDDED_NATS_TOKEN"}
    finally:
        stop_process(worker.proc if worker else None)
        fleet.stop()


def test_an_agent_command_cannot_read_the_agent_key_from_its_parent(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "home").start()
    agent = None
    try:
        key = add_agent_server(fleet, "keyed1")
        gw = gateway_of(fleet)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
        env["FLEETBUS_AGENT_KEY"] = key  # the key in the environment, not a file
        with open(tmp_path / "agent.log", "ab") as log:
            agent = subprocess.Popen([AGENT, "connect", "--gateway", gw["address"],
                                      "--fingerprint", gw["fingerprint"]],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        wait_online(fleet, "keyed1")
        run = fleet.cli("run", "keyed1", "--", "sh", "-c", WALK_ANCESTORS)
        assert run.returncode == 0, run.stderr
        seen = ancestors(run.stdout)
        assert seen.get(agent.pid) is not None
        for pid, environ in seen.items():
            if environ is not None:
                assert_holds_none(environ, {"FLEETBUS_AGENT_KEY": key}, f"/proc/{pid}/environ")
    finally:
        stop_process(agent)
        fleet.stop()


@needs_root
def test_under_root_local_defaults_to_an_unprivileged_user(tmp_path: Path, shared_dir: Path) -> None:
    master = new_master_key()
    fleet = Fleet(tmp_path / "home", env={"FLEETBUS_MASTER_KEY": master}, local_user=None).start()
    try:
        expected = local_user(None)  # fleetbus-local if it exists, else nobody
        assert expected is not None and expected.uid != 0
        assert f"local as  {expected.name} (uid {expected.uid})" in fleet.output()
        assert stat.S_IMODE(fleet.home.stat().st_mode) == 0o700

        ids = fleet.cli("run", "local", "--", "id", "-u")
        assert (ids.returncode, ids.stdout.strip()) == (0, str(expected.uid)), ids.stderr
        info = fleet.cli("info", "local", "--json")
        assert info.returncode == 0 and json.loads(info.stdout)["extra"]["user"] == expected.name, info.stdout
        # Nothing of fleetbus's reachable: its home, its parent's environment.
        (fleet.home / "master.key").write_text(master + "\n")
        (fleet.home / "master.key").chmod(0o600)
        got = fleet.cli("get", "local", str(fleet.home / "master.key"), "-")
        assert got.returncode != 0 and master not in got.stdout
        assert f"permission denied: {fleet.home / 'master.key'} (local runs as {expected.name})" in got.stderr
        walk = fleet.cli("run", "local", "--", "sh", "-c", WALK_ANCESTORS)
        assert walk.returncode == 0
        assert fleet.proc is not None and ancestors(walk.stdout)[fleet.proc.pid] is None

        # A put creates the file as that user, and a get reads it back as that user.
        src = tmp_path / "src"
        src.write_bytes(b"as the local user\n")
        target = shared_dir / "sub" / "f"
        put = fleet.cli("put", "local", str(src), str(target), "--mode", "0640")
        assert put.returncode == 0, put.stderr
        st = target.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (expected.uid, expected.gid, 0o640)
        assert target.parent.stat().st_uid == expected.uid  # made by that user too
        back = fleet.cli("get", "local", str(target), "-")
        assert (back.returncode, back.stdout) == (0, "as the local user\n")
        # The kernel's rules for that user apply to the rename as well: in a sticky
        # folder it may not replace root's file (which a rename done as root would).
        theirs = shared_dir / "roots"
        theirs.write_text("root's\n")
        theirs.chmod(0o666)
        refused = fleet.cli("put", "local", str(src), str(theirs))
        assert refused.returncode != 0 and "permission denied" in refused.stderr
        assert theirs.read_text() == "root's\n" and temp_files(shared_dir) == []
    finally:
        fleet.stop()


def test_an_impossible_local_user_stops_fleetbus_with_one_line(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "home", local_user="no-such-user-fb")
    with pytest.raises(RuntimeError) as info:
        fleet.start()
    fleet.log.close()
    assert "local transport setting 'user': no user 'no-such-user-fb' on this host" in str(info.value)
    assert "Traceback" not in str(info.value)


# --------------------------------------------------------------- the local transport


class Context:
    transport_name = "local"

    def __init__(self, settings: dict[str, object]) -> None:
        import logging

        self.logger = logging.getLogger("test.secrets")
        self.settings = settings

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.fixture
async def nobody_session() -> AsyncIterator[Session]:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    session = await LocalTransport(Context({"user": "nobody"})).open(Server(name="h", transport="local"), None)
    yield session
    await session.close()


async def test_exec_as_the_user_gets_its_identity_not_ours(nobody_session: Session) -> None:
    nobody = pwd.getpwnam("nobody")
    sink = RecordingSink()
    result = await nobody_session.exec(
        ExecSpec(argv=None, shell='id -u; id -g; id -G; echo "$HOME $USER"; pwd'), sink)
    assert result.exit_code == 0
    lines = sink.data("stdout").decode().splitlines()
    assert lines[0] == str(nobody.pw_uid) and lines[1] == str(nobody.pw_gid)
    assert "0" not in lines[2].split()  # none of root's supplementary groups kept
    assert lines[3] == f"{nobody.pw_dir} nobody"
    assert lines[4] == (nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/")


async def test_a_working_directory_is_entered_as_the_user(nobody_session: Session, shared_dir: Path,
                                                          tmp_path: Path) -> None:
    # tmp_path lies under root-only folders; entering a folder as root first (what
    # subprocess's cwd= does) would let the user read this file.
    hidden = tmp_path / "open-folder"
    hidden.mkdir(mode=0o755)
    (hidden / "f").write_text("behind a 0700 parent\n")
    (hidden / "f").chmod(0o644)
    sink = RecordingSink()
    with pytest.raises(TransportError, match=r"permission denied: working directory .* \(local runs as nobody\)"):
        await nobody_session.exec(ExecSpec(argv=["cat", "f"], shell=None, cwd=str(hidden)), sink)
    assert sink.data("stdout") == b""
    with pytest.raises(NotFound, match="no such working directory"):
        await nobody_session.exec(ExecSpec(argv=["true"], shell=None, cwd=str(shared_dir / "none")), sink)
    (shared_dir / "g").write_text("reachable\n")
    result = await nobody_session.exec(ExecSpec(argv=None, shell="pwd; cat g", cwd=str(shared_dir)), sink)
    assert result.exit_code == 0
    assert sink.data("stdout").decode() == f"{shared_dir}\nreachable\n"


async def test_a_failed_put_as_the_user_leaves_no_temporary_file(nobody_session: Session,
                                                                 shared_dir: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"first part"
        raise RuntimeError("the sender went away")

    with pytest.raises(RuntimeError):
        await nobody_session.put(PutSpec(path=str(shared_dir / "f")), broken())
    await wait_until(lambda: temp_files(shared_dir) == [])
    assert not (shared_dir / "f").exists()

    with pytest.raises(TransportError, match="size mismatch"):
        await nobody_session.put(PutSpec(path=str(shared_dir / "g"), size=100), chunks(b"short"))
    await wait_until(lambda: temp_files(shared_dir) == [])


async def test_get_and_put_as_the_user_report_like_ours(nobody_session: Session, shared_dir: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        await nobody_session.get(str(shared_dir / "missing"))
    with pytest.raises(InvalidRequest, match="is a directory"):
        await nobody_session.get(str(shared_dir))
    with pytest.raises(NotFound, match="no such directory"):
        await nobody_session.put(PutSpec(path=str(shared_dir / "a" / "b"), make_parents=False), chunks(b"x"))
    with pytest.raises(TransportError, match=r"permission denied: /root/x \(local runs as nobody\)"):
        await nobody_session.put(PutSpec(path="/root/x"), chunks(b"x"))
    big = os.urandom(3 * 1024 * 1024 + 7)
    stat_ = await nobody_session.put(PutSpec(path=str(shared_dir / "big")), chunks(big[:5], big[5:]))
    assert stat_.size == len(big) and stat_.mode == 0o644
    remote = await nobody_session.get(str(shared_dir / "big"))
    assert remote.size == len(big)
    assert b"".join([c async for c in remote.chunks]) == big


def test_which_user_local_runs_as() -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert local_user(None, euid=1000) is None  # not root: its own user
    assert local_user(me) is None  # ourselves: nothing to switch
    if os.geteuid() == 0:
        default = local_user(None)
        assert default is not None and default.name in ("fleetbus-local", "nobody")
        assert local_user("nobody") == RunAs.lookup("nobody")
        assert local_user(65534) == RunAs.lookup(65534)
        assert local_user(str(65534)) == RunAs.lookup(65534)
    with pytest.raises(InvalidRequest, match="only fleetbus running as root"):
        local_user("root", euid=1000)
    with pytest.raises(InvalidRequest, match="no user 'nope-fb'"):
        local_user("nope-fb")
    with pytest.raises(InvalidRequest, match="user name or uid"):
        local_user(["root"])


# --------------------------------------------------------------- the process's own environment

TAKE = r"""
import os, sys
from fleetbus_base.ownenv import secret, take_secrets
taken = take_secrets()
with open("/proc/self/environ", "rb") as fh:
    block = fh.read()
print(",".join(taken))
print(secret("FLEETBUS_MASTER_KEY"))
print(b"FLEETBUS_MASTER_KEY" in block, b"hunter2-value" in block, b"KEEP_ME=1" in block)
print("FLEETBUS_MASTER_KEY" in os.environ)
"""


def test_taking_secrets_clears_them_from_proc_environ_and_keeps_the_rest() -> None:
    env = {"PATH": os.environ.get("PATH", os.defpath), "FLEETBUS_MASTER_KEY": "hunter2-value",
           "KEEP_ME": "1"}
    proc = subprocess.run([sys.executable, "-c", TAKE], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.splitlines() == ["FLEETBUS_MASTER_KEY", "hunter2-value", "False False True", "False"]


def test_the_master_key_comes_from_a_file_a_descriptor_or_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETBUS_MASTER_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    key = secrets.token_bytes(32)
    home = Home(tmp_path / "home")
    named = tmp_path / "key"
    named.write_text(base64.b64encode(key).decode() + "\n")
    named.chmod(0o600)
    monkeypatch.setenv("FLEETBUS_MASTER_KEY_FILE", str(named))
    loaded = MasterKey.load(home)
    assert loaded.key == key and loaded.source == str(named)
    assert not home.master_key.exists()  # no second key made beside it
    named.chmod(0o644)
    with pytest.raises(InvalidRequest, match="chmod 600"):
        MasterKey.load(home)
    monkeypatch.setenv("FLEETBUS_MASTER_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(NotFound, match="does not exist"):
        MasterKey.load(home)

    read_end, write_end = os.pipe()  # an inherited descriptor, as a supervisor passes it
    os.write(write_end, base64.b64encode(key))
    os.close(write_end)
    try:
        monkeypatch.setenv("FLEETBUS_MASTER_KEY_FILE", f"/dev/fd/{read_end}")
        assert MasterKey.load(home).key == key
    finally:
        os.close(read_end)

    monkeypatch.delenv("FLEETBUS_MASTER_KEY_FILE")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "fleetbus-master-key").write_text(base64.b64encode(key).decode())
    (credentials / "fleetbus-master-key").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert MasterKey.load(home).key == key
    # The environment variable still wins over every file.
    other = secrets.token_bytes(32)
    monkeypatch.setenv("FLEETBUS_MASTER_KEY", base64.b64encode(other).decode())
    assert MasterKey.load(home).key == other


def test_an_open_home_folder_is_closed_at_start(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.path.mkdir(mode=0o755)
    home.path.chmod(0o755)
    home.protect()
    assert stat.S_IMODE(home.path.stat().st_mode) == 0o700
