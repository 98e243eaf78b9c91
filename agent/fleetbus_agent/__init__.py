"""The fleetbus agent: runs commands and moves files for fleetbus on the server it runs on.

Standard library only, Python 3.9+, so it ships as one zipapp file to any server.
"""

__version__ = "0.1.0"

# Here rather than in listen.py, so the command line can show them without importing
# the listening mode's modules into an agent that only dials out.
DEFAULT_LISTEN_BIND = "0.0.0.0"
DEFAULT_LISTEN_PORT = 7444
