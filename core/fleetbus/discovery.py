"""NATS micro discovery for workers: every plugin host answers ``$SRV.PING|INFO|STATS``.

Standard NATS tooling (``nats micro ls``) then lists each worker as ``fleetbus-worker``
with its transports and the number of servers it serves in the metadata; the core's
admin API is the ``fleetbus-admin`` service.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.service import Service

from . import __version__
from .host import PluginHost


async def start_worker_service(nc: NATS, host: PluginHost) -> Service:
    return await add_service(
        nc, name="fleetbus-worker", version=__version__,
        description="fleetbus plugin host: serves server subjects for its transports",
        metadata={
            "worker": host.settings.worker_id,
            "transports": ",".join(sorted(host.transports)),
            "prefix": host.names.prefix,
        },
    )
