"""Several gateways on one NATS: a shared CA, agents that move, one gateway per server.

Real processes: one nats-server, a `fleetbus core`, two `fleetbus worker --transports
agent-outbound` each with its own home (as on two machines) and gateway port, and real
`fleetbus-agent connect` processes given both gateways.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.agents import Agent
from support.ports import free_port
from support.processes import FLEETBUS, NATS_SERVER, Daemon, NatsServer, wait_for


@dataclass
class Deployment:
    env: dict[str, str]
    workdir: Path
    core: Daemon
    gateways: list[Daemon]
    listens: list[str]
    started: list[Daemon] = field(default_factory=list)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([FLEETBUS, *args], capture_output=True, text=True, env=self.env, timeout=60,
                              check=False)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    def records(self) -> list[dict[str, Any]]:
        proc = self.cli("gateway", "info", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else []

    def statuses(self) -> dict[str, dict[str, Any]]:
        found = json.loads(self.cli("servers", "list", "--json", check=True).stdout)
        return {s["name"]: s.get("status") or {} for s in found}

    def add(self, name: str) -> str:
        return json.loads(self.cli("servers", "add", name, "--transport", "agent-outbound", "--json",
                                   check=True).stdout)["key"]

    def gateway(self, listen: str, **settings: str) -> Daemon:
        home = self.workdir / f"gw-{listen.replace(':', '_').strip('[]')}"
        env = {**self.env, "FLEETBUS_HOME": str(home)}
        args = ["worker", "--transports", "agent-outbound", "--gateway-listen", listen]
        for key, value in settings.items():
            args += ["--transport-setting", f"agent-outbound.{key}={value}"]
        daemon = Daemon(args, env, self.workdir / f"{home.name}.log", "serving agent-outbound")
        self.started.append(daemon)  # stopped by the fixture even if it never got ready
        return daemon.start()


@pytest.fixture
def deployment(nats_server: NatsServer, tmp_path: Path) -> Iterator[Deployment]:
    with _deployment(nats_server.url, tmp_path) as dep:
        yield dep


@contextlib.contextmanager
def _deployment(url: str, tmp_path: Path) -> Iterator[Deployment]:
    """A core on ``url`` (gateways are started by the test); everything stopped after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env.update(FLEETBUS_NATS_URL=url, FLEETBUS_PREFIX="h" + secrets.token_hex(4),
               FLEETBUS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
               FLEETBUS_HOME=str(tmp_path / "core-home"))
    core = Daemon(["core"], env, tmp_path / "core.log", "fleetbus core").start()
    dep = Deployment(env, tmp_path, core, [], [])
    try:
        yield dep
    finally:
        for daemon in dep.started:
            daemon.stop()
        core.stop()


def start_two_gateways(dep: Deployment, listens: list[str] | None = None) -> list[dict[str, Any]]:
    """Two gateways started at once (the CA race), and their records in listen order."""
    dep.listens = listens or [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        dep.gateways = list(pool.map(dep.gateway, dep.listens))

    def both() -> list[dict[str, Any]] | None:
        records = dep.records()
        return records if len(records) == 2 else None

    records = wait_for(both, what="two gateway records")
    by_address = {r["address"]: r for r in records}
    return [by_address[listen.replace("[", "").replace("]", "")] for listen in dep.listens]


def pings(dep: Deployment, names: list[str]) -> dict[str, bool]:
    with ThreadPoolExecutor(8) as pool:
        results = pool.map(lambda n: dep.cli("ping", n).returncode == 0, names)
    return dict(zip(names, results, strict=True))


def start_agents(dep: Deployment, tmp_path: Path, names: list[str], gateways: list[str], pin: str,
                 keys: dict[str, str] | None = None) -> list[Agent]:
    keys = keys or {name: dep.add(name) for name in names}
    return [Agent(tmp_path / f"agent-{name}", gateways[0], pin, keys[name], more_gateways=gateways[1:]).start()
            for name in names]


def test_agents_of_a_killed_gateway_answer_through_the_other(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    first, second = start_two_gateways(dep)
    # One identity: the same CA, each gateway its own certificate.
    assert first["ca_fingerprint"] == second["ca_fingerprint"] and first["ca_fingerprint"]
    assert first["fingerprint"] != second["fingerprint"]
    ca_pin = first["ca_fingerprint"]

    shown = dep.cli("servers", "add", "shown", "--transport", "agent-outbound", check=True).stdout
    assert f"--gateway {first['address']}" in shown and f"--gateway {second['address']}" in shown
    assert f"--fingerprint {ca_pin}" in shown

    names = [f"ha{i}" for i in range(6)]
    agents = start_agents(dep, tmp_path, names, [first["address"], second["address"]], ca_pin)
    # An agent that knows only the first gateway: it must read offline once that one is gone.
    lonely = start_agents(dep, tmp_path, ["lonely"], [first["address"]], ca_pin)
    try:
        wait_for(lambda: all(pings(dep, [*names, "lonely"]).values()), timeout=60, what="every agent online")
        # A status is written just after the subscription that answers the ping: waited for.
        served_by = wait_for(lambda: (by := {dep.statuses()[n].get("served_by") for n in names}) and len(by) == 1
                             and by, what="every status written")
        assert served_by == {first["worker"]}, "agents dial in order"

        dep.gateways[0].stop(signal.SIGKILL)
        killed = time.monotonic()
        answered: dict[str, float] = {}

        def all_answer() -> bool:
            for name, ok in pings(dep, [n for n in names if n not in answered]).items():
                if ok:
                    answered[name] = time.monotonic() - killed
            return len(answered) == len(names)

        wait_for(all_answer, timeout=60, what="every agent through the other gateway")
        print(f"\nagents of the killed gateway answering through the other: "
              f"{max(answered.values()):.1f} s for all {len(names)} (first {min(answered.values()):.1f} s)")

        def all_on_second() -> bool:
            statuses = dep.statuses()
            return all(statuses[n].get("served_by") == second["worker"] and statuses[n].get("state") == "online"
                       for n in names)

        wait_for(all_on_second, timeout=20, what="every status online through the second gateway")

        # The dead gateway leaves `gateway info`, and its last agent reads offline,
        # within seconds rather than the record's 60 s expiry.
        def reflected() -> bool:
            records = dep.records()
            lone = dep.statuses()["lonely"]
            return [r["worker"] for r in records] == [second["worker"]] and lone.get("state") == "offline"

        wait_for(reflected, timeout=40, what="the dead gateway gone from gateway info and its agent offline")
        print(f"gateway info and servers list reflect the death after {time.monotonic() - killed:.1f} s")
        assert "stopped" in (dep.statuses()["lonely"].get("detail") or "")
    finally:
        for agent in [*agents, *lonely]:
            agent.stop()


def test_one_gateway_serves_a_server_even_with_two_agents_for_it(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    first, second = start_two_gateways(dep)
    key = dep.add("twin")
    # The same server's key in two agents, one per gateway (a plausible HA mistake).
    one = Agent(tmp_path / "one", first["address"], first["ca_fingerprint"], key).start()
    two: Agent | None = None
    runs = tmp_path / "runs"
    runs.mkdir()
    outcomes: list[int] = []
    try:
        wait_for(lambda: dep.cli("ping", "twin").returncode == 0, timeout=30, what="twin online")
        for i in range(40):
            if i == 5:
                two = Agent(tmp_path / "two", second["address"], second["fingerprint"], key).start()
            # No command id: only delivery to exactly one gateway keeps this from running twice.
            proc = dep.cli("run", "twin", "--timeout", "10", "--", "sh", "-c", f"echo ran >> {runs}/{i}")
            outcomes.append(proc.returncode)
        ran_twice = {p.name: n for p in runs.iterdir() if (n := len(p.read_text().splitlines())) > 1}
        assert not ran_twice, f"commands that ran twice: {ran_twice}"
        assert sum(1 for code in outcomes if code == 0) >= 10, outcomes
        # The takeover crossed gateways: one of the gateways closed its link because the
        # other claimed the server (cluster-wide, not only within one gateway).
        assert two is not None
        assert "now served by gateway" in one.log() + two.log()
        wait_for(lambda: dep.statuses()["twin"].get("state") == "online", what="twin online in servers list")
    finally:
        one.stop()
        if two is not None:
            two.stop()


def _loopback_pair() -> int | None:
    """A port free on 127.0.0.1 and ::1 when `localhost` resolves to both, else None."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as six:
            six.bind(("::1", 0))
            port = int(six.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as four:
                four.bind(("127.0.0.1", port))
    except OSError:
        return None
    return port if {"127.0.0.1", "::1"} <= found else None


def test_a_name_with_two_addresses_is_two_gateways(deployment: Deployment, tmp_path: Path) -> None:
    port = _loopback_pair()
    if port is None:
        pytest.skip("localhost does not resolve to both 127.0.0.1 and ::1 here, or ::1 is unusable")
    dep = deployment
    first, second = start_two_gateways(dep, [f"127.0.0.1:{port}", f"[::1]:{port}"])
    order = [info[4][0] for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)]
    agents = start_agents(dep, tmp_path, ["dns1"], [f"localhost:{port}"], first["ca_fingerprint"])
    try:
        wait_for(lambda: dep.cli("ping", "dns1").returncode == 0, timeout=30, what="dns1 online")
        # The first address the name resolves to is dialled first.
        dialled = 1 if order[0] == "::1" else 0
        wait_for(lambda: dep.statuses()["dns1"].get("served_by") == (first, second)[dialled]["worker"],
                 what="dns1 on the first address")
        dep.gateways[dialled].stop(signal.SIGKILL)
        other = (first, second)[1 - dialled]
        wait_for(lambda: dep.cli("ping", "dns1").returncode == 0, timeout=30, what="dns1 through the other address")
        wait_for(lambda: dep.statuses()["dns1"].get("served_by") == other["worker"], what="dns1 on the other")
    finally:
        for agent in agents:
            agent.stop()


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between the two contexts over memory buffers: (client, server) ends."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli_obj = client.wrap_bio(c_in, c_out, server_hostname=name)
    srv_obj = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj, out, peer_in in (("c", cli_obj, c_out, s_in), ("s", srv_obj, s_out, c_in)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return cli_obj, srv_obj
    raise AssertionError("the handshake did not finish")


def test_a_bundle_of_two_cas_with_one_name_verifies_either_gateway(tmp_path: Path) -> None:
    """Key identifiers tell two CAs of the same name apart (an old per-gateway CA and
    the deployment's in one bundle): certificates of both verify against the bundle."""
    from fleetbus.certs import GatewayCA, server_context
    from fleetbus.home import Home
    from fleetbus.vault import MasterKey

    master = MasterKey(secrets.token_bytes(32), "test")
    old, new = GatewayCA.create("fleetbus gateway CA same"), GatewayCA.create("fleetbus gateway CA same")
    assert GatewayCA.unseal(new.seal(master), master).fingerprint == new.fingerprint
    bundle = ssl.create_default_context(cadata=(old.cert_pem + new.cert_pem).decode())
    for i, ca in enumerate((old, new)):
        files = ca.write(Home(tmp_path / f"gw{i}"), master, ["gw.example"])
        _handshake(server_context(files, master), bundle, "gw.example")

    # The CA probe: asked for CA_PROBE_NAME, a gateway shows the CA itself.
    from fleetbus_agent.connect import CA_PROBE_NAME

    gateway = server_context(files, master, ca_probe_name=CA_PROBE_NAME)
    anyone = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anyone.check_hostname, anyone.verify_mode = False, ssl.CERT_NONE
    client, server = _handshake(gateway, anyone, CA_PROBE_NAME)
    assert ssl.DER_cert_to_PEM_cert(client.getpeercert(binary_form=True)).encode() == new.cert_pem
    assert server.context is not gateway  # how the gateway tells a probe from an agent
    client, server = _handshake(gateway, anyone, "gw.example")
    assert ssl.DER_cert_to_PEM_cert(client.getpeercert(binary_form=True)).encode() != new.cert_pem
    assert server.context is gateway


def test_an_earlier_gateways_ca_becomes_the_deployments_and_its_agents_keep_working(
        deployment: Deployment, tmp_path: Path) -> None:
    """Upgrading: a gateway with the CA and certificate an earlier version made (`fleetbus
    gateway cert`) is restarted first; its CA becomes the deployment's. Agents given that
    CA file accept a new gateway too; an agent pinning the old gateway's own certificate
    keeps working with it and refuses the new one."""
    dep = deployment
    listens = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    old_home = dep.workdir / f"gw-{listens[0].replace(':', '_')}"
    made = subprocess.run([FLEETBUS, "gateway", "cert", "--host", "localhost", "--host", "127.0.0.1"],
                          capture_output=True, text=True, env={**dep.env, "FLEETBUS_HOME": str(old_home)},
                          timeout=60, check=True).stdout
    old_leaf = next(line.split()[1] for line in made.splitlines() if line.startswith("fingerprint"))
    old_ca = old_home / "gateway" / "ca.pem"
    dep.listens = listens
    dep.gateways = [dep.gateway(listens[0])]
    wait_for(lambda: len(dep.records()) == 1, what="the upgraded gateway's record")
    dep.gateways.append(dep.gateway(listens[1]))
    records = wait_for(lambda: (r := dep.records()) and len(r) == 2 and r, what="both records")
    by_address = {r["address"]: r for r in records}
    old, new = by_address[listens[0]], by_address[listens[1]]
    assert old["fingerprint"] == old_leaf, "the upgraded gateway keeps its certificate"
    ca_fingerprint = subprocess.run(
        ["openssl", "x509", "-in", str(old_ca), "-noout", "-fingerprint", "-sha256"],
        capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip().replace(":", "").lower()
    assert old["ca_fingerprint"] == new["ca_fingerprint"] == f"sha256:{ca_fingerprint}"

    keys = {name: dep.add(name) for name in ("pinned", "withca")}
    pinned = Agent(tmp_path / "pinned", old["address"], old_leaf, keys["pinned"],
                   more_gateways=[new["address"]]).start()
    withca = Agent(tmp_path / "withca", new["address"], None, keys["withca"], ca=str(old_ca)).start()
    try:
        wait_for(lambda: all(pings(dep, ["pinned", "withca"]).values()), timeout=30, what="both agents")
        wait_for(lambda: dep.statuses()["withca"].get("served_by") == new["worker"],
                 what="the old CA file accepting the new gateway")
        wait_for(lambda: dep.statuses()["pinned"].get("served_by") == old["worker"], what="pinned on the old one")
        # --ca and --fingerprint together: the certificate must chain to the CA and be pinned.
        both = Agent(tmp_path / "both", new["address"], old_leaf, keys["withca"], ca=str(old_ca)).start()
        wait_for(lambda: "does not match the pinned fingerprint" in both.log(), what="--ca with a wrong pin refused")
        both.stop()
        dep.gateways[0].stop(signal.SIGKILL)
        wait_for(lambda: "does not match the pinned fingerprint" in pinned.log(), timeout=30,
                 what="the old-pinned agent refusing the new gateway")
        assert dep.cli("ping", "withca").returncode == 0
    finally:
        pinned.stop()
        withca.stop()


def test_a_gateway_answers_a_server_in_the_queue_group(tmp_path: Path) -> None:
    """The guarantee beneath the claims: a server's subjects are subscribed in a queue
    group, so while two gateways subscribe (one taking over from the other) NATS hands
    each request to one of them. Read from the NATS server's own list of subscriptions."""
    workdir = tmp_path / "nats"
    workdir.mkdir()
    (workdir / "nats.conf").write_text(
        'host: "127.0.0.1"\nport: -1\nhttp: "127.0.0.1:-1"\n'
        f"ports_file_dir: {json.dumps(str(workdir))}\n"
        f"jetstream {{ store_dir: {json.dumps(str(workdir / 'js'))} }}\n")
    with open(workdir / "nats.log", "ab") as log:
        nats = subprocess.Popen([NATS_SERVER, "-c", str(workdir / "nats.conf")], stdout=log, stderr=log)
    try:
        ports = wait_for(lambda: (f := workdir / f"nats-server_{nats.pid}.ports").exists()
                         and json.loads(f.read_text()), what="nats-server ports")
        with _deployment(ports["nats"][0], tmp_path) as dep:
            gateway = start_two_gateways(dep)[0]
            agents = start_agents(dep, tmp_path, ["queued"], [gateway["address"]], gateway["ca_fingerprint"])
            try:
                wait_for(lambda: dep.cli("ping", "queued").returncode == 0, what="queued online")
                with urllib.request.urlopen(f"{ports['monitoring'][0]}/connz?subs=detail", timeout=10) as resp:
                    connz = json.load(resp)
                subject = f"{dep.env['FLEETBUS_PREFIX']}.v1.servers.queued.*"
                subs = [sub for conn in connz["connections"] for sub in conn.get("subscriptions_list_detail", [])
                        if sub["subject"] == subject]
                assert subs, "the gateway subscribed to the server's subjects"
                assert {sub.get("qgroup") for sub in subs} == {f"{dep.env['FLEETBUS_PREFIX']}.transport.agent-outbound"}
            finally:
                for agent in agents:
                    agent.stop()
    finally:
        nats.terminate()
        nats.wait(30)
