"""SHA-256 and HMAC-SHA-256 for the agent, without importing :mod:`hashlib`.

Importing hashlib probes every digest OpenSSL offers (md5 to shake_256) to build its
constructors, which loads them all: 0.6 MiB of an idle agent's resident memory
(measured: RSS before and after the import, with asyncio and ssl already loaded),
where the agent only ever uses SHA-256 (certificate fingerprints, key proofs). The
OpenSSL functions hashlib and hmac are built on are called directly instead; a Python
without them falls back to hashlib and hmac.
"""

from __future__ import annotations

from typing import Callable

try:
    from _operator import _compare_digest as compare_digest  # what hmac.compare_digest is
except ImportError:  # pragma: no cover - every CPython has it
    from hmac import compare_digest  # type: ignore[assignment]

_hmac_digest: Callable[[bytes, bytes, str], bytes]
try:
    from _hashlib import hmac_digest as _hmac_digest  # type: ignore[no-redef]
    from _hashlib import openssl_sha256 as _sha256
except ImportError:  # pragma: no cover - Python built without OpenSSL's hashlib
    import hmac as _hmac
    from hashlib import sha256 as _sha256  # type: ignore[assignment]

    _hmac_digest = _hmac.digest  # type: ignore[assignment]

__all__ = ["compare_digest", "hmac_sha256_hex", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, as lowercase hex."""
    return _sha256(data).hexdigest()


def hmac_sha256_hex(key: bytes, message: bytes) -> str:
    """HMAC-SHA-256 of ``message`` under ``key``, as lowercase hex."""
    return _hmac_digest(key, message, "sha256").hex()
