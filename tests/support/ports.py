"""Free loopback ports for the listeners tests and benchmarks start."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the kernel's ephemeral range.

    A port is chosen, released, then bound by another process a moment later. One
    inside the ephemeral range can be taken in between by any outgoing connection: agents
    dialling a killed gateway pick their local ports there (one that picks the gateway's
    own port connects to itself, TCP simultaneous open), and a NATS node's route port was
    lost so in the bench's smoke run. Outgoing connections never take a port below it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low // 2), low)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} on {host}")
