"""The listening agent's own TLS identity: its certificate, private key and fingerprint.

In inbound mode the agent is the TLS server. fleetbus pins the fingerprint of the
agent's certificate (``sha256:<hex>`` of its DER form) and proves it knows the server's
secret key bound to that fingerprint, so the certificate needs no CA: on first start the
agent makes its own, an EC P-256 key and a self-signed certificate valid for about ten
years (CN = this host's name; SAN: that name, ``localhost``, ``127.0.0.1``, ``::1``).

The standard library cannot make certificates, so that one step runs the ``openssl``
command-line tool. The private key is stored encrypted (PKCS#8, AES-256) under a
password derived from the server's secret key (:func:`key_password`), so a copy of the
key file alone is useless. The password reaches ``openssl`` through its environment
(``-pass env:NAME``), never its argument list, which every user can read.

Operators may bring their own certificate and key instead (``--cert`` / ``--key``):
the key unencrypted, or encrypted with that same derived password.

Standard library only; Python 3.9+.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fleetbus_base.digests import hmac_sha256_hex, sha256_hex

CERT_NAME = "agent-tls.pem"
"""The certificate's file name in the TLS directory (mode 0644)."""
KEY_NAME = "agent-tls.key"
"""The encrypted private key's file name in the TLS directory (mode 0600)."""

PASSWORD_INFO = b"fleetbus-agent-tls-v1"
VALID_DAYS = 3650
OPENSSL_TIMEOUT_S = 60.0

# The environment variable that carries the password to openssl, and variables that must
# never reach openssl at all (the agent's own key may be in the environment).
_PASS_ENV = "FLEETBUS_AGENT_TLS_PASS"
_SECRET_ENV = ("FLEETBUS_AGENT_KEY", _PASS_ENV)

_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL
)
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


class TLSIdentityError(Exception):
    """The identity cannot be created or loaded; the message is one line for the operator."""


def key_password(key: str) -> str:
    """The password the agent's TLS private key is encrypted with, derived from ``key``."""
    return hmac_sha256_hex(key.encode("utf-8"), PASSWORD_INFO)


def pem_fingerprint(pem: str) -> str:
    """``sha256:<hex>`` of the first certificate in ``pem`` (DER form)."""
    match = _PEM_CERT.search(pem)
    if match is None:
        raise ValueError("no PEM certificate found")
    der = ssl.PEM_cert_to_DER_cert(match.group(0))
    return "sha256:" + sha256_hex(der)


@dataclass
class TLSIdentity:
    """A loaded identity: the files, whether this start created them, the fingerprint."""

    cert_file: str
    key_file: str
    fingerprint: str
    created: bool = False
    provided: bool = False
    """True for an operator's ``--cert``/``--key``, False for the agent's own."""
    _password: str = field(default="", repr=False)

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context (TLS 1.2 minimum) presenting this certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=self._password)
        except ssl.SSLError as exc:
            raise TLSIdentityError(self._load_failure(exc)) from None
        except OSError as exc:
            raise TLSIdentityError(
                f"cannot read the TLS certificate or key: {exc.strerror or exc}"
            ) from None
        return ctx

    def _load_failure(self, exc: ssl.SSLError) -> str:
        text = f"{exc.reason or ''} {exc}".upper()
        if "KEY_VALUES_MISMATCH" in text:
            return f"the TLS key {self.key_file} does not belong to the certificate {self.cert_file}"
        if _is_encrypted(self.key_file):
            if self.provided:
                return (
                    f"cannot decrypt the TLS key {self.key_file}: an encrypted --key must use "
                    "the password derived from the server key (see docs/agents.md), "
                    "or be unencrypted"
                )
            return (
                f"cannot decrypt the agent's TLS key {self.key_file} with this server key "
                "(was the key changed?); restart once with --new-cert to make a new "
                "certificate, then pin its new fingerprint in fleetbus"
            )
        return f"cannot load the TLS certificate {self.cert_file} and key {self.key_file}"


def _is_encrypted(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except OSError:
        return False
    return b"ENCRYPTED" in head


def _read_fingerprint(cert_file: str) -> str:
    try:
        with open(cert_file, encoding="ascii", errors="replace") as fh:
            return pem_fingerprint(fh.read())
    except OSError as exc:
        raise TLSIdentityError(
            f"cannot read the TLS certificate {cert_file}: {exc.strerror or exc}"
        ) from None
    except ValueError:
        raise TLSIdentityError(f"{cert_file} holds no PEM certificate") from None


def certificate_hostname() -> str:
    """This host's name if it is usable in a certificate, else ``fleetbus-agent``."""
    name = socket.gethostname().strip().rstrip(".")
    if len(name) <= 253 and _HOSTNAME.match(name):
        return name
    return "fleetbus-agent"


def _openssl_env(password: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env[_PASS_ENV] = password
    return env


def _run_openssl(openssl: str, args: List[str], env: Dict[str, str]) -> bytes:
    # The password is in env only; args never hold it.
    try:
        proc = subprocess.run(
            [openssl, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=OPENSSL_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise TLSIdentityError(
            f"the {openssl!r} command is needed to create the agent's TLS certificate on "
            "first start and was not found; install openssl, or give --cert FILE --key FILE"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TLSIdentityError(f"running {openssl} failed: {type(exc).__name__}") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.decode("utf-8", "replace").splitlines()]
        last = next((line for line in reversed(lines) if line), "no error output")
        raise TLSIdentityError(f"{openssl} {args[0]} failed: {last[:300]}")
    return proc.stdout


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` (never wider, whatever the umask)."""
    directory = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(prefix=".fleetbus-tls-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def create_identity(
    tls_dir: str,
    key: str,
    *,
    hostname: Optional[str] = None,
    openssl: str = "openssl",
) -> TLSIdentity:
    """Make a new key and self-signed certificate in ``tls_dir``, replacing any there."""
    name = hostname or certificate_hostname()
    password = key_password(key)
    env = _openssl_env(password)
    try:
        os.makedirs(tls_dir, mode=0o700, exist_ok=True)
        key_path = os.path.join(tls_dir, KEY_NAME)
        cert_path = os.path.join(tls_dir, CERT_NAME)
        key_pem = _run_openssl(
            openssl,
            ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-aes-256-cbc", "-pass", f"env:{_PASS_ENV}"],
            env,
        )
        if b"ENCRYPTED" not in key_pem:
            raise TLSIdentityError(f"{openssl} genpkey did not produce an encrypted key")
        # openssl req reads the key from a file: a private temporary one beside the target.
        fd, temp_key = tempfile.mkstemp(prefix=".fleetbus-tls-", dir=tls_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem)
            sans = ",".join(
                [f"DNS:{name}"] + (["DNS:localhost"] if name != "localhost" else [])
                + ["IP:127.0.0.1", "IP:::1"]
            )
            cert_pem = _run_openssl(
                openssl,
                ["req", "-new", "-x509", "-key", temp_key, "-passin", f"env:{_PASS_ENV}",
                 "-sha256", "-days", str(VALID_DAYS), "-subj", f"/CN={name}",
                 "-addext", f"subjectAltName={sans}"],
                env,
            )
        finally:
            try:
                os.unlink(temp_key)
            except OSError:
                pass
        _write_file(key_path, key_pem, 0o600)
        _write_file(cert_path, cert_pem, 0o644)
    except OSError as exc:
        raise TLSIdentityError(
            f"cannot write the agent's TLS files in {tls_dir}: {exc.strerror or exc}"
        ) from None
    finally:
        env.pop(_PASS_ENV, None)
    try:
        fingerprint = pem_fingerprint(cert_pem.decode("ascii", "replace"))
    except ValueError:
        raise TLSIdentityError(f"{openssl} req did not produce a PEM certificate") from None
    return TLSIdentity(cert_file=cert_path, key_file=key_path, fingerprint=fingerprint,
                       created=True, _password=password)


def load_identity(
    key: str,
    *,
    tls_dir: Optional[str] = None,
    cert_file: Optional[str] = None,
    key_file: Optional[str] = None,
    new_cert: bool = False,
    hostname: Optional[str] = None,
    openssl: str = "openssl",
) -> TLSIdentity:
    """The agent's identity: the operator's ``cert_file``/``key_file``, or the agent's own
    in ``tls_dir`` (created when absent, or replaced when ``new_cert``).

    The certificate and key are loaded once here, so a key that cannot be decrypted with
    ``key`` fails now with a one-line :class:`TLSIdentityError`, not at the first client.
    """
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise TLSIdentityError("give both --cert FILE and --key FILE, or neither")
        if new_cert:
            raise TLSIdentityError("--new-cert makes the agent's own certificate; "
                                   "it cannot be used with --cert/--key")
        identity = TLSIdentity(cert_file=cert_file, key_file=key_file,
                               fingerprint=_read_fingerprint(cert_file), provided=True,
                               _password=key_password(key))
    else:
        if not tls_dir:
            raise TLSIdentityError("no directory for the agent's TLS files: give --tls-dir DIR")
        cert_path = os.path.join(tls_dir, CERT_NAME)
        key_path = os.path.join(tls_dir, KEY_NAME)
        have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
        if new_cert or not (have_cert or have_key):
            identity = create_identity(tls_dir, key, hostname=hostname, openssl=openssl)
        elif have_cert and have_key:
            identity = TLSIdentity(cert_file=cert_path, key_file=key_path,
                                   fingerprint=_read_fingerprint(cert_path),
                                   _password=key_password(key))
        else:
            present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
            raise TLSIdentityError(
                f"found {present} but not {missing}; restart with --new-cert to make a new "
                "certificate (then pin its new fingerprint in fleetbus)"
            )
    identity.server_context()  # fails now, with a clear message, if it cannot be used
    return identity
