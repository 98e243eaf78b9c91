"""Whether this kernel gives us pidfds, to wait for a child's exit in the event loop.

:mod:`fleetbus_base.ops.child` waits on a pidfd where it can; choosing asyncio's
pidfd child watcher on Python 3.9-3.11 is a patch, in :mod:`fleetbus_base.tuning`.
"""

from __future__ import annotations

import os


def pidfd_usable() -> bool:
    """Whether this kernel lets us open a pidfd (absent before Linux 5.3, or blocked)."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    os.close(fd)
    return True
