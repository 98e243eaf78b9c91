"""Every message on a subject, collected from the moment the subscription is in place.

For tests that prove fleetbus published nothing somewhere (another user's inbox, an
admin subject): subscribe first, act, flush, then assert the list is empty.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg


async def watch(nc: NATS, subject: str) -> list[Msg]:
    """A list that fills with the messages ``nc`` receives on ``subject`` (flushed, so
    nats-server has the subscription before this returns)."""
    seen: list[Msg] = []

    async def note(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(subject, cb=note)
    await nc.flush()
    return seen
