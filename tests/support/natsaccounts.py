"""A real nats-server with fleetbus's two accounts, configured by hand (issue 21).

``FLEETBUS`` holds JetStream, fleetbus's processes and the owner (user ``owner`` with a
password); ``USERS`` holds nkey users, each with its own publish permissions and the
subscribe permission ``_I.<its public key>.>`` (its inboxes). FLEETBUS exports the
server, grant, admin and jobs subjects as services (``response_type: stream``, replies
allowed for 6 h) and its users' inboxes ``_I.>`` as a stream; USERS imports them, the
services with ``share: true`` so that ``Nats-Request-Info`` names the user. This is the
research's layout (/work/briefs/issue21-research.md, Q1, Q2, Q7), written out for the
tests before fleetbus generates it itself.
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
from nats.aio.client import Client as NATS

from .processes import NATS_SERVER, stop_process, wait_for


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

    def config(self) -> str:
        p = self.prefix
        services = [f"{p}.v1.servers.*.*", f"{p}.v1.grants.*.*.*", f"{p}.v1.admin.>", f"{p}.v1.jobs.>"]
        exports = "\n".join(
            f'      {{service: "{s}", response_type: stream, response_threshold: "6h"}}' for s in services)
        imports = "\n".join(
            f'      {{service: {{account: FLEETBUS, subject: "{s}"}}, share: true}}' for s in services)
        users = "\n".join(
            f"      {{nkey: {u.public}, permissions: {{publish: {{allow: {json.dumps(list(u.publish))}}}, "
            f"subscribe: {{allow: [\"{u.inbox}.>\"]}}}}}}" for u in self.users)
        store = self.workdir / "js"
        # The password is in the config file (0600), never on argv.
        return f"""host: "127.0.0.1"
port: -1
ports_file_dir: {json.dumps(str(self.workdir))}
jetstream {{ store_dir: {json.dumps(str(store))} }}
accounts {{
  FLEETBUS {{
    jetstream: enabled
    users: [ {{user: owner, password: {json.dumps(self.password)}}} ]
    exports: [
{exports}
      {{stream: "_I.>"}}
    ]
  }}
  USERS {{
    users: [
{users}
    ]
    imports: [
{imports}
      {{stream: {{account: FLEETBUS, subject: "_I.>"}}}}
    ]
  }}
}}
"""

    def start(self) -> AccountsNats:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.touch(mode=0o600)
        conf.write_text(self.config())
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
