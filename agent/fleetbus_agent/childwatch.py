"""How asyncio learns that a child process has exited.

Before Python 3.12, asyncio's default child watcher starts a thread for every child
process and joins it on exit. Measured on 2 cores: starting ``true`` through
``loop.subprocess_exec`` took about 1.3 ms with that watcher and 0.4 ms with
``PidfdChildWatcher``, which waits on a pidfd in the event loop instead. Python 3.12+
uses pidfds by default (and deprecates choosing a watcher), so this only acts on
3.9-3.11, and only where the kernel has ``pidfd_open`` (Linux 5.3+) and it is allowed.

``exec`` itself no longer goes through asyncio's subprocess machinery (see
:mod:`fleetbus_agent.ops.child`); this still serves every other process started with
asyncio (the embedded nats-server, for one).
"""

from __future__ import annotations

import asyncio
import os
import sys


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


def prefer_pidfd_child_watcher() -> bool:
    """Use asyncio's pidfd child watcher on Python 3.9-3.11 when the kernel has pidfds.

    Call it once, before the event loop starts; whether the pidfd watcher is in use
    afterwards. Harmless when the event loop policy is not asyncio's own (uvloop
    watches children itself).
    """
    if sys.version_info >= (3, 12):
        return pidfd_usable()
    if not pidfd_usable() or not hasattr(asyncio, "PidfdChildWatcher"):
        return False
    policy = asyncio.get_event_loop_policy()
    if not isinstance(policy, asyncio.DefaultEventLoopPolicy):
        return False
    # PidfdChildWatcher keeps no loop of its own: it registers each pidfd with the loop
    # running at spawn time, so one instance serves every loop in the process.
    policy.set_child_watcher(asyncio.PidfdChildWatcher())
    return True
