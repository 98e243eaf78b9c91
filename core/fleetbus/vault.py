"""The credential vault: named secrets, encrypted at rest with AES-256-GCM.

The master key (base64 of 32 bytes) comes from the first of these that is set:

1. ``FLEETBUS_MASTER_KEY``, the key itself. ``fleetbus up|core|worker`` take it out of
   their environment at start (:mod:`fleetbus_base.ownenv`), so it is neither in
   ``/proc/<pid>/environ`` nor inherited by anything they start.
2. ``FLEETBUS_MASTER_KEY_FILE``, a file holding it (mode 0600 if a regular file;
   ``/dev/fd/N`` reads an inherited descriptor), so it need never be in an environment.
3. systemd's ``LoadCredential=fleetbus-master-key:PATH`` (``$CREDENTIALS_DIRECTORY``).
4. ``master.key`` in the home folder, created with mode 0600 on first start.

Only the core and the workers that open connections hold it; the CLI never does: it
hands secrets to the core's admin service, which encrypts them before they touch the
bucket.

Each value is sealed with a fresh 96-bit nonce and the credential's name as associated
data, so a ciphertext copied under another name fails to open. A dump of the bucket
shows names, types and users, never a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fleetbus_base.ownenv import secret
from nats.js.errors import KeyWrongLastSequenceError, NoKeysError
from nats.js.errors import NotFoundError as KVNotFound
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import AuthFailed, InternalError, InvalidRequest, NotFound
from .home import Home, create_private
from .names import check_credential_name
from .records import CredentialInfo
from .transport import Credential

ENV_MASTER_KEY = "FLEETBUS_MASTER_KEY"
ENV_MASTER_KEY_FILE = "FLEETBUS_MASTER_KEY_FILE"
ENV_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # set by systemd for LoadCredential=
SYSTEMD_CREDENTIAL = "fleetbus-master-key"
MAX_KEY_FILE = 4096
KEY_BYTES = 32
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class MasterKey:
    key: bytes
    source: str

    def __repr__(self) -> str:
        return f"MasterKey(source={self.source!r})"

    @property
    def key_id(self) -> str:
        """A public fingerprint of the key, to tell 'wrong key' from 'corrupt data'."""
        return hashlib.sha256(b"fleetbus-master-key-id\0" + self.key).hexdigest()[:16]

    @classmethod
    def load(cls, home: Home, create: bool = True) -> MasterKey:
        """The key from the first source set (see the module docstring); with ``create``,
        a new ``master.key`` in ``home`` when none is. ``source`` says which, never the key."""
        env = secret(ENV_MASTER_KEY)
        if env:
            return cls(_decode_key(env, ENV_MASTER_KEY), ENV_MASTER_KEY)
        named = secret(ENV_MASTER_KEY_FILE)
        if named:
            return cls(_read_key_file(Path(named), ENV_MASTER_KEY_FILE), named)
        credentials = secret(ENV_CREDENTIALS_DIRECTORY)
        if credentials and (Path(credentials) / SYSTEMD_CREDENTIAL).exists():
            path = Path(credentials) / SYSTEMD_CREDENTIAL
            return cls(_read_key_file(path, f"systemd credential {SYSTEMD_CREDENTIAL}"), str(path))
        path = home.master_key
        if create:
            home.ensure()
            fresh = base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n"
            create_private(path, fresh)
        elif not path.exists():
            raise NotFound(
                f"no master key: set {ENV_MASTER_KEY_FILE} (or {ENV_MASTER_KEY}) or copy the "
                f"core's {path.name} to {path}"
            )
        return cls(_read_key_file(path, str(path)), str(path))


def _read_key_file(path: Path, where: str) -> bytes:
    """The key in ``path``: a regular file must be readable by its owner only; a pipe or
    an inherited descriptor (``/dev/fd/N``) is read as it is."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
                raise InvalidRequest(f"{path} is readable by others; run: chmod 600 {path}")
            raw = fh.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise NotFound(f"no master key: {where} names {path}, which does not exist") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read the master key from {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return _decode_key(text, where)


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise InvalidRequest(f"the master key in {where} is not base64 of {KEY_BYTES} bytes")
    return key


class _Sealed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    info: CredentialInfo
    key_id: str
    nonce: str
    ciphertext: str


def _aad(name: str) -> bytes:
    return f"fleetbus-credential-v1:{name}".encode()


class Vault:
    def __init__(self, kv: KeyValue, master: MasterKey | None) -> None:
        self.kv = kv
        self.master = master

    def _aead(self) -> AESGCM:
        if self.master is None:
            raise InternalError("this process holds no master key and cannot use secrets")
        return AESGCM(self.master.key)

    def seal(self, info: CredentialInfo, secret: bytes, passphrase: bytes | None) -> bytes:
        if not secret:
            raise InvalidRequest(f"credential {info.name}: the secret is empty")
        if len(secret) > MAX_SECRET_BYTES or len(passphrase or b"") > MAX_SECRET_BYTES:
            raise InvalidRequest(f"credential {info.name}: the secret is larger than 64 KiB")
        aead = self._aead()
        assert self.master is not None
        plain = json.dumps(
            {
                "secret": base64.b64encode(secret).decode(),
                "passphrase": None if passphrase is None else base64.b64encode(passphrase).decode(),
            }
        ).encode()
        nonce = secrets.token_bytes(12)
        ct = aead.encrypt(nonce, plain, _aad(info.name))
        sealed = _Sealed(
            info=info,
            key_id=self.master.key_id,
            nonce=base64.b64encode(nonce).decode(),
            ciphertext=base64.b64encode(ct).decode(),
        )
        return sealed.model_dump_json().encode()

    def open(self, raw: bytes) -> Credential:
        sealed = self._parse(raw)
        aead = self._aead()
        assert self.master is not None
        if not hmac.compare_digest(sealed.key_id, self.master.key_id):
            raise AuthFailed(
                f"credential {sealed.info.name} was sealed with another master key "
                f"(this process uses the key from {self.master.source})"
            )
        try:
            plain = aead.decrypt(
                base64.b64decode(sealed.nonce), base64.b64decode(sealed.ciphertext),
                _aad(sealed.info.name),
            )
        except (InvalidTag, binascii.Error, ValueError):
            raise AuthFailed(f"credential {sealed.info.name} failed to decrypt: it was altered") from None
        body = json.loads(plain)
        return Credential(
            name=sealed.info.name,
            type=sealed.info.type,
            user=sealed.info.user,
            secret=base64.b64decode(body["secret"]),
            passphrase=None if body["passphrase"] is None else base64.b64decode(body["passphrase"]),
        )

    @staticmethod
    def _parse(raw: bytes) -> _Sealed:
        try:
            return _Sealed.model_validate_json(raw)
        except ValidationError:
            raise InternalError("a credential record in the vault is corrupt") from None

    async def add(
        self, info: CredentialInfo, secret: bytes, passphrase: bytes | None = None,
        replace: bool = False,
    ) -> None:
        value = self.seal(info, secret, passphrase)
        if replace:
            await self.kv.put(info.name, value)
            return
        try:
            await self.kv.create(info.name, value)
        except KeyWrongLastSequenceError:
            raise InvalidRequest(
                f"credential {info.name} exists; remove it first or use --replace"
            ) from None

    async def _raw(self, name: str) -> bytes:
        check_credential_name(name)
        try:
            entry = await self.kv.get(name)
        except KVNotFound:
            raise NotFound(f"no credential named {name}") from None
        if entry.value is None:
            raise NotFound(f"no credential named {name}")
        return entry.value

    async def get(self, name: str) -> Credential:
        return self.open(await self._raw(name))

    async def info(self, name: str) -> CredentialInfo:
        return self._parse(await self._raw(name)).info

    async def list(self) -> list[CredentialInfo]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        out: list[CredentialInfo] = []
        for key in sorted(keys):
            try:
                out.append(await self.info(key))
            except NotFound:
                continue
        return out

    async def remove(self, name: str) -> None:
        await self._raw(name)
        await self.kv.delete(name)
