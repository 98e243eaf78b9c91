"""Making an nkey user key here and handing its seed over in a new 0600 file.

Used by ``fleetbus users add|rotate`` (a user's key) and ``fleetbus nats accounts``
(fleetbus's own key on a shared NATS): the seed is written once and never sent anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import nkeys

from .context import fail


def new_user_key() -> tuple[bytes, str]:
    """A fresh nkey user key pair: (seed, public key)."""
    keys = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    return bytes(keys.seed), keys.public_key.decode()


def write_seed(path: str, seed: bytes, option: str) -> None:
    """Create ``path`` 0600 with the seed; refuses to overwrite (a seed is not replaced
    silently). ``option`` names the flag that gave the path, for the one-line error."""
    target = Path(path).expanduser()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{target} exists; choose another {option} (nothing was changed)")
    except OSError as exc:
        fail(f"cannot create {target}: {exc.strerror}")
    try:
        os.write(fd, seed + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
