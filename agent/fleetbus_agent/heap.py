"""Handing freed heap memory back to the operating system (glibc only).

Python compiles every module of the agent from source when it runs from the zipapp
(zipimport writes no bytecode) or with PYTHONDONTWRITEBYTECODE: compiling
protocol.py alone peaks at about 4 MiB of parser memory. That memory is freed, but it
stays in the process's heap below objects allocated later, so glibc's automatic trim
(which only releases the top of the heap) never returns it: measured by hand, an idle
agent held about 3 MiB more resident memory than the same agent started from cached
bytecode. ``malloc_trim`` releases free pages anywhere in the heap.

Where the bytecode was cached there is little to release and loading _ctypes to call
it costs more (about 0.2 MiB), so start-up trims only after compiling.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any, Callable, Optional

_trim: Optional[Callable[[int], Any]] = None
_looked_up = False


def _malloc_trim() -> Optional[Callable[[int], Any]]:
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            try:
                _trim = _c_function("malloc_trim")  # absent on musl
            except (ImportError, OSError, AttributeError):
                _trim = None
    return _trim


def _c_function(name: str) -> Callable[[int], Any]:
    """A C library function taking ints, looked up in the running program.

    Built on ``_ctypes`` the way ``ctypes.CDLL`` does it, without importing ``ctypes``
    itself: the agent is idle most of its life and ``ctypes`` would keep about 0.2 MiB
    more for the one call made here. Any difference in ``_ctypes`` on some Python
    raises ImportError or AttributeError, and the caller goes without trimming.
    """
    import _ctypes

    class _Function(_ctypes.CFuncPtr):  # type: ignore[misc, name-defined]
        _flags_ = _ctypes.FUNCFLAG_CDECL
        _restype_ = None  # the result (malloc_trim's "was anything released") is not used

    class _Program:
        _handle = _ctypes.dlopen(None, 0)

    return _Function((name, _Program()))  # type: ignore[no-any-return]


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def compiled_from_source(module: ModuleType) -> bool:
    """Whether ``module`` was (most likely) compiled from source rather than loaded from
    its cached bytecode: no bytecode file (PYTHONDONTWRITEBYTECODE, a zipapp run by
    another Python than the one that built it) or an older one than the source. A cache written by this very start looks current: that
    start keeps its garbage, the next ones load the cache."""
    spec = getattr(module, "__spec__", None)
    origin, cached = getattr(spec, "origin", None), getattr(spec, "cached", None)
    if not origin or not cached:
        return False  # built in, frozen or not from a file: nothing was compiled here
    if origin.endswith(".pyc"):
        return False  # loaded from the bytecode a zipapp carries (fleetbus_agent.build)
    try:
        return os.stat(cached).st_mtime < os.stat(origin).st_mtime
    except OSError:
        return True  # no bytecode file (inside a zipapp, cached is a path in the archive)


def trim_heap_after_start(module_name: str = "fleetbus_agent.protocol") -> bool:
    """Trim once start-up imports are done, if compiling them left garbage behind."""
    module = sys.modules.get(module_name)
    if module is None or not compiled_from_source(module):
        return False
    return trim_heap()
