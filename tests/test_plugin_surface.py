"""The public plugin surface: `fleetbus.plugin` exports exactly the names plugin authors
use (pinned here, so changing it is a decision), each of them resolves, and the example
plugin, the model for third parties, imports nothing of fleetbus's insides."""

from __future__ import annotations

import ast
from pathlib import Path

import fleetbus.plugin

EXAMPLE = Path(__file__).parent / "example_plugin" / "fleetbus_example_echo"

PLUGIN_SURFACE = [
    "REACHING", "RUNNING", "AuthFailed", "Busy", "Cancelled", "Capabilities", "CliRegistry",
    "Credential", "ExecResult", "ExecSpec", "FileStat", "FleetbusError", "InternalError",
    "InvalidRequest", "NotFound", "OutputSink", "PutSpec", "RemoteFile", "Server", "ServerDraft",
    "ServerFacts", "ServerOffline", "ServerOptions", "Session", "StreamName", "Timeout", "TooLarge",
    "Transport", "TransportContext", "TransportError", "TransportSettings", "Undo", "error_for_code",
    "fail", "hookimpl", "mapped_errors",
]


def test_the_plugin_surface_is_exactly_the_pinned_list() -> None:
    assert sorted(fleetbus.plugin.__all__) == sorted(PLUGIN_SURFACE)
    assert len(set(fleetbus.plugin.__all__)) == len(fleetbus.plugin.__all__)
    for name in PLUGIN_SURFACE:
        assert getattr(fleetbus.plugin, name) is not None, name
    # The names are the very objects the host uses, not copies a plugin could drift from.
    from fleetbus.hookspecs import hookimpl
    from fleetbus.transport import Transport
    assert fleetbus.plugin.Transport is Transport and fleetbus.plugin.hookimpl is hookimpl


def test_the_example_plugin_uses_only_the_public_surface() -> None:
    imported: set[str] = set()
    for path in EXAMPLE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] in ("fleetbus", "fleetbus_agent")}
    assert ours == {"fleetbus.plugin"}, ours
