"""What a command asks for and what it answers: one set of dataclasses for everyone.

The core's transport interface (:mod:`fleetbus.transport`), every transport and the
agent's operations use these same classes, so nothing copies fields between twins. A
light module on purpose: the agent loads the operations' modules only on first use,
and these are all it needs to describe one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ExecSpec:
    """One process to run. Exactly one of ``argv`` and ``shell`` is set.

    - ``argv``: program and arguments, looked up in PATH; no shell is involved.
    - ``shell``: a command line for ``/bin/sh -c``.
    - ``env``: set over this process's environment (minus the secret variables).
    - ``cwd``: working directory; None for ours.
    - ``stdin``: the whole input, then end of file; None for ``/dev/null``.
    - ``timeout_s``: the caller's time limit. The caller enforces it by cancelling
      :func:`run_process`; the process only stops itself
      ``ProcessTimings.timeout_backstop_s`` later, in case that never happens.
    """

    argv: Optional[list[str]] = None
    shell: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    stdin: Optional[bytes] = None
    timeout_s: Optional[float] = None


@dataclass(frozen=True)
class ExecResult:
    """How the process ended: ``exit_code``, or the ``signal`` that killed it."""

    exit_code: Optional[int]
    signal: Optional[int] = None


@dataclass(frozen=True)
class PutSpec:
    """A file to write atomically: a temporary file beside ``path``, then a rename.

    - ``mode``: permission bits (0 to 0o7777); None keeps the mode of the file being
      replaced, or :data:`DEFAULT_MODE` for a new file. Never subject to the umask.
    - ``make_parents``: create missing parent directories.
    - ``size``: when given, the exact number of bytes the source must yield.
    """

    path: str
    mode: Optional[int] = None
    make_parents: bool = True
    size: Optional[int] = None


@dataclass(frozen=True)
class FileStat:
    """What ``put`` wrote: its size and the mode the file now has."""

    size: int
    mode: Optional[int] = None


@dataclass
class RemoteFile:
    """A file being read: its size and mode up front, then its bytes in ``chunks``.

    Close it with :meth:`aclose` unless ``chunks`` is read to its end.
    """

    size: int
    mode: Optional[int]
    chunks: AsyncIterator[bytes]

    async def aclose(self) -> None:
        """Close the file; safe at any time, also twice."""
        closer = getattr(self.chunks, "aclose", None)
        if closer is not None:
            await closer()


@dataclass(frozen=True)
class ServerFacts:
    """What ``info`` reports. Unknown facts stay ``None``; ``extra`` holds the rest."""

    hostname: Optional[str] = None
    os: Optional[str] = None
    os_version: Optional[str] = None
    kernel: Optional[str] = None
    arch: Optional[str] = None
    uptime_s: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The facts as a JSON-ready dict."""
        return dataclasses.asdict(self)
