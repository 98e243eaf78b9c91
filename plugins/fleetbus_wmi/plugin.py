"""Registers the ``wmi`` transport (Windows remote management) through the entry point."""

from fleetbus.hookspecs import hookimpl, require_installed


@hookimpl
def fleetbus_transports():
    # winrm itself is imported at the first session (see transport.py).
    require_installed("winrm")
    from .transport import WmiTransport

    return [WmiTransport]


@hookimpl
def fleetbus_cli(cli):
    from .cli import add_cli

    add_cli(cli)
