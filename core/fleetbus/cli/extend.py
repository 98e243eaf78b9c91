"""What a plugin may add to the ``fleetbus`` command, and the lazy loading of it.

A plugin implements the ``fleetbus_cli`` hook (:mod:`fleetbus.hookspecs`) and receives a
:class:`CliRegistry`, as tox 4 plugins receive a parser in ``tox_add_option``. Through it
a transport adds flags to ``servers add`` (stored as server options, or read by its own
prepare step), flags to ``up``/``worker`` that become its settings, and commands of its
own (top level, or under ``servers``).

The hooks run only when a command that can show their additions is resolved (``servers
add``, ``up``, ``worker``, a group's ``--help``, a command name the core does not have),
never for ``fleetbus run``: the plugins' modules stay unimported on the common path.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..client import Client

#: ``click.Context.meta`` key under which plugin flags keep their values.
FLAGS_META = "fleetbus.plugin_flags"

Undo = Callable[["Client"], Awaitable[None]]


@dataclass
class ServerDraft:
    """A ``servers add`` being prepared; a transport's prepare step completes it.

    ``flags`` holds the values of the flags that transport declared, by parameter name.
    ``before`` steps run with a connected client before the server is registered (e.g.
    storing a key as a credential); each may return an undo step, run if the
    registration then fails. ``after`` steps get the admin service's reply and print
    what the operator needs next (a key, the agent's command line); with ``--json``
    they do not run, and ``json_extra`` is merged into the printed reply instead.
    """

    name: str
    transport: str
    host: str | None
    port: int | None
    credential: str | None
    options: dict[str, Any]
    flags: dict[str, Any]
    #: ``--replace``: an existing registration (and what a step stores) is overwritten.
    replace: bool = False
    before: list[Callable[[Client], Awaitable[Undo | None]]] = field(default_factory=list)
    after: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    #: Added to the reply ``servers add --json`` prints (e.g. a key the CLI issued).
    json_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Flag:
    param: click.Option
    transports: set[str]
    option: str | None  # the server option a given value is stored as, if any


@dataclass
class _SettingFlag:
    param: click.Option
    transport: str
    setting: str


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(FLAGS_META, {})[param.name] = value
    return value


def _option(decls: tuple[str, ...], attrs: dict[str, Any]) -> click.Option:
    # Not passed to the command's function (which cannot know plugin flags): kept in
    # ctx.meta, read back with flag_values().
    return click.Option(list(decls), expose_value=False, callback=_keep, **attrs)


class CliRegistry:
    """What the ``fleetbus_cli`` hook receives. Every method is safe to call once per flag
    or command; a flag another transport already declared (same parameter name) is
    shared: its value reaches both."""

    def __init__(self) -> None:
        self.server_flags: dict[str, _Flag] = {}
        self.setting_flags: dict[str, list[_SettingFlag]] = {}
        self.prepares: dict[str, list[Callable[[ServerDraft], None]]] = {}
        self.commands: dict[str | None, dict[str, click.Command]] = {}
        self.quiet_loggers: list[str] = []

    def add_server_flag(self, transport: str, *decls: str, option: str | None = None, **attrs: Any) -> None:
        """A flag on ``servers add`` for servers of ``transport`` (click option arguments).

        With ``option``, a value given on the command line is stored as
        ``server.options[option]``; else the transport's prepare step reads it from
        :attr:`ServerDraft.flags`. Given for a server of another transport, it is an error.
        """
        param = _option(decls, attrs)
        have = self.server_flags.get(str(param.name))
        if have is not None:
            have.transports.add(transport)
            return
        self.server_flags[str(param.name)] = _Flag(param, {transport}, option)

    def on_server_add(self, transport: str, prepare: Callable[[ServerDraft], None]) -> None:
        """Run ``prepare`` on every ``servers add`` of a ``transport`` server, after its
        flags are in the draft; it may fail with a usage error (``fleetbus.cli.context.fail``)."""
        self.prepares.setdefault(transport, []).append(prepare)

    def add_setting_flag(self, command: str, transport: str, setting: str, *decls: str, **attrs: Any) -> None:
        """A flag on ``command`` (``up`` or ``worker``) whose value, when not None, becomes
        the setting ``setting`` of ``transport`` (winning over ``--transport-setting``)."""
        self.setting_flags.setdefault(command, []).append(_SettingFlag(_option(decls, attrs), transport, setting))

    def add_command(self, command: click.Command, group: str | None = None) -> None:
        """A command of the plugin's own: top level (``group`` None) or under ``servers``."""
        self.commands.setdefault(group, {})[str(command.name)] = command

    def quiet_logger(self, name: str) -> None:
        """A logger (a client library's) kept at CRITICAL unless the process runs with -vv."""
        self.quiet_loggers.append(name)

    # used by the core's commands ---------------------------------------------------
    def extend(self, command: click.Command, kind: str) -> None:
        """Add the plugin flags of ``kind`` (``servers add``, ``up``, ``worker``) to ``command``."""
        if getattr(command, "_fleetbus_extended", False):
            return
        params = ([f.param for f in self.server_flags.values()] if kind == "servers add"
                  else [f.param for f in self.setting_flags.get(kind, [])])
        have = {p.name for p in command.params}
        # Before the command's trailing --replace/--json-like flags is not worth the
        # bookkeeping: plugin flags come last, in the order plugins declared them.
        command.params.extend(p for p in params if p.name not in have)
        command._fleetbus_extended = True  # type: ignore[attr-defined]

    def settings_from_flags(self, command: str, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The transport settings the setting flags of ``command`` were given."""
        out: dict[str, dict[str, Any]] = {}
        for flag in self.setting_flags.get(command, []):
            value = values.get(str(flag.param.name))
            if value is not None:
                out.setdefault(flag.transport, {})[flag.setting] = value
        return out

    def draft(self, draft: ServerDraft, values: dict[str, Any], fail: Callable[[str], Any]) -> None:
        """Fill ``draft`` from the plugin flags given and run its transport's prepare steps."""
        for name, flag in self.server_flags.items():
            value = values.get(name)
            if value is None or value is False or value == ():
                continue
            if draft.transport not in flag.transports:
                shown = flag.param.opts[0]
                fail(f"{shown} is for {' and '.join(sorted(flag.transports))} servers")
            draft.flags[name] = value
            if flag.option is not None:
                draft.options[flag.option] = value
        for prepare in self.prepares.get(draft.transport, []):
            prepare(draft)


@functools.cache
def registry() -> CliRegistry:
    """The plugins' CLI additions, loaded once per process on first use."""
    from ..plugins import load_cli

    found = CliRegistry()
    load_cli(found)
    return found


def flag_values() -> dict[str, Any]:
    """The values of the plugin flags of the command being run."""
    return dict(click.get_current_context().meta.get(FLAGS_META, {}))


class PluginGroup(click.Group):
    """A command group that also offers the commands plugins add to it, and adds plugin
    flags to the commands that take them (marked with :func:`takes_plugin_flags`)."""

    def __init__(self, *args: Any, plugin_group: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plugin_group = plugin_group

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            return registry().commands.get(self.plugin_group, {}).get(cmd_name)
        kind = getattr(command, "_fleetbus_flags", None)
        if kind is not None:
            registry().extend(command, kind)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *registry().commands.get(self.plugin_group, {})})


def takes_plugin_flags(kind: str) -> Callable[[click.Command], click.Command]:
    """Mark a command to receive the plugin flags of ``kind`` when its group resolves it."""
    def mark(command: click.Command) -> click.Command:
        command._fleetbus_flags = kind  # type: ignore[attr-defined]
        return command
    return mark
