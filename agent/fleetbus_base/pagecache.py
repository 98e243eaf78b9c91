"""Drop-behind for large writes: a file being written is kept out of the page cache.

Written the ordinary way, a 1 GiB ``put`` leaves 1 GiB of the server's page cache
holding a file nobody is reading, pushing out what the server's own workload had
cached, and every page of it is a page the kernel had to find first. Freshly found
pages are the expensive part on virtual machines whose hypervisor backs guest memory
lazily (free page reporting, ballooning): on the machine the benchmarks run on,
writing into new page-cache pages costs about 3 ms of kernel time per MiB, against
about 0.4 ms when the same pages are reused (docs/performance.md).

So every :data:`DROP_EVERY` bytes the writer asks the kernel to start writing back
what it has written and to drop the pages that are already clean
(``POSIX_FADV_DONTNEED``). That call does not wait for the disk: pages still being
written back stay cached and are dropped by a later call. A file stays in the cache
only up to a few times :data:`DROP_EVERY`, and the next writes reuse the pages just
freed. Durability is unchanged: ``put`` still fsyncs before its rename.

Files smaller than :data:`DROP_EVERY` are never touched (a config file written and
read back at once stays cached). Where ``posix_fadvise`` does not exist (macOS,
Windows) this does nothing.
"""

from __future__ import annotations

import os

DROP_EVERY = 8 * 1024 * 1024
"""Bytes written between two drop-behind calls: a file never holds much more than
twice this in the page cache. Smaller costs more calls; 8 MiB measured as cheap as
any larger step."""

_fadvise = getattr(os, "posix_fadvise", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)


class DropBehind:
    """Counts what is written to a file descriptor and drops what lies behind.

    Call :meth:`wrote` after each write with the bytes written, and :meth:`finish`
    once the file is complete. Both block briefly in the kernel, so call them from the
    thread doing the writes.
    """

    __slots__ = ("_fd", "_next", "size")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._next = DROP_EVERY
        self.size = 0

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` more were written; drop what is behind every DROP_EVERY."""
        self.size += nbytes
        if self.size >= self._next:
            self._next = self.size + DROP_EVERY
            self._advise(self.size)

    def finish(self, sync: bool = False) -> None:
        """The file is complete: drop it all if it was large.

        Only clean pages go, so a caller that has not fsynced passes ``sync=True``:
        a large file is then written back first (most of it already is, by the calls
        before) and leaves the cache whole, however slow the disk.
        """
        if self.size < DROP_EVERY or _fadvise is None:
            return
        if sync:
            os.fdatasync(self._fd)
        self._advise(self.size)

    def _advise(self, end: int) -> None:
        if _fadvise is None:
            return
        try:
            # From 0, not from the last call's end: pages that were still under
            # writeback then are clean now and go this time.
            _fadvise(self._fd, 0, end, _DONTNEED)
        except OSError:
            pass  # advice only; a file system that refuses it loses nothing
