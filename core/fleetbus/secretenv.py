"""Environment variables through which fleetbus receives secrets.

Transports that start processes remove these from the environment they pass on, so
`fleetbus run local -- env` cannot print the master key or the NATS token.
"""

from __future__ import annotations

SECRET_ENV_VARS: frozenset[str] = frozenset(
    {"FLEETBUS_MASTER_KEY", "FLEETBUS_NATS_TOKEN", "FLEETBUS_EMBEDDED_NATS_TOKEN"}
)
