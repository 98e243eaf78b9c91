"""The C heap (glibc only): handing freed memory back, and keeping transfer buffers.

Two policies, both off with ``FLEETBUS_TUNING=off`` (:mod:`fleetbus_base.tuning`, which
also applies the start-up ones):

- **Trimming.** glibc's automatic trim only releases the top of the heap; memory freed
  below live objects (what compiling the agent's modules from its zipapp used, what a
  flood of connections left) stays resident until ``malloc_trim`` releases free pages
  anywhere in the heap. Where the bytecode was cached there is little to release, and
  loading _ctypes to call it costs more (about 0.2 MiB), so start-up trims only after
  compiling (:func:`compiled_from_source`).
- **Keeping large buffers.** A transfer moves 1 MiB chunks, and each process on the way
  allocates a few buffers of that size per chunk. glibc gives every allocation above
  its mmap threshold a fresh ``mmap`` (and raising that threshold dynamically does not
  help an allocation of the very size just freed), so each chunk costs 256 page faults
  and the zeroing of a MiB. :func:`keep_large_buffers` serves them from the heap; the
  trim threshold goes up with it, or the heap top would be handed back and faulted in
  again between two chunks. docs/performance.md has the figures.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from .tuning import enabled as _tuning_enabled

_trim: Optional[Callable[[int], Any]] = None
_looked_up = False

MMAP_THRESHOLD = 4 * 1024 * 1024
"""Allocations below this come from the heap while :func:`keep_large_buffers` holds:
above the 1 MiB chunks of a transfer and what is joined from them."""

TRIM_THRESHOLD = 16 * 1024 * 1024
"""Free memory at the top of the heap kept rather than returned while
:func:`keep_large_buffers` holds: a few chunks' worth of buffers in flight."""

LARGE_TRANSFER = 8 * 1024 * 1024
"""A transfer of at least this many bytes counts as large for :class:`TransferHeap`."""

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_kept = False


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
        _restype_ = None  # neither result is used (malloc_trim: released any; mallopt: took it)

    class _Program:
        _handle = _ctypes.dlopen(None, 0)

    return _Function((name, _Program()))  # type: ignore[no-any-return]


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library cannot (not glibc)
    or tuning is off."""
    if not _tuning_enabled():
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def keep_large_buffers() -> bool:
    """Serve buffers up to :data:`MMAP_THRESHOLD` from the heap and keep up to
    :data:`TRIM_THRESHOLD` of freed memory at its top, for the rest of the process.

    For processes that move files: fleetbus workers, the CLI's ``put`` and ``get``,
    and an agent while a large transfer runs (:class:`TransferHeap`). False where the C
    library has no ``mallopt`` (not glibc) or tuning is off. Safe to call more than once.
    """
    global _kept
    if _kept:
        return True
    if not _tuning_enabled():
        return False
    if _malloc_trim() is None:  # not glibc, or _ctypes unusable here
        return False
    try:
        mallopt = _c_function("mallopt")
    except (ImportError, OSError, AttributeError):
        return False
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _kept = True
    return True


class TransferHeap:
    """The agent's heap while it moves files: :func:`keep_large_buffers` from the first
    large transfer on, and a trim when the last one in flight ends, so an agent that
    goes back to idle after a 1 GiB put does not keep the buffers it held for it.

    Use ``with heap.transfer(size):`` around a transfer of ``size`` bytes (None when
    not known yet counts as small).
    """

    def __init__(self) -> None:
        self._active = 0

    @contextlib.contextmanager
    def transfer(self, size: Optional[int]) -> Iterator[None]:
        if not (isinstance(size, int) and size >= LARGE_TRANSFER):
            yield
            return
        self._active += 1
        keep_large_buffers()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                trim_heap()


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
