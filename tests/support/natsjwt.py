"""A nats-server in operator (JWT) mode with a `.creds` file, and one with an nkey user,
for the tests of fleetbus's NATS credentials. Keys and JWTs are made here with nkeys
(what nats-py itself uses to sign), so no `nsc` is needed.

A JWT is ``base64url(header).base64url(claims).base64url(ed25519 signature)``, signed by
the issuer's key: the operator signs itself and the account, the account signs the user.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from .processes import NATS_SERVER, stop_process, wait_for

UNLIMITED = -1


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {"jti": base64.b32encode(secrets.token_bytes(32)).decode().rstrip("="),
              "iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name,
              "sub": subject, "nats": {**nats_claims, "version": 2}}
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def creds_file(user_jwt: str, user: nkeys.KeyPair) -> str:
    """The `.creds` layout `nsc` writes and nats-py reads."""
    return (f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")


@dataclass
class AuthServer:
    """One nats-server with JetStream whose clients authenticate with a `.creds` file
    (``mode="jwt"``) or an nkey seed (``mode="nkey"``)."""

    workdir: Path
    mode: str = "jwt"
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    credentials: Path | None = None  # the .creds file, or the nkey seed file

    def start(self) -> AuthServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        store = json.dumps(str(self.workdir / "js"))
        auth = self._jwt_auth() if self.mode == "jwt" else self._nkey_auth()
        conf = self.workdir / "nats.conf"
        conf.write_text(f'host: "127.0.0.1"\nport: -1\nports_file_dir: {json.dumps(str(self.workdir))}\n'
                        f"jetstream {{ store_dir: {store} }}\n{auth}")
        with open(self.workdir / "nats.log", "ab") as log:
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        ports = self.workdir / f"nats-server_{self.proc.pid}.ports"

        def ready() -> str | None:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "nats.log").read_text()[-2000:])
            try:
                return json.loads(ports.read_text())["nats"][0]
            except (FileNotFoundError, ValueError, KeyError):
                return None

        self.url = wait_for(ready, what="nats-server with auth to listen")
        return self

    def _jwt_auth(self) -> str:
        operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
        account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
        user = new_key(nkeys.PREFIX_BYTE_USER)
        op_pub, acc_pub = operator.public_key.decode(), account.public_key.decode()
        operator_jwt = jwt(operator, op_pub, "fbtest", {"type": "operator"})
        limits = {k: UNLIMITED for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf",
                                         "mem_storage", "disk_storage", "streams", "consumer")}
        account_jwt = jwt(operator, acc_pub, "fleet", {"type": "account",
                                                       "limits": {**limits, "wildcards": True}})
        sys_pub = system.public_key.decode()
        system_jwt = jwt(operator, sys_pub, "SYS", {"type": "account"})
        user_jwt = jwt(account, user.public_key.decode(), "fleetbus",
                       {"type": "user", "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED})
        self.credentials = self.workdir / "fleetbus.creds"
        self.credentials.write_text(creds_file(user_jwt, user))
        os.chmod(self.credentials, 0o600)
        return (f"operator: {operator_jwt}\nsystem_account: {sys_pub}\nresolver: MEMORY\n"
                f"resolver_preload: {{ {acc_pub}: {account_jwt}, {sys_pub}: {system_jwt} }}\n")

    def _nkey_auth(self) -> str:
        user = new_key(nkeys.PREFIX_BYTE_USER)
        self.credentials = self.workdir / "fleetbus.nk"
        self.credentials.write_text(user.seed.decode() + "\n")
        os.chmod(self.credentials, 0o600)
        return f'authorization {{ users: [ {{ nkey: "{user.public_key.decode()}" }} ] }}\n'

    def stop(self) -> None:
        stop_process(self.proc)
