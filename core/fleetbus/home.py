"""The fleetbus home folder: where the embedded stack keeps its data and secrets.

``--home`` beats ``FLEETBUS_HOME`` beats ``~/.fleetbus``. Files holding secrets are
created with mode 0600 inside a 0700 folder.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidRequest

ENV_HOME = "FLEETBUS_HOME"


@dataclass(frozen=True)
class Home:
    path: Path

    @classmethod
    def resolve(cls, flag: str | os.PathLike[str] | None = None) -> Home:
        raw = flag or os.environ.get(ENV_HOME) or Path.home() / ".fleetbus"
        return cls(Path(raw).expanduser().resolve())

    @property
    def nats_data(self) -> Path:
        return self.path / "nats"

    @property
    def nats_config(self) -> Path:
        return self.path / "nats.conf"

    @property
    def nats_token(self) -> Path:
        return self.path / "nats.token"

    @property
    def master_key(self) -> Path:
        return self.path / "master.key"

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    def ensure(self) -> None:
        """Create the folder if needed and make it 0700."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def protect(self) -> None:
        """Make an existing folder 0700; it holds ``master.key`` and ``nats.token``, and
        a ``local`` command running as another user must not even list it.

        Raises InvalidRequest when the folder is open to others and not ours to change.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_IMODE(info.st_mode) & 0o077:
            return
        try:
            os.chmod(self.path, 0o700)
        except PermissionError:
            raise InvalidRequest(
                f"the home folder {self.path} is open to other users and not ours to "
                f"change; run: chmod 700 {self.path}"
            ) from None

    def read_run(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.run_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_run(self, info: dict[str, Any]) -> None:
        write_private(self.run_file, json.dumps(info, indent=2).encode())

    def clear_run(self) -> None:
        try:
            self.run_file.unlink()
        except FileNotFoundError:
            pass


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def create_private(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600) with ``data`` unless it exists; True if created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True
