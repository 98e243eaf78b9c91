"""Secrets this process received through its environment, taken out of it at start.

fleetbus and its agent may be given their secrets as environment variables
(:data:`~fleetbus_base.ops.environment.SECRET_ENV_VARS`). Leaving them there has two
costs. Any process started later with our environment inherits them; and on Linux
anyone who may read ``/proc/<our pid>/environ`` (our own user, root) reads them, for as
long as we run. That second one is not fixed by ``del os.environ[name]``:
``/proc/<pid>/environ`` shows the bytes of the environment block the kernel laid out at
``execve`` (between ``env_start`` and ``env_end`` of ``/proc/<pid>/stat``), and
``unsetenv`` only drops a pointer to them. So :func:`take_secrets` keeps each value in
this module, removes the variable from ``os.environ`` (and so from what children
inherit), and overwrites the variable's bytes in that block with NULs.

Why overwrite in place rather than re-execute ourselves without the variables (passing
the values on through a pipe): a re-exec must rebuild the exact command line it was
started with (interpreter options, ``python -m``, a console script, the agent's zipapp;
``sys.orig_argv`` exists only from Python 3.10), runs every import twice, and briefly
holds the secret in a pipe or file of its own. The block is ordinary writable memory of
this process at a range the kernel tells us; writing it through ``/proc/self/mem``
either works or fails with an error (never a crash), and nothing else changes: not
the pid, not argv, not what supervisors see. The process may still hold the value in
its own memory, as it must to use it; reading that takes ptrace rights over us.

Call :func:`take_secrets` first thing in a process's ``main``, before threads or
children exist, and read secrets with :func:`secret` afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Dict, List, Optional

from .ops.environment import SECRET_ENV_VARS

log = logging.getLogger(__name__)

# Process-wide by nature: the environment is one per process, and so is what was in it.
_taken: Dict[str, str] = {}


def secret(name: str) -> Optional[str]:
    """The value of the secret variable ``name``: what the environment holds now (a
    caller that never took them, or set one since), else what :func:`take_secrets`
    took, else None."""
    value = os.environ.get(name)
    return value if value is not None else _taken.get(name)


def take_secrets(names: Iterable[str] = SECRET_ENV_VARS) -> List[str]:
    """Move the variables ``names`` out of this process's environment into this module.

    Returns the names that were present. Their values stay available to :func:`secret`;
    they are gone from ``os.environ`` and from ``/proc/<pid>/environ`` (Linux). Where
    the block cannot be overwritten, a warning says so (the variables are removed from
    ``os.environ`` all the same).
    """
    present = [name for name in names if name in os.environ]
    for name in present:
        _taken[name] = os.environ.pop(name)  # pop also unsets it in the C environment
    if present:
        try:
            scrub_environ_block(present)
        except OSError as exc:
            log.warning(
                "could not clear %s from /proc/%d/environ (%s); processes of this user can "
                "read it there", ", ".join(present), os.getpid(), exc.strerror or exc,
            )
    return present


def scrub_environ_block(names: Iterable[str]) -> int:
    """Overwrite every ``NAME=value`` entry for ``names`` in this process's original
    environment block with NUL bytes; returns how many entries were cleared.

    Linux only (``/proc/self/stat`` fields 50 and 51, ``/proc/self/mem``); elsewhere,
    or without ``/proc``, nothing exposes the block and this returns 0. Raises OSError
    when the block is there but cannot be written.
    """
    prefixes = tuple(f"{name}=".encode() for name in names)
    if not prefixes:
        return 0
    try:
        start, end = _environ_range()
    except FileNotFoundError:
        return 0
    if not 0 < start < end:
        return 0
    cleared = 0
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        block = mem.read(end - start)
        offset = 0
        for entry in block.split(b"\0"):
            if entry.startswith(prefixes):
                mem.seek(start + offset)
                mem.write(b"\0" * len(entry))
                cleared += 1
            offset += len(entry) + 1
    return cleared


def _environ_range() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as fh:
        raw = fh.read()
    # The command name may hold spaces and parentheses; fields after the last ')' start
    # at field 3 (state), so env_start (field 50) and env_end (51) are at 47 and 48.
    fields = raw.rpartition(b")")[2].split()
    if len(fields) < 49:
        return 0, 0  # a kernel older than 3.5 does not show them
    return int(fields[47]), int(fields[48])
