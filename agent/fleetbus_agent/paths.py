"""``--allow-path``: which files a listening agent lets fleetbus read and write.

A :class:`PathPolicy` holds directory roots; ``put`` and ``get`` are refused with
``invalid_request`` for any path that does not resolve to a place inside one of them.
It restricts file transfer only: ``exec`` runs whatever command it is given, as the
agent's user, so limit what that user may do (or the commands fleetbus sends) as well.

Resolution follows symbolic links the way the kernel will when the file is opened:

- reads: ``os.path.realpath(path)`` must lie inside a root;
- writes: the parent directory is resolved with ``realpath`` (when it does not exist
  yet, its nearest existing ancestor is, and the missing components are appended, none
  of which may be ``..``); when the target exists and is a symbolic link, where it
  points must lie inside a root too.

"Inside" compares whole path components (``/srv2`` is not inside ``/srv``) after the
roots themselves were resolved with ``realpath`` when the policy was made.

The check happens before the operation opens the file. Someone who can already write in
an allowed directory and swaps a directory for a symbolic link in between could still
redirect the operation; the policy guards against what requests ask for, not against
local users racing it.

Standard library only; Python 3.9+.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

from fleetbus_base.ops import OpError, check_path
from fleetbus_base.ops.files import shown_path


class PathPolicy:
    """Directory roots that ``put``/``get`` must stay inside; no roots allows everything."""

    def __init__(self, roots: Iterable[str]) -> None:
        resolved: List[str] = []
        for root in roots:
            if not isinstance(root, str) or not root or not os.path.isabs(root):
                raise ValueError(f"an allowed path must be absolute, not {root!r}")
            real = os.path.realpath(root)
            if real not in resolved:
                resolved.append(real)
        self._roots = resolved

    @property
    def roots(self) -> List[str]:
        """The roots, resolved (a copy)."""
        return list(self._roots)

    def __bool__(self) -> bool:
        return bool(self._roots)

    def __repr__(self) -> str:
        return f"PathPolicy({self._roots!r})"

    def inside(self, real: str) -> bool:
        """Whether the already resolved path ``real`` lies inside (or is) a root."""
        for root in self._roots:
            if root == os.sep or real == root or real.startswith(root + os.sep):
                return True
        return False

    def _refuse(self, path: str) -> OpError:
        return OpError(
            "invalid_request",
            f"{shown_path(path)} is outside the allowed paths ({', '.join(self._roots)})",
        )

    def check_read(self, path: str) -> str:
        """Return ``path`` if reading it stays inside the roots, else raise :class:`OpError`."""
        if not self._roots:
            return path
        check_path(path)
        if not self.inside(os.path.realpath(path)):
            raise self._refuse(path)
        return path

    def check_write(self, path: str) -> str:
        """Return ``path`` if writing it stays inside the roots, else raise :class:`OpError`."""
        if not self._roots:
            return path
        check_path(path)
        parent, name = os.path.split(path)
        if name in ("", ".", ".."):
            raise self._refuse(path)  # a directory, not a file; put refuses it anyway
        real_parent = _resolve_parent(parent)
        if real_parent is None or not self.inside(os.path.join(real_parent, name)):
            raise self._refuse(path)
        target = os.path.join(real_parent, name)
        if os.path.islink(target) and not self.inside(os.path.realpath(target)):
            raise self._refuse(path)
        return path


def _resolve_parent(parent: str) -> Optional[str]:
    """``realpath(parent)``, also when it does not exist yet; None if a missing part is ``..``."""
    if os.path.isdir(parent):
        return os.path.realpath(parent)
    missing: List[str] = []
    current = parent
    # lexists: a dangling symbolic link counts as existing, so realpath follows it.
    while not os.path.lexists(current):
        head, tail = os.path.split(current)
        if head == current:  # reached "/" (which always exists)
            break
        if tail:
            missing.append(tail)
        current = head
    if any(part == ".." for part in missing):
        return None
    resolved = os.path.realpath(current)
    for part in reversed(missing):
        if part != ".":
            resolved = os.path.join(resolved, part)
    return resolved
