"""Finding and loading plugins through pluggy and the ``fleetbus.plugins`` entry points.

A plugin that fails to import or returns nonsense is reported and skipped: one broken
third-party package must not take the built-in transports down with it.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import InvalidRequest
from .transport import Transport

log = logging.getLogger("fleetbus.plugins")


@dataclass(frozen=True)
class PluginInfo:
    plugin: str
    distribution: str | None
    version: str | None
    transport: str
    transport_version: str
    description: str


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


def load_plugins(extra: dict[str, object] | None = None) -> PluginSet:
    """Load every plugin installed under the entry-point group, plus ``extra`` by name."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    found = PluginSet()
    dists: dict[str, tuple[str, str]] = {}
    for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if manager.has_plugin(ep.name):
            continue
        try:
            manager.register(ep.load(), name=ep.name)
        except Exception as exc:
            found.errors[ep.name] = f"cannot load: {type(exc).__name__}: {exc}"[:300]
            log.error("plugin %s: %s", ep.name, found.errors[ep.name])
            continue
        if ep.dist is not None:
            dists[ep.name] = (ep.dist.metadata["name"], ep.dist.version)
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
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
                transport_version=cls.version, description=cls.description))
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
    return None
