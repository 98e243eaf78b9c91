"""Client authentication with the vault's credential, and nothing else.

Only the credential the server references is ever offered: no ssh-agent, no keys from
``~/.ssh``, no agent forwarding (we drive ``paramiko.Transport`` directly, which does
none of those unless asked). Secrets never appear in a message, a log line or an
exception: every error here is written from the credential's *name*.

Credential types:

- ``ssh-key``: ``secret`` is a private key (OpenSSH format, or PEM/PKCS#8), Ed25519,
  ECDSA or RSA; ``passphrase`` decrypts it when it is encrypted.
- ``password``: ``secret`` is the password; the server may take it as ``password`` or,
  when it only offers ``keyboard-interactive`` (PAM setups), as the answer to a single
  prompt.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fleetbus.errors import AuthFailed, InvalidRequest
from fleetbus.transport import Credential

SUPPORTED_TYPES = ("ssh-key", "password")


def login_user(server_name: str, credential: Credential | None, override: object) -> str:
    """Who to log in as: ``options.user`` when set, else the credential's user."""
    if credential is None:
        raise AuthFailed(
            f"{server_name} has no credential: register it with --credential naming an "
            "ssh-key or password credential"
        )
    if credential.type not in SUPPORTED_TYPES:
        raise AuthFailed(
            f"credential {credential.name} of {server_name} is a {credential.type!r} credential; "
            "the ssh transport needs an 'ssh-key' or 'password' credential"
        )
    user = override if isinstance(override, str) and override else credential.user
    if not user:
        raise InvalidRequest(
            f"credential {credential.name} of {server_name} names no user (and the server has "
            "no options.user)"
        )
    return user


def load_private_key(credential: Credential) -> paramiko.PKey:
    """The paramiko key for an ``ssh-key`` credential; AuthFailed (without secrets) if unusable."""
    # Keys pasted through a terminal or a Windows editor: surrounding blanks and CRLF.
    data = credential.secret.replace(b"\r\n", b"\n").strip() + b"\n"
    passphrase = credential.passphrase or None
    name = credential.name
    openssh = b"BEGIN OPENSSH PRIVATE KEY" in data[:200]
    loader = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key
    try:
        try:
            loaded = loader(data, password=passphrase)
        except TypeError:
            if passphrase is None:
                raise AuthFailed(
                    f"the private key in credential {name} is encrypted and the credential has "
                    "no passphrase"
                ) from None
            # A passphrase for a key that is not encrypted: harmless, use the key as is.
            loaded = loader(data, password=None)
    except (ValueError, TypeError):
        raise AuthFailed(
            f"cannot load the private key in credential {name}: wrong passphrase, or not an "
            "OpenSSH/PEM private key"
        ) from None
    except UnsupportedAlgorithm:
        raise AuthFailed(f"the private key in credential {name} is of an unsupported type") from None
    if isinstance(loaded, rsa.RSAPrivateKey):
        return paramiko.RSAKey(key=loaded)
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        return paramiko.ECDSAKey(vals=(loaded, loaded.public_key()))
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        # paramiko's Ed25519Key reads only the OpenSSH format; hand it the key we already
        # decrypted (PKCS#8 Ed25519 keys work this way too), unencrypted and in memory.
        text = loaded.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode("ascii")
        return paramiko.Ed25519Key(file_obj=io.StringIO(text))
    raise AuthFailed(
        f"the private key in credential {name} is a {type(loaded).__name__}; "
        "use an Ed25519, ECDSA or RSA key"
    )


LoginRefused = Callable[[str], None]
"""Told the reason (a fixed word, never a user or secret) each time a server refuses a
login, for the auth-failure metric. Called from the connecting thread."""


def authenticate(transport: paramiko.Transport, server_name: str, user: str,
                 credential: Credential, refused: LoginRefused) -> None:
    """Authenticate ``transport`` (key exchange done, host key checked). Blocking.

    Raises AuthFailed on refusal, after telling ``refused`` why; paramiko's
    SSHException (connection trouble) is left to the caller, which knows how to report
    an unreachable server.
    """
    who = f"{user}@{server_name}"
    try:
        if credential.type == "ssh-key":
            remaining = transport.auth_publickey(user, load_private_key(credential))
        else:
            remaining = transport.auth_password(user, credential.secret, fallback=True)
    except paramiko.BadAuthenticationType as exc:
        refused("method_refused")
        allowed = ", ".join(exc.allowed_types) or "nothing"
        method = "public key" if credential.type == "ssh-key" else "password"
        raise AuthFailed(
            f"ssh authentication failed for {who}: the server does not accept {method} "
            f"authentication (it allows: {allowed})"
        ) from None
    except paramiko.AuthenticationException:
        refused("bad_credentials")
        raise AuthFailed(f"ssh authentication failed for {who}") from None
    if remaining:
        refused("second_factor")
        raise AuthFailed(
            f"ssh authentication failed for {who}: the server wants a second factor "
            f"({', '.join(remaining)}), which fleetbus cannot give"
        )
