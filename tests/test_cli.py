"""The `fleetbus` command, run as a user would, against a real `fleetbus up`."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from support.processes import FLEETBUS, Fleet, children_of, pid_alive, wait_for

SECRET = "s3cr3t-value-that-must-never-show"


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("fleetbus: error: ")
    return lines[0]


def test_run_streams_and_exits_with_the_remote_code(fleet: Fleet) -> None:
    proc = fleet.cli("run", "local", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 42")
    assert proc.returncode == 42
    assert proc.stdout == "to-out\n" and proc.stderr == "to-err\n"


def test_run_env_cwd_shell_and_stdin(fleet: Fleet, tmp_path: Path) -> None:
    proc = fleet.cli("run", "local", "--env", "A=1", "--env", "B=two", "--cwd", str(tmp_path),
                     "--shell", "-i", "--", 'echo "$A-$B-$(pwd)-$(cat)"', input=b"piped")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"1-two-{tmp_path}-piped\n"


def test_run_timeout_exits_124(fleet: Fleet) -> None:
    proc = fleet.cli("run", "local", "--timeout", "0.5", "--", "sleep", "30")
    assert proc.returncode == 124
    assert "limit" in one_line_error(proc)


def test_run_json(fleet: Fleet) -> None:
    proc = fleet.cli("run", "local", "--json", "--", "echo", "hi")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["stdout"] == "hi\n"


def test_run_missing_program_is_one_line(fleet: Fleet) -> None:
    proc = fleet.cli("run", "local", "--", "no-such-program-xyz")
    assert proc.returncode == 125
    assert "no-such-program-xyz" in one_line_error(proc)


def test_unknown_server_is_not_found(fleet: Fleet) -> None:
    proc = fleet.cli("run", "ghost", "--", "true")
    assert "no server named ghost" in one_line_error(proc)


def test_registered_but_unserved_server_is_offline_at_once(fleet: Fleet) -> None:
    assert fleet.cli("servers", "add", "far", "--transport", "no-such-transport").returncode == 0
    proc = fleet.cli("ping", "far", timeout=20)
    assert "nobody serves far" in one_line_error(proc)


def test_bad_server_name_is_one_line(fleet: Fleet) -> None:
    proc = fleet.cli("servers", "add", "Bad.Name", "--transport", "local")
    assert "invalid server name" in one_line_error(proc)


def test_servers_add_list_show_remove(fleet: Fleet) -> None:
    # `local` declares no server option: one given is refused at registration, by name.
    typo = fleet.cli("servers", "add", "web7", "--transport", "local", "--option", "retries=3")
    assert "local server option 'retries': unknown" in one_line_error(typo)
    add = fleet.cli("servers", "add", "web7", "--transport", "local", "--role", "web", "--role", "api",
                    "--env", "staging", "--label", "team=core", "--json")
    assert add.returncode == 0, add.stderr
    listed = json.loads(fleet.cli("servers", "list", "--json").stdout)
    web7 = next(s for s in listed if s["name"] == "web7")
    assert web7["roles"] == ["web", "api"] and web7["environment"] == "staging"
    assert web7["labels"] == {"team": "core"} and web7["options"] == {}
    wait_for(lambda: (json.loads(fleet.cli("servers", "show", "web7", "--json").stdout)["status"] or {})
             .get("state") == "online", what="web7 served")
    assert fleet.cli("run", "web7", "--", "true").returncode == 0
    table = fleet.cli("servers", "list").stdout
    assert "web7" in table and "online" in table
    dup = fleet.cli("servers", "add", "web7", "--transport", "local")
    assert "already registered" in one_line_error(dup)
    assert fleet.cli("servers", "remove", "web7").returncode == 0
    assert "no server named web7" in one_line_error(fleet.cli("servers", "show", "web7"))
    wait_for(lambda: "no server named web7" in fleet.cli("run", "web7", "--", "true").stderr,
             what="web7 no longer served")


def test_credentials_never_show_their_secret(fleet: Fleet) -> None:
    add = fleet.cli("credentials", "add", "deploy", "--type", "password", "--user", "ops",
                    input=SECRET.encode() + b"\n")
    assert add.returncode == 0, add.stderr
    listed = fleet.cli("credentials", "list", "--json")
    assert json.loads(listed.stdout)[0]["name"] == "deploy"
    for out in (add.stdout, add.stderr, listed.stdout, fleet.cli("credentials", "list").stdout):
        assert SECRET not in out
    home_dump = b"".join(p.read_bytes() for p in fleet.home.rglob("*") if p.is_file())
    assert SECRET.encode() not in home_dump  # not in the KV files on disk either
    assert SECRET not in fleet.output()  # nor in the stack's log (it runs with -v)
    assert fleet.cli("servers", "add", "uses-cred", "--transport", "local", "--credential", "deploy").returncode == 0
    refused = fleet.cli("credentials", "remove", "deploy")
    assert "used by uses-cred" in one_line_error(refused) and "--force" in refused.stderr
    assert fleet.cli("credentials", "remove", "deploy", "--force").returncode == 0
    missing = fleet.cli("servers", "add", "x1", "--transport", "local", "--credential", "nope")
    assert "no credential named nope" in one_line_error(missing)


def test_credentials_from_file(fleet: Fleet, tmp_path: Path) -> None:
    key = tmp_path / "id_test"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n")
    pw = tmp_path / "pass"
    pw.write_text("pp\n")
    proc = fleet.cli("credentials", "add", "k1", "--type", "ssh-key", "--user", "deploy",
                     "--private-key-file", str(key), "--passphrase-file", str(pw))
    assert proc.returncode == 0, proc.stderr
    assert "abc" not in fleet.cli("credentials", "list").stdout


def test_put_get_large_file_round_trip(fleet: Fleet, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(24 * 1024 * 1024 + 3))
    remote = tmp_path / "remote" / "dst.bin"
    put = fleet.cli("put", "local", str(src), str(remote), "--mode", "0600", "--json")
    assert put.returncode == 0, put.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert json.loads(put.stdout)["sha256"] == digest
    assert remote.read_bytes() == src.read_bytes() and (remote.stat().st_mode & 0o777) == 0o600
    back = tmp_path / "back.bin"
    get = fleet.cli("get", "local", str(remote), str(back))
    assert get.returncode == 0, get.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_put_small_from_stdin_and_get_to_stdout(fleet: Fleet, tmp_path: Path) -> None:
    remote = tmp_path / "small.txt"
    assert fleet.cli("put", "local", "-", str(remote), input=b"hello\n").returncode == 0
    got = fleet.cli("get", "local", str(remote), "-")
    assert got.returncode == 0 and got.stdout == "hello\n"
    missing = fleet.cli("get", "local", str(tmp_path / "nope"), "-")
    assert "nope" in one_line_error(missing)


def test_info_and_ping(fleet: Fleet) -> None:
    info = json.loads(fleet.cli("info", "local", "--json").stdout)
    assert info["hostname"] == socket.gethostname() and info["transport"] == "local"
    ping = fleet.cli("ping", "local")
    assert ping.returncode == 0 and "answered over local" in ping.stdout


def test_plugins_list_shows_the_builtin_local_from_its_entry_point(fleet: Fleet) -> None:
    out = json.loads(fleet.cli("plugins", "list", "--json").stdout)
    local = next(p for p in out["plugins"] if p["transport"] == "local")
    assert local["plugin"] == "local" and local["distribution"] == "fleetbus"


def test_cli_without_a_stack_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env["FLEETBUS_HOME"] = str(tmp_path / "empty")
    proc = subprocess.run([FLEETBUS, "servers", "list"], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert "fleetbus up" in one_line_error(proc)
    proc = subprocess.run([FLEETBUS, "--nats", "nats://127.0.0.1:1", "ping", "local"],
                          capture_output=True, text=True, env=env, timeout=30, check=False)
    assert "cannot connect to NATS" in one_line_error(proc)


def test_up_says_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
        env["FLEETBUS_HOME"] = str(tmp_path / "h")
        proc = subprocess.run([FLEETBUS, "up", "--nats-port", str(port)], capture_output=True,
                              text=True, env=env, timeout=30, check=False)
    line = one_line_error(proc)
    assert f"port {port}" in line and "taken" in line


def test_up_shuts_down_cleanly_children_included(tmp_path: Path) -> None:
    stack = Fleet(tmp_path / "home").start()
    try:
        kids = children_of(stack.proc.pid)
        assert kids, "nats-server should be a child of fleetbus up"
        assert stack.cli("run", "local", "--", "true").returncode == 0
    finally:
        code = stack.stop()
    assert code == 0
    for pid in kids:
        assert not pid_alive(pid)
    assert not (stack.home / "run.json").exists()
    assert "fleetbus stopped" in stack.output()


def test_up_on_a_fresh_home_serves_local_before_it_says_up(tmp_path: Path) -> None:
    """`local` is registered at the first start and reaches the host through the registry
    watch; "up" (and run.json) must wait for it, or the first command finds nobody."""
    stack = Fleet(tmp_path / "home").start()
    try:
        out = stack.output()
        serving, up = out.find("serving local (local)"), out.find(" is up in ")
        assert 0 <= serving < up, out[-2000:]
        assert stack.cli("run", "local", "--", "true").returncode == 0
    finally:
        stack.stop()


def test_up_restarts_on_the_same_data(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = Fleet(home).start()
    try:
        assert first.cli("servers", "add", "kept", "--transport", "local").returncode == 0
    finally:
        first.stop()
    second = Fleet(home).start()
    try:
        names = [s["name"] for s in json.loads(second.cli("servers", "list", "--json").stdout)]
        assert "kept" in names and "local" in names
    finally:
        second.stop()


def test_no_secret_in_argv_of_any_process(fleet: Fleet) -> None:
    pids = [fleet.proc.pid, *children_of(fleet.proc.pid)]
    for pid in pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert fleet.token.encode() not in argv


@pytest.mark.parametrize("args", [["run"], ["servers", "add"], ["put", "local"]])
def test_usage_errors_exit_2_without_traceback(fleet: Fleet, args: list[str]) -> None:
    proc = fleet.cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Usage" in proc.stderr


def test_worker_without_master_key_is_clear(fleet: Fleet, tmp_path: Path) -> None:
    env = {"FLEETBUS_HOME": str(tmp_path / "other"), "FLEETBUS_NATS_URL": fleet.nats_url,
           "FLEETBUS_NATS_TOKEN": fleet.token}
    proc = fleet.cli("worker", env=env, timeout=30)
    assert "no master key" in one_line_error(proc)


def test_command_id_dedupe_from_the_cli(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "m"
    cid = f"cli-{uuid.uuid4().hex}"
    for _ in range(2):
        proc = fleet.cli("run", "local", "--id", cid, "--shell", "--", f"echo x >> {marker}; echo ok")
        assert proc.returncode == 0 and proc.stdout == "ok\n"
    assert marker.read_text() == "x\n"


def test_embedded_nats_tokens_never_look_like_numbers(tmp_path: Path) -> None:
    # nats-server reads the token from its environment like a config value; one that
    # started with a digit was once parsed as a number and refused at start.
    from fleetbus.embedded import TOKEN_RE, new_token

    tokens = [new_token() for _ in range(200)]
    assert all(TOKEN_RE.match(t) and t[0].isalpha() for t in tokens)
    home = tmp_path / "home"
    home.mkdir()
    (home / "nats.token").write_text("7" * 43)  # a token from before the fix
    stack = Fleet(home).start()
    try:
        assert TOKEN_RE.match((home / "nats.token").read_text())
        assert stack.cli("ping", "local").returncode == 0
    finally:
        stack.stop()
