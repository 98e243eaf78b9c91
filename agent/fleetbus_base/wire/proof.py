"""The inbound key proof: fleetbus shows a listening agent it knows the server key
without sending it, for one challenge, bound to the agent's certificate.

Pure functions over bytes and strings; :mod:`.handshake` uses them in the inbound
exchange. Nothing here logs, and no message quotes the key, the nonce or the proof.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..digests import compare_digest, hmac_sha256_hex, sha256_hex
from .frames import ProtocolError

INBOUND_PROOF_LABEL = b"fleetbus-inbound-v1"
"""Domain separation for the inbound proof: no other HMAC made with the key matches it."""


NONCE_BYTES = 32
"""Size of the agent's challenge nonce."""


HEX_DIGITS = frozenset("0123456789abcdef")


def normalise_fingerprint(fingerprint: Any) -> str:
    """``"sha256:<hex>"`` or bare hex, any case, to 64 lowercase hex digits."""
    if not isinstance(fingerprint, str):
        raise ValueError("a certificate fingerprint must be a string")  # noqa: TRY004 - callers catch ValueError
    text = fingerprint.lower().removeprefix("sha256:")
    if len(text) != 64 or not HEX_DIGITS.issuperset(text):
        # The value is not quoted: a caller mixing up arguments may have passed the key.
        raise ValueError(
            'a certificate fingerprint must be "sha256:" and 64 hex digits, or the 64 digits alone'
        )
    return text


def key_bytes(key: Any) -> bytes:
    if not isinstance(key, str) or not key:
        raise ValueError("the server key must be a non-empty string")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the server key is not encodable as UTF-8") from None


def inbound_proof(key: str, nonce: bytes, agent_fingerprint: str) -> str:
    """The controller's proof that it knows ``key``, for one challenge, bound to one certificate.

    ``hex(HMAC-SHA256(key=UTF-8 key, msg=b"fleetbus-inbound-v1" \\0 nonce \\0 fingerprint))``
    where ``fingerprint`` is the agent certificate's SHA-256 as 64 lowercase hex digits
    (ASCII). ``agent_fingerprint`` may be ``"sha256:<hex>"`` or bare hex, in any case;
    anything else raises ValueError, as does an empty key.
    """
    secret = key_bytes(key)
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise TypeError("nonce must be bytes")
    fingerprint = normalise_fingerprint(agent_fingerprint)
    message = b"".join(
        (INBOUND_PROOF_LABEL, b"\0", bytes(nonce), b"\0", fingerprint.encode("ascii"))
    )
    return hmac_sha256_hex(secret, message)


def certificate_fingerprint(der: bytes) -> str:
    """``"sha256:<hex>"`` of a DER-encoded certificate (what fleetbus pins)."""
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise TypeError("certificate_fingerprint needs the DER certificate as bytes")
    data = bytes(der)
    if not data:
        raise ValueError("the certificate is empty")
    if data.lstrip().startswith(b"-----BEGIN"):
        raise ValueError("that is a PEM certificate: pass its DER form (ssl.PEM_cert_to_DER_cert)")
    return "sha256:" + sha256_hex(data)


def proof_matches(expected: str, proof: str) -> bool:
    """Constant-time check of a peer's hex proof (either case) against ours."""
    if len(proof) != len(expected):
        return False
    candidate = proof.lower()
    if not HEX_DIGITS.issuperset(candidate):
        return False
    return compare_digest(expected.encode("ascii"), candidate.encode("ascii"))


def decode_nonce(value: Any) -> bytes:
    # 32 bytes are 44 base64 characters; the length check comes before any decoding.
    if isinstance(value, str) and len(value) <= 64:
        try:
            nonce = base64.b64decode(value.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            nonce = b""
        if len(nonce) == NONCE_BYTES:
            return nonce
    raise ProtocolError(f'challenge needs a "nonce": base64 of {NONCE_BYTES} bytes')
