"""Names on the bus: subjects, KV buckets, streams. One place, derived from the prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidRequest

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Names:
    prefix: str = "fleetbus"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise InvalidRequest(
                f"invalid prefix {self.prefix!r}: 1-32 lowercase letters, digits, '_' or '-'"
            )

    # subjects -----------------------------------------------------------------
    def server(self, name: str, op: str) -> str:
        return f"{self.prefix}.v1.servers.{name}.{op}"

    def server_all(self, name: str) -> str:
        return f"{self.prefix}.v1.servers.{name}.*"

    def admin(self, endpoint: str) -> str:
        return f"{self.prefix}.v1.admin.{endpoint}"

    @property
    def admin_root(self) -> str:
        return f"{self.prefix}.v1.admin"

    def audit(self, server: str, op: str) -> str:
        return f"{self.prefix}.v1.audit.{server}.{op}"

    @property
    def audit_all(self) -> str:
        return f"{self.prefix}.v1.audit.>"

    def event(self, *tokens: str) -> str:
        return ".".join((f"{self.prefix}.v1.events", *tokens))

    @property
    def events_all(self) -> str:
        return f"{self.prefix}.v1.events.>"

    def queue_group(self, transport: str) -> str:
        return f"{self.prefix}.transport.{transport}"

    # JetStream ----------------------------------------------------------------
    @property
    def _b(self) -> str:
        return self.prefix.replace("-", "_")

    @property
    def servers_bucket(self) -> str:
        return f"{self._b}_servers"

    @property
    def status_bucket(self) -> str:
        return f"{self._b}_status"

    @property
    def credentials_bucket(self) -> str:
        return f"{self._b}_credentials"

    @property
    def commands_bucket(self) -> str:
        return f"{self._b}_commands"

    @property
    def agent_keys_bucket(self) -> str:
        return f"{self._b}_agent_keys"

    @property
    def gateways_bucket(self) -> str:
        return f"{self._b}_gateways"

    @property
    def files_bucket(self) -> str:
        return f"{self._b}_files"

    @property
    def audit_stream(self) -> str:
        return f"{self._b.upper()}_AUDIT"
