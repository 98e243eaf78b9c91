"""Registers the ``agent-inbound`` transport through the ``fleetbus.plugins`` entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .transport import InboundTransport

    return [InboundTransport]
