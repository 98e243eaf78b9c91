"""The gateway's TLS identity: a private CA and a gateway certificate, or the operator's own.

Files live in ``$FLEETBUS_HOME/gateway/``. Private keys are stored as encrypted PEM
(PKCS#8, AES-256) under a password derived from the master key, so a copy of the folder
without the key is no use; ssl.SSLContext opens them with that password.
Agents pin either the CA (``--ca ca.pem``, or its fingerprint) or the gateway
certificate's fingerprint. Several gateways of one deployment share one CA
(:class:`GatewayCA`, kept in JetStream) and each has its own certificate signed by it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
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


def _ca_builder(name: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.CertificateBuilder:
    public = key.public_key()
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(public).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        # Key identifiers let a verifier pick the right CA out of a bundle holding several
        # with similar names (an old per-gateway CA next to the deployment's).
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


@dataclass(frozen=True)
class GatewayCA:
    """A CA that signs gateway certificates: its certificate (PEM) and private key.

    One per deployment, kept in JetStream sealed under the master key (the gateway
    plugin reads or creates it), so every gateway's certificate chains to it and an
    agent that trusts it accepts any gateway of the deployment.
    """

    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:  # the key stays out of any log or traceback
        return f"GatewayCA({self.fingerprint})"

    @classmethod
    def create(cls, common: str) -> GatewayCA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = _ca_builder(_name(common), key, now).sign(key, hashes.SHA256())
        return cls(cert.public_bytes(serialization.Encoding.PEM), key)

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def fingerprint(self) -> str:
        return fingerprint_pem(self.cert_pem)

    def seal(self, master: MasterKey) -> bytes:
        """The CA as stored: its certificate and its key encrypted under the master key."""
        return json.dumps({"v": 1, "cert": self.cert_pem.decode(),
                           "key": _encrypt(self.key, key_password(master)).decode()}).encode()

    @classmethod
    def unseal(cls, raw: bytes, master: MasterKey) -> GatewayCA:
        """The stored CA; :class:`InvalidRequest` if it is not one or another master key sealed it."""
        try:
            record = json.loads(raw)
            key = serialization.load_pem_private_key(record["key"].encode(), password=key_password(master))
            cert_pem = record["cert"].encode()
            x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise InvalidRequest("the stored gateway CA cannot be opened with this master key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidRequest("the stored gateway CA key is not an EC key")
        return cls(cert_pem, key)

    @classmethod
    def from_files(cls, files: GatewayFiles, master: MasterKey) -> GatewayCA | None:
        """The CA a gateway made for itself before CAs were shared, if it has one."""
        if not (files.ca_cert.exists() and files.ca_key.exists()):
            return None
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=key_password(master))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return None
        return cls(files.ca_cert.read_bytes(), key)

    def issue(self, hosts: list[str]) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
        """A gateway certificate for ``hosts`` signed by this CA: (leaf and CA PEM, leaf key)."""
        ca = self.cert
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        host = socket.gethostname() or "gateway"
        cert = (
            x509.CertificateBuilder().subject_name(_name(f"fleetbus gateway {host}"[:64]))
            .issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(_san(hosts or default_hosts()), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        # The chain goes with the leaf so that a client holding only a bundle of roots
        # (or an older CA) can still build the path.
        return cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem, key

    def write(self, home: Home, master: MasterKey, hosts: list[str]) -> GatewayFiles:
        """Make this gateway's certificate for ``hosts`` and store it, with the CA, in its home."""
        files = GatewayFiles.of(home)
        files.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(files.folder, 0o700)
        chain, key = self.issue(hosts)
        password = key_password(master)
        # The CA key is kept beside the certificate so the gateway can present the CA to
        # an agent that pins its fingerprint (the CA probe, docs/agent-protocol.md).
        write_private(files.ca_key, _encrypt(self.key, password))
        write_private(files.key, _encrypt(key, password))
        files.ca_cert.write_bytes(self.cert_pem)
        files.cert.write_bytes(chain)
        return files


def issued_by(files: GatewayFiles, ca: GatewayCA) -> bool:
    """Whether the gateway certificate in ``files`` was signed by ``ca``."""
    try:
        leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
        leaf.verify_directly_issued_by(ca.cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def create_gateway_identity(home: Home, master: MasterKey, hosts: list[str] | None = None,
                            replace: bool = False) -> GatewayFiles:
    """A new CA of this gateway's own and a gateway certificate for ``hosts`` (names or addresses).

    The single-gateway identity (``fleetbus gateway cert``); a gateway that starts with
    none takes its certificate from the deployment's CA instead (:class:`GatewayCA`).
    """
    files = GatewayFiles.of(home)
    if files.exists() and not replace:
        return files
    ca = GatewayCA.create(f"fleetbus gateway CA {socket.gethostname()}"[:64])
    return ca.write(home, master, hosts or default_hosts())


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


def server_context(files: GatewayFiles, master: MasterKey, ca_probe_name: str | None = None) -> ssl.SSLContext:
    """The gateway's TLS context. With ``ca_probe_name`` and a CA key in ``files``, a client
    asking for that name (SNI) is shown the CA certificate instead, so that an agent that
    pins the CA's fingerprint can learn the CA from any gateway and then verify the
    gateway's own certificate against it."""
    if not files.exists():
        raise NotFound(f"no gateway certificate in {files.folder}: run `fleetbus gateway cert`")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key), password=key_password(master))
    if ca_probe_name and files.ca_cert.exists() and files.ca_key.exists():
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        probe.minimum_version = ssl.TLSVersion.TLSv1_2
        probe.load_cert_chain(str(files.ca_cert), str(files.ca_key), password=key_password(master))

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            if name == ca_probe_name:
                sslobj.context = probe

        ctx.sni_callback = pick  # type: ignore[assignment]
    return ctx
