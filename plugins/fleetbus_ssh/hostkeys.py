"""Host key pinning: what ``server.options["host_key"]`` may hold and how it is checked.

A pin is either

- an OpenSSH public key line, ``ssh-ed25519 AAAAC3Nza... [comment]`` (as in a
  ``.pub`` file; a known_hosts line with a leading host field is accepted too), or
- a SHA256 fingerprint as ``ssh-keygen -lf`` prints it: ``SHA256:<base64, no padding>``,
  optionally with the key type in front (``ssh-ed25519 SHA256:...``, the form our own
  error messages print) or the whole ``ssh-keygen -lf`` line
  (``256 SHA256:... comment (ED25519)``).

``options["host_key"]`` may also be a list of pins (while a server's key is being
rotated); the offered key must match one of them.

Comparison is in constant time. There is no trust-on-first-use and no known_hosts
file: an unpinned or mismatching key is refused with :class:`AuthFailed`, whose
``details`` carry the offered key so ``fleetbus servers trust`` can pin it after a
human has checked it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

from fleetbus.errors import AuthFailed, InvalidRequest

# Host key algorithms (as negotiated) for each key type a pin can name. Restricting the
# negotiation to the pinned type matters: a server with both an RSA and an Ed25519 key
# would otherwise offer whichever paramiko prefers, and never match an RSA pin.
_ALGORITHMS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}
# `ssh-keygen -lf` names the family only, in parentheses at the end of its line.
_ALGORITHMS_BY_LABEL: dict[str, tuple[str, ...]] = {
    "ED25519": _ALGORITHMS_BY_TYPE["ssh-ed25519"],
    "ECDSA": ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"),
    "RSA": _ALGORITHMS_BY_TYPE["ssh-rsa"],
}
_FINGERPRINT = re.compile(r"^SHA256:([A-Za-z0-9+/]{43})=?$")
_LABEL = re.compile(r"\(([A-Z0-9-]+)\)$")


def fingerprint(blob: bytes) -> str:
    """The OpenSSH SHA256 fingerprint of a public key blob: ``SHA256:<base64, no padding>``."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_line(key_type: str, blob: bytes) -> str:
    """The OpenSSH public key line (``<type> <base64>``) of a key blob."""
    return f"{key_type} {base64.b64encode(blob).decode()}"


def _blob_type(blob: bytes) -> str | None:
    # A key blob starts with its type as an SSH string (uint32 length, then bytes).
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > 64 or len(blob) < 4 + length:
        return None
    try:
        return blob[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class HostKeyPin:
    """One parsed pin: the SHA256 digest of the key blob, and what is known of its type."""

    digest: bytes
    algorithms: tuple[str, ...] | None
    source: str  # "key" or "fingerprint", for messages

    @property
    def fingerprint(self) -> str:
        return "SHA256:" + base64.b64encode(self.digest).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str, server_name: str) -> HostKeyPin:
        """Parse one pin; :class:`InvalidRequest` naming the server when it is malformed."""
        tokens = str(text).split()
        for index, token in enumerate(tokens):
            if token in _ALGORITHMS_BY_TYPE and index + 1 < len(tokens):
                follower = tokens[index + 1]
                match = _FINGERPRINT.match(follower)
                if match:
                    return cls(_fingerprint_digest(match.group(1)), _ALGORITHMS_BY_TYPE[token],
                               "fingerprint")
                try:
                    blob = base64.b64decode(follower, validate=True)
                except (binascii.Error, ValueError):
                    break
                if _blob_type(blob) != token:
                    break
                return cls(hashlib.sha256(blob).digest(), _ALGORITHMS_BY_TYPE[token], "key")
        for token in tokens:
            match = _FINGERPRINT.match(token)
            if match:
                label = _LABEL.search(tokens[-1])
                algorithms = _ALGORITHMS_BY_LABEL.get(label.group(1)) if label else None
                return cls(_fingerprint_digest(match.group(1)), algorithms, "fingerprint")
        raise InvalidRequest(
            f"options.host_key of {server_name} is neither an OpenSSH public key line "
            "('ssh-ed25519 AAAA...') nor a fingerprint ('SHA256:...' as ssh-keygen -lf prints)"
        )

    def matches(self, blob: bytes) -> bool:
        """Whether ``blob`` is the pinned key, compared in constant time."""
        return hmac.compare_digest(hashlib.sha256(blob).digest(), self.digest)


def _fingerprint_digest(b64: str) -> bytes:
    return base64.b64decode(b64 + "=")


def parse_pins(value: object, server_name: str) -> list[HostKeyPin]:
    """The pins in ``options["host_key"]``: none, one string, or a list of strings."""
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise InvalidRequest(f"options.host_key of {server_name} must be a string or a list of strings")
    return [HostKeyPin.parse(item, server_name) for item in items]


def allowed_algorithms(pins: list[HostKeyPin], offered_default: tuple[str, ...]) -> tuple[str, ...] | None:
    """Host key algorithms to negotiate so the server presents a pinned key type.

    None (no restriction) when any pin's type is unknown, or when the restriction would
    leave nothing paramiko supports.
    """
    if not pins or any(pin.algorithms is None for pin in pins):
        return None
    wanted = {alg for pin in pins for alg in pin.algorithms or ()}
    narrowed = tuple(alg for alg in offered_default if alg in wanted)
    return narrowed or None


def check_host_key(server_name: str, pins: list[HostKeyPin], key_type: str, blob: bytes,
                   jump_for: str | None = None) -> None:
    """Accept the key the server offered only if it matches a pin; else AuthFailed.

    ``details`` always carry the offered key (``host_key``, ``host_key_fingerprint``)
    and which server it belongs to (``server``), so a ``servers trust`` command can pin
    it, also when the server in question is a jump host.
    """
    offered_fp = fingerprint(blob)
    details = {"host_key": key_line(key_type, blob), "host_key_fingerprint": offered_fp,
               "server": server_name}
    suffix = f" (jump host for {jump_for})" if jump_for else ""
    if jump_for:
        details["jump_host_for"] = jump_for
    if not pins:
        raise AuthFailed(
            f"host key of {server_name} is not trusted yet: {key_type} {offered_fp}{suffix}; "
            f"run `fleetbus servers trust {server_name}`",
            **details,
        )
    # Every pin is compared, so the time taken does not tell which one came close.
    matched = False
    for pin in pins:
        matched |= pin.matches(blob)
    if not matched:
        pinned = ", ".join(pin.fingerprint for pin in pins)
        raise AuthFailed(
            f"host key mismatch for {server_name}{suffix}: offered {offered_fp}, pinned {pinned} "
            "— possible man in the middle; refusing",
            **details,
        )
