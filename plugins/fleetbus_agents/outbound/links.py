"""The agents connected to this gateway: one live connection per server, at most."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fleetbus_base.wire import Connection

log = logging.getLogger("fleetbus.transport.agent-outbound")


@dataclass
class Link:
    server: str
    conn: Connection
    key_id: str
    remote: str
    agent: str
    since: float = field(default_factory=time.time)
    status_at: float = field(default_factory=time.monotonic)
    """When this link's status was last written (monotonic clock)."""
    epoch: int | None = None
    """The revision of this gateway's claim on the server (None until claimed)."""
    taken_over: bool = False
    """Closed because another gateway claimed the server since: its status is theirs to write."""


class Links:
    def __init__(self) -> None:
        self.by_server: dict[str, Link] = {}

    def __len__(self) -> int:
        return len(self.by_server)

    def get(self, server: str) -> Link | None:
        link = self.by_server.get(server)
        return link if link is not None and not link.conn.closed else None

    def put(self, link: Link) -> Link | None:
        """Make ``link`` the server's connection; return the one it replaces, if any."""
        old = self.by_server.get(link.server)
        self.by_server[link.server] = link
        return old if old is not None and old is not link else None

    def remove(self, link: Link) -> bool:
        """Forget ``link`` if it is still the server's current one."""
        if self.by_server.get(link.server) is link:
            del self.by_server[link.server]
            return True
        return False

    def with_key(self, key_id: str) -> list[Link]:
        return [link for link in self.by_server.values() if link.key_id == key_id]
