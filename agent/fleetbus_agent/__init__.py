"""The fleetbus agent: runs commands and moves files for fleetbus on the server it runs on.

Standard library only, Python 3.9+, so it ships as one zipapp file to any server.
"""

__version__ = "0.1.0"
