"""The operations a fleetbus command performs on the host it runs on: exec, put, get, info.

This is the one implementation of their semantics. fleetbus's ``local`` transport calls
it for the host fleetbus runs on; the fleetbus agent calls it on remote servers. It is
standard library only and runs on Python 3.9+, so it ships inside the agent's zipapp.

- :func:`run_process` (``exec``): a process in its own process group, output streamed
  to an async callback in chunks of at most :data:`READ_CHUNK` bytes; cancelling it
  stops the whole group.
- :func:`put_file` (``put``): an atomic write from an async iterable of bytes.
- :func:`get_file` (``get``): a size snapshot and an async iterator of chunks.
- :func:`server_facts` (``info``).

Failures are :class:`OpError` with a fleetbus bus error code. Blocking file I/O runs
through a ``run_blocking`` callable; callers without a thread pool of their own get
:func:`default_run_blocking`.
"""

from __future__ import annotations

from .blocking import RunBlocking, ThreadRunner, default_run_blocking
from .environment import SECRET_ENV_VARS, child_environment
from .errors import ERROR_CODES, OpError
from .facts import Facts, server_facts
from .files import (
    GET_CHUNK,
    TEMP_PREFIX,
    FileChunks,
    FileStat,
    PutSpec,
    RemoteFile,
    check_path,
    get_file,
    put_file,
)
from .process import (
    READ_CHUNK,
    ExecResult,
    ExecSpec,
    OutputCallback,
    ProcessTimings,
    run_process,
)

__all__ = [
    "ERROR_CODES",
    "GET_CHUNK",
    "READ_CHUNK",
    "SECRET_ENV_VARS",
    "TEMP_PREFIX",
    "ExecResult",
    "ExecSpec",
    "Facts",
    "FileChunks",
    "FileStat",
    "OpError",
    "OutputCallback",
    "ProcessTimings",
    "PutSpec",
    "RemoteFile",
    "RunBlocking",
    "ThreadRunner",
    "check_path",
    "child_environment",
    "default_run_blocking",
    "get_file",
    "put_file",
    "run_process",
    "server_facts",
]
