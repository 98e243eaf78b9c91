"""Registers the built-in ``local`` transport through the ``fleetbus.plugins`` entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .transport import LocalTransport

    return [LocalTransport]
