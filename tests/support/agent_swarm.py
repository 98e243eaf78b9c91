"""Run many real outbound agent connections in one process: `agent_swarm.py GATEWAY PIN KEYS_JSON`.

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


async def main() -> None:
    gateway, pin, keys_file = sys.argv[1:4]
    host, port = gateway.rsplit(":", 1)
    with open(keys_file) as fh:  # noqa: ASYNC230 - before the loop has any work
        keys = json.load(fh)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handler = Handler()
    await asyncio.gather(*(
        run_connect(ConnectOptions(host=host, port=int(port), key=key, fingerprint=pin), stop, handler)
        for key in keys
    ))


if __name__ == "__main__":
    asyncio.run(main())
