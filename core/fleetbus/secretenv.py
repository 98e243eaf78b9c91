"""Environment variables through which fleetbus receives secrets.

Transports that start processes remove these from the environment they pass on, so
`fleetbus run local -- env` cannot print the master key or the NATS token.
"""

from __future__ import annotations

from fleetbus_base.ops.environment import SECRET_ENV_VARS  # noqa: F401  (re-exported)
