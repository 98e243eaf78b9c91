"""CPython's cyclic garbage collector, in a process that serves commands.

Patch ``gc_young_threshold``, for CPython 3.11-3.13 (``gc.get_threshold`` /
``gc.set_threshold``, generational collector with three generations). Python starts a
young collection every 700 net new container objects, and a full one whenever the
objects promoted since the last exceed a quarter of the old ones. A worker holding
thousands of agents has over a million long-lived objects, so a full collection takes
half a second or more; at the default young threshold every command's objects live
through two young collections while in flight and count as promoted, so serving
commands keeps triggering full collections. A young generation that short-lived
commands do not fill keeps them out of the old one; young collections stay short,
because most command objects are gone by the time one runs. docs/performance.md has the
figures.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("fleetbus.tuning")

YOUNG_THRESHOLD = 100_000


def relax_gc() -> str | None:
    """Raise the process's young-generation threshold to :data:`YOUNG_THRESHOLD`.

    Never lowers it, and leaves a collector an operator turned off (threshold 0) off.
    What was done, or None (with a debug log) when nothing was.
    """
    threshold = gc.get_threshold()
    if len(threshold) != 3:
        log.debug("tuning gc_young_threshold not applied: gc thresholds are %r", threshold)
        return None
    young, middle, old = threshold
    if young == 0:
        log.debug("tuning gc_young_threshold not applied: the collector is turned off")
        return None
    if young >= YOUNG_THRESHOLD:
        return f"young threshold already {young}"
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    return f"young threshold {young} -> {YOUNG_THRESHOLD}"
