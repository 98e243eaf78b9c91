"""A real nats-server with fleetbus's two accounts, as a shared NATS has them (issue 21).

``FLEETBUS`` holds JetStream, fleetbus's processes and the owner (user ``owner`` with a
password); ``USERS`` holds nkey users, each with its own publish permissions and the
subscribe permission ``_I.<its public key>.>`` (its inboxes). FLEETBUS exports the
server, grant, admin, jobs and transfer subjects as services (``response_type: stream``, replies
allowed for 6 h) and its users' inboxes ``_I.>`` as a stream; USERS imports them, the
services with ``share: true`` so that ``Nats-Request-Info`` names the user. This is the
research's layout (/work/briefs/issue21-research.md, Q1, Q2, Q7), rendered by
fleetbus's own ``account_config``; the users, with whatever permissions a test gives
them, are written by hand.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nkeys
from fleetbus.natsaccounts import account_config
from nats.aio.client import Client as NATS

from .processes import NATS_SERVER, stop_process, wait_for

USERS_FILE = "users.conf"


@dataclass(frozen=True)
class NkeyUser:
    """A USERS user: its seed (the secret, kept by the test only) and public key."""

    name: str
    seed: str
    public: str
    publish: tuple[str, ...]

    @classmethod
    def new(cls, name: str, publish: Sequence[str]) -> NkeyUser:
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()
        public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
        return cls(name, seed, public, tuple(publish))

    @property
    def inbox(self) -> str:
        """Its inbox prefix (without the final dot), as nats-py's ``inbox_prefix``: its
        public key's (subjects.Names.user_inbox)."""
        return f"_I.{self.public}"

    def record(self, grants: Sequence[dict[str, object]] = ()) -> bytes:
        """Its record in the users bucket (the public parts: grants.py reads them)."""
        return json.dumps({"name": self.name, "public_key": self.public, "grants": list(grants)}).encode()


@dataclass
class AccountsNats:
    """The nats-server; :meth:`start`, :meth:`owner` and :meth:`user` connections, :meth:`stop`."""

    workdir: Path
    prefix: str
    users: list[NkeyUser]
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def users_config(self) -> str:
        """The USERS account's users file: each user with the permissions it was given."""
        users = "\n".join(
            f"  {{nkey: {u.public}, permissions: {{publish: {{allow: {json.dumps(list(u.publish))}}}, "
            f"subscribe: {{allow: [\"{u.inbox}.>\"]}}}}}}" for u in self.users)
        return f"users: [\n{users}\n]\n"

    def config(self) -> str:
        """The server's config: fleetbus's own accounts block (the one the embedded NATS
        runs and `fleetbus nats accounts` prints), with the owner as a password user."""
        store = self.workdir / "js"
        accounts = account_config(self.prefix, USERS_FILE,
                                  [json.dumps({"user": "owner", "password": self.password})])
        # The password is in the config file (0600), never on argv.
        return "\n".join([
            'host: "127.0.0.1"',
            "port: -1",
            f"ports_file_dir: {json.dumps(str(self.workdir))}",
            f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
            *accounts,
            "",
        ])

    def start(self) -> AccountsNats:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.touch(mode=0o600)
        conf.write_text(self.config())
        (self.workdir / USERS_FILE).write_text(self.users_config())
        with open(self.workdir / "nats.log", "ab") as log:
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        ports = self.workdir / f"nats-server_{self.proc.pid}.ports"

        def ready() -> str | None:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "nats.log").read_text()[-2000:])
            try:
                return json.loads(ports.read_text())["nats"][0] if ports.exists() else None
            except (ValueError, KeyError):
                return None

        self.url = wait_for(ready, what="nats-server with accounts to listen")
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    async def owner(self) -> NATS:
        """A connection in FLEETBUS as the owner, as fleetbus's own processes connect."""
        return await nats.connect(self.url, user="owner", password=self.password)

    async def user(self, name: str, errors: list[Exception] | None = None) -> NATS:
        """A raw nats-py connection as USERS user ``name``, its inboxes under ``_I.<public key>``;
        NATS's errors (permission violations) are appended to ``errors``."""
        found = next(u for u in self.users if u.name == name)

        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(exc)

        return await nats.connect(self.url, nkeys_seed_str=found.seed, inbox_prefix=found.inbox,
                                  error_cb=on_error)
