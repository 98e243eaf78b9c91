"""Registers the ``wmi`` transport (Windows remote management) through the entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .transport import WmiTransport

    return [WmiTransport]


@hookimpl
def fleetbus_cli(cli):
    from .cli import add_cli

    add_cli(cli)
