"""A real 3-node JetStream cluster on loopback: three nats-server processes, routed to
each other, each with its own JetStream store, all requiring one token.

Ports are fixed when the cluster is made (free ones, found by binding port 0), so a node
that is killed comes back on the same client and route ports with its store intact.
Readiness is a condition with a deadline: every running node's monitoring endpoint
(``/jsz``) names the same JetStream meta leader and counts every node.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from .ports import free_port
from .processes import NATS_SERVER, shared_env, stop_process, wait_for

CLUSTER_NAME = "fbtest"


@dataclass
class Node:
    name: str
    workdir: Path
    client_port: int
    route_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def jsz(self) -> dict[str, Any] | None:
        """The node's JetStream monitoring page; None while it does not answer."""
        return self._monitor("jsz")

    def varz(self) -> dict[str, Any] | None:
        """The node's general monitoring page (``connect_urls``: the members it tells
        clients about); None while it does not answer."""
        return self._monitor("varz")

    def _monitor(self, page: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{page}", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None


@dataclass
class NatsCluster:
    """Three routed nats-servers with JetStream and token auth; ``urls`` is the list a
    fleetbus process is given."""

    workdir: Path
    size: int = 3
    token: str = field(default_factory=lambda: "fbc_" + secrets.token_hex(16))
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i in range(self.size):
            name = f"n{i + 1}"
            self.nodes.append(Node(name, self.workdir / name, free_port(), free_port(), free_port()))

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def client_env(self) -> dict[str, str]:
        """What a fleetbus process or the CLI needs to use this cluster."""
        return {"FLEETBUS_NATS_URL": self.urls, "FLEETBUS_NATS_TOKEN": self.token}

    def fleet_env(self, prefix: str, home: Path) -> dict[str, str]:
        """The environment of fleetbus processes (core, workers, the CLI) sharing this
        cluster under ``prefix``, with a fresh master key (support/processes.py)."""
        return shared_env(self.urls, prefix, home, FLEETBUS_NATS_TOKEN=self.token)

    async def connect(self, **options: Any) -> NATS:
        """A plain nats-py client on the cluster, as another system would use it."""
        return await nats.connect(servers=self.urls.split(","), token=self.token, **options)

    def _config(self, node: Node) -> str:
        routes = ", ".join(f"nats://127.0.0.1:{n.route_port}" for n in self.nodes if n is not node)
        store = json.dumps(str(node.workdir / "js"))
        # The token is in the config file because the test owns it; fleetbus's embedded
        # NATS passes its own through the environment instead.
        return (
            f'server_name: "{node.name}"\nhost: "127.0.0.1"\nport: {node.client_port}\n'
            f"http_port: {node.http_port}\nmax_payload: 8388608\n"
            f'authorization {{ token: "{self.token}" }}\n'
            f"jetstream {{ store_dir: {store} }}\n"
            f'cluster {{ name: "{CLUSTER_NAME}"\n  host: "127.0.0.1"\n  port: {node.route_port}\n'
            f"  routes: [{routes}]\n}}\n"
        )

    def start_node(self, node: Node) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.write_text(self._config(node))
        with open(node.workdir / "nats.log", "ab") as log:
            node.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            self.start_node(node)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait until every running node names the same meta leader and the leader sees
        every other running node as a current, online peer (so JetStream can place R3
        state at once), and every running node tells clients about every running node
        (a process that reads the cluster's size on connecting counts them all);
        returns the leader's name."""

        def ready() -> str | None:
            leaders, metas = set(), {}
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None and node.proc.returncode not in (
                        -signal.SIGKILL, -signal.SIGTERM, 0):
                    raise RuntimeError((node.workdir / "nats.log").read_text()[-2000:])
                if not node.running:
                    continue
                meta = (node.jsz() or {}).get("meta_cluster") or {}
                if not meta.get("leader") or meta.get("cluster_size", 0) < self.size:
                    return None
                if len((node.varz() or {}).get("connect_urls") or []) < sum(n.running for n in self.nodes):
                    return None
                leaders.add(meta["leader"])
                metas[node.name] = meta
            if len(leaders) != 1 or (leader := leaders.pop()) not in metas:
                return None
            peers = {p.get("name"): p for p in metas[leader].get("replicas") or []}
            for name in metas:
                if name != leader and (name not in peers or not peers[name].get("current")
                                       or peers[name].get("offline")):
                    return None
            return leader

        try:
            return wait_for(ready, timeout=timeout, what="a JetStream meta leader on the cluster")
        except TimeoutError as exc:  # say what each node saw, for whoever reads the failure
            views = {n.name: (n.jsz() or {}).get("meta_cluster") if n.running else "not running"
                     for n in self.nodes}
            raise TimeoutError(f"{exc}; meta views: {json.dumps(views)}") from None

    def kill(self, node: Node) -> None:
        """SIGKILL one node: no goodbye to its routes or clients."""
        stop_process(node.proc, signal.SIGKILL)

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        if node.running:
            self.kill(node)
        self.start_node(node)
        self.wait_ready(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            stop_process(node.proc)
