"""The module the ``fleetbus.plugins`` entry point names: it only registers the hook.

fleetbus imports this module for ``fleetbus plugins list`` too, so keep it cheap: import
the transport (and its client libraries) inside the hook, not at the top.
"""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    """The transport classes this plugin provides: one, named ``echo``."""
    from .transport import EchoTransport

    return [EchoTransport]
