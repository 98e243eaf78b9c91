"""How often Python's cyclic garbage collector runs in a process that serves commands.

Python starts a young collection every 700 net new container objects, and a full one
whenever the objects promoted since the last exceed a quarter of the old ones. A worker
holding 5,000 agents has over a million long-lived objects, so a full collection takes
0.5 s or more (measured with gc.callbacks in `fleetbus up`), and at the default young
threshold every command's objects live through two young collections while in flight
and count as promoted: answering 500 agents' pings ran five full collections in 10 s,
about 0.4 ms of the gateway's 1 ms of CPU per ping, and a gateway restart (5,000 agents
reconnecting) ran 48 of them. A young generation that short-lived commands do not fill
keeps them out of the old one; young collections stay short, because most command
objects are gone by the time one runs.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 100_000


def relax_gc() -> None:
    """Raise the process's young-generation threshold to :data:`YOUNG_THRESHOLD`.

    Never lowers it, and leaves a collector an operator turned off (threshold 0) off.
    """
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
