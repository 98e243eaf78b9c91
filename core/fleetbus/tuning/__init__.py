"""Every process tweak and library patch of fleetbus's own processes, in one place.

Each entry point makes one call, before its event loop starts::

    fleetbus.tuning.apply(fleetbus.tuning.SERVER)   # up, core, worker
    fleetbus.tuning.apply(fleetbus.tuning.CLIENT)   # the fleetbus command
    fleetbus.tuning.apply(fleetbus.tuning.TRANSFER) # its put and get

Nothing on the data path applies a patch. ``FLEETBUS_TUNING=off`` turns all of them off
(docs/operations.md); the test suite runs once that way in CI, so none of them is
load-bearing for correctness. Patches, one module per library or area, each naming the
version it targets, why it exists, and checking what it patches first (a changed
library leaves it "not applied" with a debug log, never an error):

=====================  ======================================  ==========================
name                   what                                    where
=====================  ======================================  ==========================
nats_read_buffer       nats-py reads its socket 512 KiB at     :mod:`.natspy`
                       a time, not 32 KiB
nats_direct_writes     requests and replies written in the     :mod:`.natspy`
                       loop turn that publishes them
nats_direct_dispatch   messages handed over from nats-py's     :mod:`.natspy`
                       read loop, without a task per           (used by
                       subscription                            :mod:`fleetbus.dispatch`)
gc_young_threshold     young GC generation of 100,000          :mod:`.collector`
large_buffers          glibc serves 1 MiB transfer buffers     :mod:`fleetbus_base.tuning`
                       from the heap
tls_read_buffer        asyncio's TLS connections share one     :mod:`fleetbus_base.tuning`
                       read buffer per thread
pidfd_child_watcher    asyncio waits for children on pidfds    :mod:`fleetbus_base.tuning`
                       (Python 3.9-3.11)
=====================  ======================================  ==========================

The last three live in the agent's standard-library tuning module, which the agent
applies itself, because the agent protocol and the process code run in core processes
too (the gateway, the agent-inbound and local transports).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fleetbus_base import tuning as agent_tuning
from fleetbus_base.tuning import ENV, enabled

from . import collector, natspy

__all__ = ["CLIENT", "ENV", "PATCHES", "SERVER", "TRANSFER", "applied", "apply", "enabled"]

log = logging.getLogger("fleetbus.tuning")

CLIENT = ("nats_read_buffer", "nats_direct_writes", "nats_direct_dispatch")
"""The ``fleetbus`` command: requests sent and replies read at once."""

TRANSFER = (*CLIENT, agent_tuning.LARGE_BUFFERS)
"""The command's ``put`` and ``get``, which move 1 MiB chunks (and the bench's client)."""

SERVER = (*TRANSFER, "gc_young_threshold", agent_tuning.TLS_READ_BUFFER_PATCH,
          agent_tuning.PIDFD_CHILD_WATCHER)
"""``up``, ``core`` and ``worker``: the processes that serve commands and hold agents."""

PATCHES: dict[str, Callable[[], str | None]] = {
    "nats_read_buffer": natspy.read_buffer,
    "nats_direct_writes": natspy.direct_writes,
    "nats_direct_dispatch": natspy.direct_dispatch,
    "gc_young_threshold": collector.relax_gc,
}
"""The core's own patches by name; the agent module's are in ``fleetbus_base.tuning.PATCHES``."""

_applied: dict[str, str] = {}


def applied() -> dict[str, str]:
    """Every patch applied in this process so far, the agent module's included: name -> what."""
    return {**agent_tuning.applied(), **_applied}


def apply(names: tuple[str, ...] = SERVER) -> dict[str, str]:
    """Apply the named patches, once each (calling again is harmless); return :func:`applied`.

    With ``FLEETBUS_TUNING=off`` nothing is applied. Raises ValueError for a name no
    module knows (a typo at an entry point, not a library that changed).
    """
    unknown = [n for n in names if n not in PATCHES and n not in agent_tuning.PATCHES]
    if unknown:
        raise ValueError(f"no such tuning patch: {', '.join(unknown)}")
    if not enabled():
        log.debug("%s=off: no tuning applied", ENV)
        return applied()
    agent_tuning.apply([n for n in names if n in agent_tuning.PATCHES])
    for name in names:
        patch = PATCHES.get(name)
        if patch is None or name in _applied:
            continue
        try:
            done = patch()
        except Exception as exc:  # a library that changed must not stop the process
            log.debug("tuning %s not applied: %s: %s", name, type(exc).__name__, exc)
            continue
        if done is not None:
            _applied[name] = done
            log.debug("tuning %s: %s", name, done)
    return applied()
