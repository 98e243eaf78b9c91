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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocking import RunBlocking, ThreadRunner, default_run_blocking
    from .environment import SECRET_ENV_VARS, child_environment, spawn_environment
    from .errors import ERROR_CODES, OpError
    from .facts import server_facts
    from .files import (
        GET_CHUNK,
        TEMP_PREFIX,
        FileChunks,
        check_path,
        get_file,
        put_file,
    )
    from .process import (
        READ_CHUNK,
        OutputCallback,
        ProcessTimings,
        run_process,
    )
    from .specs import ExecResult, ExecSpec, FileStat, PutSpec, RemoteFile, ServerFacts

# Each submodule is imported on first use of one of its names (PEP 562), so an agent
# that never moved a file holds no file-transfer code (tempfile, shutil and what they
# import) and one that never ran a process no subprocess machinery. Idle memory is the
# agent's figure of merit on the servers it runs on.
_SUBMODULE = {
    "RunBlocking": "blocking", "ThreadRunner": "blocking", "default_run_blocking": "blocking",
    "SECRET_ENV_VARS": "environment", "child_environment": "environment",
    "spawn_environment": "environment",
    "ERROR_CODES": "errors", "OpError": "errors",
    "server_facts": "facts",
    "ExecSpec": "specs", "ExecResult": "specs", "PutSpec": "specs", "FileStat": "specs",
    "RemoteFile": "specs", "ServerFacts": "specs",
    "GET_CHUNK": "files", "TEMP_PREFIX": "files", "FileChunks": "files", 
     "check_path": "files", "get_file": "files",
    "put_file": "files",
    "READ_CHUNK": "process",
    "OutputCallback": "process", "ProcessTimings": "process", "run_process": "process",
}


def __getattr__(name: str) -> Any:
    submodule = _SUBMODULE.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_SUBMODULE))


__all__ = [
    "ERROR_CODES",
    "GET_CHUNK",
    "READ_CHUNK",
    "SECRET_ENV_VARS",
    "TEMP_PREFIX",
    "ExecResult",
    "ExecSpec",
    "FileChunks",
    "FileStat",
    "OpError",
    "OutputCallback",
    "ProcessTimings",
    "PutSpec",
    "RemoteFile",
    "RunBlocking",
    "ServerFacts",
    "ThreadRunner",
    "check_path",
    "child_environment",
    "default_run_blocking",
    "get_file",
    "put_file",
    "run_process",
    "server_facts",
    "spawn_environment",
]
