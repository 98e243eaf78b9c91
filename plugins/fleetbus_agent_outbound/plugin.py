"""Registers the ``agent-outbound`` transport (the TLS gateway) through the entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .gateway import GatewayTransport

    return [GatewayTransport]


@hookimpl
def fleetbus_cli(cli):
    from .cli import add_cli

    add_cli(cli)
