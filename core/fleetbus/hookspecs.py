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

Keep the module the entry point names cheap to import: fleetbus imports it to list
plugins and to build its CLI. Import the transport (and its client libraries) inside
``fleetbus_transports``, and click and your CLI module inside ``fleetbus_cli``. A
transport may go further and import its client library when it first opens a session
(ssh and wmi do: paramiko and pywinrm are ~0.1 s of every start); it then calls
:func:`require_installed` in ``fleetbus_transports`` so a missing library is still
reported when the plugin loads, not at the first command.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import pluggy

from .transport import Transport

if TYPE_CHECKING:
    from .cli.extend import CliRegistry

PROJECT = "fleetbus"
ENTRY_POINT_GROUP = "fleetbus.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def require_installed(*modules: str) -> None:
    """Raise :class:`ModuleNotFoundError` for the first of ``modules`` that is not installed,
    without importing any of them.

    For a transport that imports its client library lazily: call it in
    ``fleetbus_transports`` and the plugin fails to load (``fleetbus plugins list`` says
    why) exactly as if the library had been imported there.
    """
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


@hookspec
def fleetbus_transports() -> list[type[Transport]]:
    """Return the transport classes this plugin provides.

    Each class subclasses :class:`fleetbus.transport.Transport` and has a unique
    ``name``. Called once per process when plugins load. Since fleetbus 0.1; the
    classes' ``Settings``, ``Options`` and ``capabilities`` declarations are checked
    since the declarations were added (issue 19).
    """
    raise NotImplementedError


@hookspec
def fleetbus_cli(cli: CliRegistry) -> None:
    """Add this plugin's flags and commands to the ``fleetbus`` command.

    ``cli`` is a :class:`fleetbus.cli.extend.CliRegistry`: ``add_server_flag`` (a flag
    on ``servers add``, stored as a server option or read by ``on_server_add``),
    ``add_setting_flag`` (a flag on ``up``/``worker`` that sets a transport setting),
    ``add_command`` (a command of its own, top level or under ``servers``) and
    ``quiet_logger``. Called at most once per process, only when a command that can
    show these additions runs, never on ``fleetbus run``. Returns nothing. A hook that
    raises is logged and skipped. Since fleetbus 0.1 (issue 19); optional.
    """
