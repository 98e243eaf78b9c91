"""Registers the ``ssh`` transport through the ``fleetbus.plugins`` entry point."""

from fleetbus.hookspecs import hookimpl, require_installed


@hookimpl
def fleetbus_transports():
    # paramiko itself is imported at the first session (see transport.py).
    require_installed("paramiko")
    from .transport import SshTransport

    return [SshTransport]


@hookimpl
def fleetbus_cli(cli):
    from .cli import add_cli

    add_cli(cli)
