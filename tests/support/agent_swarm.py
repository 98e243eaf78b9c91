"""Run many real outbound agent connections in one process: `agent_swarm.py GATEWAY PIN KEYS_JSON [SOURCES]`.

GATEWAY may list several, comma-separated (``a:7443,b:7443``): each agent tries them in order.
SOURCES, comma-separated local addresses (``127.0.0.2,127.0.0.3``), are dialled from in
turn, so that a swarm looks like agents on several hosts (a gateway caps what it holds
per source address before the handshake).

Each connection is the agent's own connect loop (fleetbus_agent.connect.run_connect),
so scale tests exercise the real agent code without one process per agent.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from fleetbus_agent.connect import ConnectOptions, run_connect
from fleetbus_agent.handlers import Handler
from fleetbus_base.tuning import apply as apply_tuning


async def main() -> None:
    gateway, pin, keys_file = sys.argv[1:4]
    sources: list[str | None] = [*sys.argv[4].split(",")] if len(sys.argv) > 4 and sys.argv[4] else [None]
    gateways = [(host, int(port)) for host, port in (g.rsplit(":", 1) for g in gateway.split(","))]
    (host, port), more = gateways[0], gateways[1:]
    with open(keys_file) as fh:  # noqa: ASYNC230 - before the loop has any work
        keys = json.load(fh)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handler = Handler()
    await asyncio.gather(*(
        run_connect(ConnectOptions(host=host, port=port, key=key, fingerprint=pin, more_gateways=more,
                                   source_address=sources[i % len(sources)]),
                    stop, handler)
        for i, key in enumerate(keys)
    ))


if __name__ == "__main__":
    apply_tuning()  # as the agent's own entry point does
    asyncio.run(main())
