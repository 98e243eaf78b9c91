"""How much of a file sits in the page cache (mincore), for the drop-behind tests."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache. Mapping a file does not read
    it, so asking does not change the answer."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(v & 1 for v in vec) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def require_droppable_cache(directory: Path) -> None:
    """Skip unless files written in ``directory`` stay cached and POSIX_FADV_DONTNEED
    drops them once clean (not so on tmpfs, or without posix_fadvise)."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    probe = directory / "cache-probe.bin"
    with open(probe, "wb") as fh:
        fh.write(os.urandom(1024 * 1024))
        fh.flush()
        os.fsync(fh.fileno())
        cached = resident_fraction(probe)
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    dropped = resident_fraction(probe)
    probe.unlink()
    if cached < 0.9 or dropped > 0.1:
        pytest.skip(f"page cache here is not observable or not droppable ({cached:.2f} -> {dropped:.2f})")
