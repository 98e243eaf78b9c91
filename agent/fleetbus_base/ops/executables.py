"""Where a command name was found on PATH, remembered for a moment.

Started by name (``["true"]``), a process is found by the child itself: it tries
``execve`` in one PATH directory after another, and the parent waits meanwhile (the
child is a vfork). subprocess also builds the list of candidates in Python on every
start. With a PATH of fifteen directories that was 30-70 us of each ``exec true``
here (hand runs, ``Popen`` of ``true`` against ``/usr/bin/true``). :func:`resolve`
does the search in the parent once and remembers the answer for
:data:`REMEMBER_S`, the way a shell's command hash does, but briefly: a command
installed in an earlier PATH directory is found within that time, and a remembered
file that has gone is searched for again at once (see :func:`forget`).

Only names are looked up (a command with a ``/`` is used as given) and only hits are
remembered; a name found nowhere is left to the normal search, which then reports it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from typing import Optional

REMEMBER_S = 1.0
"""How long a lookup is reused."""

_MAX_ENTRIES = 256

_found: dict[tuple[str, str], tuple[str, float]] = {}


def resolve(name: str, env: Optional[Mapping[str, str]]) -> Optional[str]:
    """The file the PATH search for ``name`` would execute, or None to leave the search
    to the child (``name`` has a ``/``, or is not found, or PATH is unusual).

    ``env`` is the child's environment (None: ours), whose PATH is searched.
    """
    if not name or "/" in name:
        return None
    path = _path(env)
    if path is None:
        return None  # the default search path is platform business; leave it to exec
    key = (name, path)
    now = time.monotonic()
    hit = _found.get(key)
    if hit is not None and now - hit[1] < REMEMBER_S:
        return hit[0]
    found = _search(name, path)
    if found is None:
        _found.pop(key, None)
        return None
    if len(_found) >= _MAX_ENTRIES:
        _found.clear()
    _found[key] = (found, now)
    return found


def forget(name: str, env: Optional[Mapping[str, str]]) -> None:
    """Drop what :func:`resolve` remembers for ``name`` (its file could not be run)."""
    path = _path(env)
    if path is not None:
        _found.pop((name, path), None)


def _path(env: Optional[Mapping[str, str]]) -> Optional[str]:
    return (env if env is not None else os.environ).get("PATH")


def _search(name: str, path: str) -> Optional[str]:
    # As execvpe: the first directory holding an executable file of that name.
    directories = path.split(os.pathsep)
    if not all(os.path.isabs(d) for d in directories):
        # An empty or relative entry is searched from the child's working directory,
        # which may not be ours: leave such a PATH to the child's own search.
        return None
    for directory in directories:
        candidate = os.path.join(directory, name)
        try:
            info = os.stat(candidate)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(info.st_mode) and os.access(candidate, os.X_OK):
            return candidate
    return None
