"""fleetbus on a real 3-node JetStream cluster (tests/support/natscluster.py): URL lists,
one replicas setting for every process, migrating R1 state to R3, NATS contexts."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import time
from pathlib import Path

import nats
import pytest
from fleetbus.jetstream import open_state
from fleetbus.replication import state_streams, survey, wait_current
from fleetbus.subjects import Names
from support.natscluster import NatsCluster, free_port
from support.natsjwt import AuthServer
from support.processes import FLEETBUS, Daemon, NatsServer, own_user, wait_for


def dead_url() -> str:
    """A loopback URL nothing listens on: the first server of a list that is down."""
    return f"nats://127.0.0.1:{free_port()}"


def environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env.update(FLEETBUS_PREFIX="c" + secrets.token_hex(4),
               FLEETBUS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
               FLEETBUS_HOME=str(tmp_path / "home"))
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETBUS, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


async def replicas_of(cluster: NatsCluster, prefix: str) -> dict[str, int | None]:
    nc = await cluster.connect()
    try:
        return {s.stream: s.found for s in await survey(nc, Names(prefix))}
    finally:
        await nc.close()


async def all_current(cluster: NatsCluster, prefix: str, timeout: float = 30.0) -> None:
    """Wait until every fleetbus stream has a leader and two current followers."""
    nc = await cluster.connect()
    try:
        deadline = time.monotonic() + timeout
        for stream in state_streams(Names(prefix)):
            assert await wait_current(nc, stream, 3, deadline), f"{stream} not caught up"
    finally:
        await nc.close()


async def test_a_worker_first_on_a_fresh_cluster_makes_r3_state_and_everything_starts_with_the_first_url_dead(
        cluster: NatsCluster, tmp_path: Path) -> None:
    env = environ(tmp_path, FLEETBUS_NATS_URL=f"{dead_url()},{cluster.urls}",
                  FLEETBUS_NATS_TOKEN=cluster.token)
    # No --replicas: the worker reads the cluster's size from the NATS it connected to.
    worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], env,
                    tmp_path / "worker.log", "serving local").start()
    core = None
    try:
        assert "(replicas 3)" in (tmp_path / "worker.log").read_text()
        found = await replicas_of(cluster, env["FLEETBUS_PREFIX"])
        assert found and set(found.values()) == {3}, found
        core = Daemon(["core", "--replicas", "3"], env, tmp_path / "core.log", "fleetbus core").start()
        assert "fewer replicas" not in (tmp_path / "core.log").read_text()

        added = cli(env, "servers", "add", "c1", "--transport", "local")
        assert added.returncode == 0, added.stderr
        wait_for(lambda: cli(env, "ping", "c1").returncode == 0, what="c1 served")
        ran = cli(env, "run", "c1", "--", "echo", "through the cluster")
        assert ran.returncode == 0 and "through the cluster" in ran.stdout, ran.stderr

        # A node dies and comes back: once JetStream has caught it up again, the CLI that
        # lists it first works, and the state kept its three replicas.
        first = cluster.nodes[0]
        cluster.kill(first)
        cluster.restart(first)
        await all_current(cluster, env["FLEETBUS_PREFIX"])
        ran = cli(dict(env, FLEETBUS_NATS_URL=cluster.urls), "run", "c1", "--", "echo", "after a restart")
        assert ran.returncode == 0 and "after a restart" in ran.stdout, ran.stderr

    finally:
        if core:
            core.stop()
        worker.stop()


async def test_migrate_moves_an_r1_deployment_to_r3_after_warning_about_it(
        cluster: NatsCluster, tmp_path: Path) -> None:
    env = environ(tmp_path, FLEETBUS_NATS_URL=cluster.urls, FLEETBUS_NATS_TOKEN=cluster.token)
    prefix = env["FLEETBUS_PREFIX"]
    worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()],
                    dict(env, FLEETBUS_REPLICAS="1"), tmp_path / "worker.log", "serving local").start()
    core = None
    try:
        assert "(replicas 1)" in (tmp_path / "worker.log").read_text()
        assert set((await replicas_of(cluster, prefix)).values()) == {1}

        # This core has the token in its URLs instead: it authenticates, and never prints it.
        in_urls = ",".join(n.url.replace("nats://", f"nats://{cluster.token}@") for n in cluster.nodes)
        core_env = {k: v for k, v in env.items() if k != "FLEETBUS_NATS_TOKEN"}
        core = Daemon(["core", "--replicas", "3"], dict(core_env, FLEETBUS_NATS_URL=in_urls),
                      tmp_path / "core.log", "fleetbus core").start()
        core_log = (tmp_path / "core.log").read_text()
        assert cluster.token not in core_log and "nats://***@127.0.0.1" in core_log
        warnings = [line for line in core_log.splitlines() if "fewer replicas" in line]
        assert len(warnings) == 1, warnings
        assert f"KV_{prefix}_servers (R1)" in warnings[0] and "fleetbus admin migrate --replicas 3" in warnings[0]

        moved = cli(env, "admin", "migrate", "--replicas", "3", "--json")
        assert moved.returncode == 0, moved.stderr
        report = json.loads(moved.stdout)
        assert {row["stream"] for row in report["streams"] if row["changed"]} == set(
            await replicas_of(cluster, prefix))
        assert all(row["current"] for row in report["streams"])
        found = await replicas_of(cluster, prefix)
        assert set(found.values()) == {3}, found

        again = cli(env, "admin", "migrate", "--replicas", "3")
        assert again.returncode == 0 and again.stdout.count("unchanged") == len(found), again.stdout
        # The deployment still works on its moved state.
        assert cli(env, "servers", "add", "m1", "--transport", "local").returncode == 0
        wait_for(lambda: cli(env, "ping", "m1").returncode == 0, what="m1 served")
    finally:
        if core:
            core.stop()
        worker.stop()


async def test_open_state_warns_once_naming_every_under_replicated_stream(
        cluster: NatsCluster, caplog: pytest.LogCaptureFixture) -> None:
    names = Names("w" + secrets.token_hex(4))
    nc = await cluster.connect()
    try:
        await open_state(nc, names, replicas=1)
        with caplog.at_level(logging.WARNING, logger="fleetbus.replication"):
            await open_state(nc, names, replicas=3)
    finally:
        await nc.close()
    lines = [r.getMessage() for r in caplog.records if "fewer replicas" in r.getMessage()]
    assert len(lines) == 1
    for stream in (f"KV_{names.commands_bucket}", f"OBJ_{names.files_bucket}", names.audit_stream,
                   names.jobs_stream):
        assert f"{stream} (R1)" in lines[0]


async def test_a_nats_context_gives_servers_and_token_and_secrets_stay_out_of_errors(
        cluster: NatsCluster, tmp_path: Path) -> None:
    prefix = "x" + secrets.token_hex(4)
    nc = await cluster.connect()
    try:
        await open_state(nc, Names(prefix), replicas=1)
    finally:
        await nc.close()
    config = tmp_path / "xdg"
    (config / "nats" / "context").mkdir(parents=True)
    (config / "nats" / "context" / "fb.json").write_text(json.dumps(
        {"description": "test cluster", "url": f"{dead_url()},{cluster.urls}", "token": cluster.token}))
    env = environ(tmp_path, XDG_CONFIG_HOME=str(config), FLEETBUS_PREFIX=prefix)

    dry = cli(env, "--nats-context", "fb", "admin", "migrate", "--replicas", "3", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert {row["found"] for row in json.loads(dry.stdout)["streams"]} == {1}
    assert set((await replicas_of(cluster, prefix)).values()) == {1}, "a dry run changes nothing"

    by_env = cli(dict(env, FLEETBUS_NATS_CONTEXT="fb"), "admin", "migrate", "--replicas", "1")
    assert by_env.returncode == 0 and "unchanged" in by_env.stdout, by_env.stderr

    # A token in a URL is never printed, not even when it is refused.
    wrong = "fbc_" + secrets.token_hex(16)
    refused = cli(env, "--nats", f"nats://{wrong}@127.0.0.1:{cluster.nodes[1].client_port}",
                  "admin", "migrate", "--replicas", "1")
    assert refused.returncode == 1 and "authorization refused" in refused.stderr, refused.stderr
    assert wrong not in refused.stderr and "***@127.0.0.1" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


async def test_a_creds_file_authenticates_a_worker_and_the_cli_and_an_nkey_comes_from_a_context(
        tmp_path: Path) -> None:
    jwt_nats = AuthServer(tmp_path / "jwt", mode="jwt").start()
    nkey_nats = AuthServer(tmp_path / "nkey", mode="nkey").start()
    try:
        assert jwt_nats.credentials and nkey_nats.credentials
        env = environ(tmp_path, FLEETBUS_NATS_URL=f"{dead_url()},{jwt_nats.url}",
                      FLEETBUS_NATS_CREDS=str(jwt_nats.credentials))
        worker = Daemon(["worker", "--transports", "local", "--local-user", own_user()], env,
                        tmp_path / "worker.log", "serving local").start()
        try:
            listed = cli(env, "admin", "migrate", "--replicas", "1")
            assert listed.returncode == 0 and "unchanged" in listed.stdout, listed.stderr
        finally:
            worker.stop()
        no_creds = cli({k: v for k, v in env.items() if k != "FLEETBUS_NATS_CREDS"},
                       "admin", "migrate", "--replicas", "1")
        assert no_creds.returncode == 1 and "authorization refused" in no_creds.stderr, no_creds.stderr

        prefix = "k" + secrets.token_hex(4)
        nc = await nats.connect(nkey_nats.url, nkeys_seed=str(nkey_nats.credentials))
        try:
            await open_state(nc, Names(prefix))
        finally:
            await nc.close()
        config = tmp_path / "xdg"
        (config / "nats" / "context").mkdir(parents=True)
        (config / "nats" / "context" / "nk.json").write_text(json.dumps(
            {"url": nkey_nats.url, "nkey": str(nkey_nats.credentials)}))
        by_context = cli(environ(tmp_path, XDG_CONFIG_HOME=str(config), FLEETBUS_PREFIX=prefix),
                         "--nats-context", "nk", "admin", "migrate", "--replicas", "1")
        assert by_context.returncode == 0 and "unchanged" in by_context.stdout, by_context.stderr
    finally:
        jwt_nats.stop()
        nkey_nats.stop()


def test_more_replicas_than_one_on_a_single_server_is_one_clear_line(
        nats_server: NatsServer, tmp_path: Path) -> None:
    out = cli(environ(tmp_path, FLEETBUS_NATS_URL=nats_server.url, FLEETBUS_REPLICAS="3"),
              "worker", "--transports", "local")
    assert out.returncode == 1 and "needs a NATS cluster" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_run_json_may_hold_a_list_and_a_context_and_no_secret_is_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetbus.connection import NatsSettings
    from fleetbus.home import Home

    config = tmp_path / "xdg"
    (config / "nats" / "context").mkdir(parents=True)
    (config / "nats" / "context" / "prod.json").write_text(json.dumps(
        {"url": "nats://ignored:4222", "user": "fleet", "password": "pw-in-context"}))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    home = Home(tmp_path / "home")
    home.ensure()
    home.write_run({"nats_url": ["nats://tok-in-url@a:4222", "nats://b:4222"], "prefix": "p",
                    "nats_context": "prod"})
    settings = NatsSettings.resolve(home=home)
    assert settings.servers == ["nats://tok-in-url@a:4222", "nats://b:4222"]
    assert (settings.user, settings.password, settings.prefix) == ("fleet", "pw-in-context", "p")
    assert settings.shown == "nats://***@a:4222,nats://b:4222"
    assert "tok-in-url" not in repr(settings) and "pw-in-context" not in repr(settings)


def test_a_bad_url_list_is_one_clear_line(tmp_path: Path) -> None:
    env = environ(tmp_path)
    for bad, says in (("nats://a:4222,,nats://b:4222", "no empty entry"),
                      ("nats://a:4222,http://b:80", "scheme must be one of"),
                      ("nats://a:4222,nats://b:port", "bad port"),
                      ("nats://a:4222,ws://b:80", "cannot be mixed")):
        out = cli(env, "--nats", bad, "admin", "migrate", "--replicas", "1")
        assert out.returncode == 1 and says in out.stderr, (bad, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    missing = cli(env, "--nats", "nats://127.0.0.1:1", "--nats-creds", str(tmp_path / "none.creds"),
                  "admin", "migrate", "--replicas", "1")
    assert missing.returncode == 1 and "cannot read the NATS credentials file" in missing.stderr


def test_the_shipped_units_pass_one_replicas_setting_from_the_environment_file() -> None:
    from fleetbus.natsconfig import split_urls

    ops = Path(__file__).parent.parent / "ops" / "systemd"
    for unit in ("fleetbus-core.service", "fleetbus-worker@.service"):
        text = (ops / unit).read_text()
        assert "EnvironmentFile=/etc/fleetbus/fleetbus.env" in text
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        assert "--replicas ${FLEETBUS_REPLICAS}" in exec_start, unit
    example = dict(line.split("=", 1) for line in (ops / "fleetbus.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["FLEETBUS_REPLICAS"] == "3"
    assert len(split_urls(example["FLEETBUS_NATS_URL"])) == 3
