"""Registers the ``wmi`` transport (Windows remote management) through the entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .transport import WmiTransport

    return [WmiTransport]
