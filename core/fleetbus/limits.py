"""Size and time limits of the bus API, in one place (docs/bus-api.md lists them).

Kept free of pydantic so the CLI and client import it without building models.
"""

# A request body is one NATS message; replies with inline file content must fit one too.
MAX_REQUEST_BYTES = 1024 * 1024
MAX_INLINE_BYTES = 512 * 1024
DEFAULT_TAIL_BYTES = 64 * 1024
DEFAULT_EXEC_TIMEOUT_S = 600.0
MAX_EXEC_TIMEOUT_S = 7 * 24 * 3600.0

# Streamed put/get (fleetbus.streams): a requester silent this long ends the transfer
# with `timeout`; the window bounds what either side buffers per transfer.
DEFAULT_STREAM_IDLE_S = 30.0
MAX_STREAM_IDLE_S = 300.0
DEFAULT_STREAM_WINDOW = 16 * 1024 * 1024
MIN_STREAM_WINDOW = 64 * 1024
MAX_STREAM_WINDOW = 64 * 1024 * 1024
