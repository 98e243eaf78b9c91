"""fleetbus: register a server once, then run commands and move files on it by name."""

__version__ = "0.1.0"
