"""Finding and loading plugins through pluggy and the ``fleetbus.plugins`` entry points.

A plugin that fails to import or returns nonsense is reported and skipped: one broken
third-party package must not take the built-in transports down with it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import InvalidRequest
from .transport import Capabilities, ServerOptions, Transport, TransportSettings

if TYPE_CHECKING:
    from .cli.extend import CliRegistry

log = logging.getLogger("fleetbus.plugins")


@dataclass(frozen=True)
class PluginInfo:
    plugin: str
    distribution: str | None
    version: str | None
    transport: str
    transport_version: str
    description: str
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginSet:
    """The transports that the installed plugins provide, by name."""

    transports: dict[str, type[Transport]] = field(default_factory=dict)
    infos: list[PluginInfo] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def select(self, names: list[str] | None) -> dict[str, type[Transport]]:
        if names is None:
            return dict(self.transports)
        unknown = [n for n in names if n not in self.transports]
        if unknown:
            have = ", ".join(sorted(self.transports)) or "none"
            raise InvalidRequest(f"unknown transport {', '.join(unknown)}; installed: {have}")
        return {n: self.transports[n] for n in names}


def _manager(errors: dict[str, str], extra: dict[str, object] | None = None, level: int = logging.ERROR,
             ) -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    """Every plugin module of the entry-point group (and ``extra``) registered; the ones
    that fail to import are in ``errors``."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    dists: dict[str, tuple[str, str]] = {}
    for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if manager.has_plugin(ep.name):
            continue
        try:
            manager.register(ep.load(), name=ep.name)
        except Exception as exc:
            errors[ep.name] = f"cannot load: {type(exc).__name__}: {exc}"[:300]
            log.log(level, "plugin %s: %s", ep.name, errors[ep.name])
            continue
        if ep.dist is not None:
            dists[ep.name] = (ep.dist.metadata["name"], ep.dist.version)
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
    return manager, dists


def load_cli(cli: CliRegistry, extra: dict[str, object] | None = None) -> dict[str, str]:
    """Let every plugin add its CLI to ``cli``; returns the plugins that failed, by name.

    A plugin whose hook raises is skipped (logged): the rest of the CLI still works. One
    that cannot be imported is only logged at debug level here: every command would
    repeat it, and ``fleetbus plugins list`` reports it.
    """
    errors: dict[str, str] = {}
    manager, _ = _manager(errors, extra, logging.DEBUG)
    for impl in manager.hook.fleetbus_cli.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as exc:
            errors[impl.plugin_name] = f"fleetbus_cli failed: {type(exc).__name__}: {exc}"[:300]
            log.error("plugin %s: %s", impl.plugin_name, errors[impl.plugin_name])
    return errors


def load_plugins(extra: dict[str, object] | None = None) -> PluginSet:
    """Load every plugin installed under the entry-point group, plus ``extra`` by name."""
    found = PluginSet()
    manager, dists = _manager(found.errors, extra)
    for impl in manager.hook.fleetbus_transports.get_hookimpls():
        try:
            classes = list(impl.function() or [])
        except Exception as exc:
            found.errors[impl.plugin_name] = f"fleetbus_transports failed: {type(exc).__name__}: {exc}"[:300]
            log.error("plugin %s: %s", impl.plugin_name, found.errors[impl.plugin_name])
            continue
        for cls in classes:
            problem = _check(cls, found.transports)
            if problem:
                found.errors[impl.plugin_name] = problem
                log.error("plugin %s: %s", impl.plugin_name, problem)
                continue
            found.transports[cls.name] = cls
            dist = dists.get(impl.plugin_name)
            found.infos.append(PluginInfo(
                plugin=impl.plugin_name, distribution=dist[0] if dist else None,
                version=dist[1] if dist else None, transport=cls.name,
                transport_version=cls.version, description=cls.description,
                capabilities=dataclasses.asdict(cls.capabilities)))
    found.infos.sort(key=lambda i: i.transport)
    return found


def _check(cls: object, have: dict[str, type[Transport]]) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        return f"returned {cls!r}, not a fleetbus.transport.Transport subclass"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"{cls.__name__} has no transport name"
    if name in have:
        return f"transport {name!r} is provided twice; uninstall one of the plugins"
    for attr, base in (("Settings", TransportSettings), ("Options", ServerOptions)):
        model = getattr(cls, attr, None)
        if not (isinstance(model, type) and issubclass(model, base)):
            return f"{cls.__name__}.{attr} is not a fleetbus.transport.{base.__name__} subclass"
    if not isinstance(getattr(cls, "capabilities", None), Capabilities):
        return f"{cls.__name__}.capabilities is not a fleetbus.transport.Capabilities"
    return None
