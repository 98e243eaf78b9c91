"""Registers the built-in ``local`` transport through the ``fleetbus.plugins`` entry point."""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .transport import LocalTransport

    return [LocalTransport]


@hookimpl
def fleetbus_cli(cli):
    from .cli import add_cli

    add_cli(cli)
