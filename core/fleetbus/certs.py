"""The gateway's TLS identity: a private CA and a gateway certificate, or the operator's own.

Files live in ``$FLEETBUS_HOME/gateway/``. Private keys are stored as encrypted PEM
(PKCS#8, AES-256) under a password derived from the master key, so a copy of the folder
without the key is no use; ssl.SSLContext opens them with that password.
Agents pin either the CA (``--ca ca.pem``) or the gateway certificate's fingerprint.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import InvalidRequest, NotFound
from .home import Home, write_private
from .vault import MasterKey

CA_DAYS = 3650
CERT_DAYS = 825


@dataclass(frozen=True)
class GatewayFiles:
    folder: Path

    @classmethod
    def of(cls, home: Home) -> GatewayFiles:
        return cls(home.path / "gateway")

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def cert(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def key(self) -> Path:
        return self.folder / "key.pem"

    def exists(self) -> bool:
        return self.cert.exists() and self.key.exists()


def key_password(master: MasterKey) -> bytes:
    """The password the gateway's PEM keys are encrypted with (derived, never stored)."""
    return hmac.new(master.key, b"fleetbus-gateway-key-v1", hashlib.sha256).hexdigest().encode()


def fingerprint_pem(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetbus"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def default_hosts() -> list[str]:
    names = {socket.gethostname(), "localhost", "127.0.0.1", "::1"}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    return sorted(n for n in names if n)


def _encrypt(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(password))


def create_gateway_identity(home: Home, master: MasterKey, hosts: list[str] | None = None,
                            replace: bool = False) -> GatewayFiles:
    """A new CA and a gateway certificate for ``hosts`` (names or addresses)."""
    files = GatewayFiles.of(home)
    if files.exists() and not replace:
        return files
    files.folder.mkdir(parents=True, exist_ok=True)
    os.chmod(files.folder, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    password = key_password(master)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"fleetbus gateway CA {socket.gethostname()}")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("fleetbus gateway")).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(_san(hosts or default_hosts()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.ca_key, _encrypt(ca_key, password))
    write_private(files.key, _encrypt(key, password))
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def import_gateway_identity(home: Home, master: MasterKey, cert_path: Path, key_path: Path,
                            key_password_in: bytes | None = None) -> GatewayFiles:
    """Use the operator's own certificate; the key is re-encrypted under the master key."""
    files = GatewayFiles.of(home)
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=key_password_in)
    except (ValueError, TypeError):
        raise InvalidRequest(
            "the certificate or key is not PEM, or the key needs a passphrase") from None
    files.folder.mkdir(parents=True, exist_ok=True)
    os.chmod(files.folder, 0o700)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(key_password(master)))
    write_private(files.key, encrypted)
    files.cert.write_bytes(cert_pem)
    for stale in (files.ca_cert, files.ca_key):
        stale.unlink(missing_ok=True)
    return files


def server_context(files: GatewayFiles, master: MasterKey) -> ssl.SSLContext:
    if not files.exists():
        raise NotFound(f"no gateway certificate in {files.folder}: run `fleetbus gateway cert`")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key), password=key_password(master))
    return ctx
