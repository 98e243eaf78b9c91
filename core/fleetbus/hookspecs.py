"""pluggy hook specifications for fleetbus plugins.

A plugin is a module (or object) registered under the entry-point group
``fleetbus.plugins`` that implements some of these hooks with ``@hookimpl``::

    # pyproject.toml
    [project.entry-points."fleetbus.plugins"]
    mytransport = "mytransport.plugin"

    # mytransport/plugin.py
    from fleetbus.hookspecs import hookimpl

    @hookimpl
    def fleetbus_transports():
        return [MyTransport]

The built-in transports are registered exactly this way.
"""

from __future__ import annotations

import pluggy

from .transport import Transport

PROJECT = "fleetbus"
ENTRY_POINT_GROUP = "fleetbus.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fleetbus_transports() -> list[type[Transport]]:
    """Return the transport classes this plugin provides.

    Each class subclasses :class:`fleetbus.transport.Transport` and has a unique
    ``name``. Called once per process when plugins load.
    """
    raise NotImplementedError
