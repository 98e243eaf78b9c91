"""The fleetbus agent: runs commands and moves files for fleetbus on the server it runs on.

The program (command line, dialling out, listening, per-stream handlers, its TLS
identity, path policy, the zipapp build) over :mod:`fleetbus_base`, which carries the
wire protocol and the operations. Standard library only, Python 3.9+, so both ship as
one zipapp file to any server.
"""

from fleetbus_base import __version__

# Here rather than in listen.py, so the command line can show them without importing
# the listening mode's modules into an agent that only dials out.
DEFAULT_LISTEN_BIND = "0.0.0.0"
DEFAULT_LISTEN_PORT = 7444

__all__ = ["DEFAULT_LISTEN_BIND", "DEFAULT_LISTEN_PORT", "__version__"]
