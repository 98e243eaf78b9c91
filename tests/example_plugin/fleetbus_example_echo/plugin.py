"""The module the ``fleetbus.plugins`` entry point names: it only registers the hooks.

fleetbus imports this module for ``fleetbus plugins list`` and to build its CLI, so keep
it cheap: import the transport (and its client libraries) inside ``fleetbus_transports``,
and click and the CLI module inside ``fleetbus_cli``.
"""

from fleetbus.plugin import hookimpl


@hookimpl
def fleetbus_transports():
    """The transport classes this plugin provides: one, named ``echo``."""
    from .transport import EchoTransport

    return [EchoTransport]


@hookimpl
def fleetbus_cli(cli):
    """The plugin's flags: ``servers add --exit-code``, ``up``/``worker --echo-os``."""
    from .cli import add_cli

    add_cli(cli)
