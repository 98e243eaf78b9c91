"""Registers the ``ssh`` transport through the ``fleetbus.plugins`` entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .transport import SshTransport

    return [SshTransport]
