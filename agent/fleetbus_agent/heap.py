"""Handing freed heap memory back to the operating system (glibc only).

Python compiles every module of the agent from source when it runs from the zipapp
(zipimport writes no bytecode) or with PYTHONDONTWRITEBYTECODE: compiling
protocol.py alone peaks at about 4 MiB of parser memory. That memory is freed, but it
stays in the process's heap below objects allocated later, so glibc's automatic trim
(which only releases the top of the heap) never returns it: measured by hand, an idle
agent held about 3 MiB more resident memory than the same agent started from cached
bytecode. ``malloc_trim`` releases free pages anywhere in the heap.

Where the bytecode was cached there is little to release and loading ctypes to call
it costs more (about 0.3 MiB), so start-up trims only after compiling.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Callable, Optional

_trim: Optional[Callable[[int], int]] = None
_looked_up = False


def _malloc_trim() -> Optional[Callable[[int], int]]:
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _trim = ctypes.CDLL(None).malloc_trim  # absent on musl
            except (ImportError, OSError, AttributeError):
                _trim = None
    return _trim


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def compiled_from_source(module: ModuleType) -> bool:
    """Whether ``module`` was (most likely) compiled from source rather than loaded from
    its cached bytecode: no bytecode file (a zipapp, PYTHONDONTWRITEBYTECODE) or an
    older one than the source. A cache written by this very start looks current: that
    start keeps its garbage, the next ones load the cache."""
    spec = getattr(module, "__spec__", None)
    origin, cached = getattr(spec, "origin", None), getattr(spec, "cached", None)
    if not origin or not cached:
        return False  # built in, frozen or not from a file: nothing was compiled here
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
