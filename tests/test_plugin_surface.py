"""The public plugin surface: `fleetbus.plugin` exports exactly the names plugin authors
use (pinned here, so changing it is a decision), each of them resolves, and the example
plugin, the model for third parties, imports nothing of fleetbus's insides. The plugin
boundary: no plugin imports NATS, and ``ctx.services`` is the narrow `Services` interface,
which the core's implementation provides in full."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import fleetbus.plugin
from fleetbus.coreservices import CoreServices
from fleetbus.services import Services
from fleetbus.testing import FakeServices

EXAMPLE = Path(__file__).parent / "example_plugin" / "fleetbus_example_echo"
PLUGINS = Path(__file__).parent.parent / "plugins"

PLUGIN_SURFACE = [
    "REACHING", "RUNNING", "AuthFailed", "Busy", "Cancelled", "Capabilities", "CliRegistry",
    "Credential", "ExecResult", "ExecSpec", "FileStat", "FleetbusError", "GatewayIdentity",
    "GatewayRecord", "InternalError", "InvalidRequest", "LinkClaim", "NotFound", "OutputSink",
    "PutSpec", "RemoteFile", "Server", "ServerDraft", "ServerFacts", "ServerOffline",
    "ServerOptions", "Services", "Session", "StreamName", "Timeout", "TooLarge",
    "Transport", "TransportContext", "TransportError", "TransportSettings", "Undo", "error_for_code",
    "fail", "hookimpl", "mapped_errors", "require_installed",
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


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (inside functions too), absolute names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_plugin_module_imports_nats() -> None:
    modules = sorted(PLUGINS.rglob("*.py"))
    assert len(modules) > 20, "the plugins folder moved"
    offenders = {str(path.relative_to(PLUGINS)): sorted(name for name in _imports(path)
                                                         if name == "nats" or name.startswith("nats."))
                 for path in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_plugin_reaches_past_the_services_interface() -> None:
    # The core's objects behind ctx.services (the registry, key store, buckets, the NATS
    # connection, raw metrics, the master key) are not part of the Services protocol.
    reaching = re.compile(r"services\.(registry|agent_keys|gateways|gateway_state|nc|metrics|master)\b")
    found = [f"{path.relative_to(PLUGINS)}:{n}" for path in sorted(PLUGINS.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if reaching.search(line)]
    assert found == []


def _members(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member)}


def _shape(signature: inspect.Signature) -> list[tuple[str, object]]:
    return [("**" if p.kind is p.VAR_KEYWORD else p.name, p.kind) for p in signature.parameters.values()]


def test_core_services_implement_the_protocol() -> None:
    wanted = _members(Services)
    have = {name: inspect.signature(getattr(CoreServices, name)) for name in wanted
            if callable(getattr(CoreServices, name, None))}
    assert sorted(have) == sorted(wanted)
    for name, signature in wanted.items():
        assert have[name] == signature, name
        assert inspect.iscoroutinefunction(getattr(CoreServices, name)) == \
            inspect.iscoroutinefunction(getattr(Services, name)), name
    fields = set(CoreServices.__dataclass_fields__)
    assert {"home", "worker_id"} <= fields
    # Every method documents what it does for a plugin author.
    assert all(inspect.getdoc(getattr(Services, name)) for name in wanted)


def test_fake_services_match_the_protocol_where_they_overlap() -> None:
    wanted = _members(Services)
    fake = _members(FakeServices)
    assert {"report_status", "count_auth_failure", "count_agent_connect"} <= set(fake)
    for name, signature in fake.items():
        # The name of a **kwargs parameter is no part of the interface.
        assert name in wanted and _shape(signature) == _shape(wanted[name]), name


def test_the_plugin_surface_does_not_load_nats() -> None:
    probe = "import sys, fleetbus.plugin; print(sorted(m for m in sys.modules if m.split('.')[0] == 'nats'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def _load_plugins_in_a_fresh_python(prelude: str) -> dict[str, Any]:
    code = (f"{prelude}\n"
            "import json, sys\n"
            "from fleetbus.plugins import load_plugins\n"
            "found = load_plugins()\n"
            "print(json.dumps({'transports': sorted(found.transports), 'errors': found.errors,\n"
            "                  'imported': sorted(m for m in ('paramiko', 'winrm', 'requests')\n"
            "                                     if m in sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_the_plugins_leaves_paramiko_and_pywinrm_for_the_first_session() -> None:
    # Every `fleetbus up` and worker loads the plugins; the client libraries of ssh and
    # wmi are ~0.1 s of a start that a fleet without those servers never needs.
    loaded = _load_plugins_in_a_fresh_python("")
    assert {"ssh", "wmi"} <= set(loaded["transports"]) and not loaded["errors"]
    assert loaded["imported"] == []


def test_a_missing_client_library_still_fails_the_plugin_at_load() -> None:
    # sys.modules[name] = None is how Python spells "not importable": find_spec and
    # import both see the library as missing.
    loaded = _load_plugins_in_a_fresh_python(
        "import sys; sys.modules['paramiko'] = None; sys.modules['winrm'] = None")
    assert "ssh" not in loaded["transports"] and "wmi" not in loaded["transports"]
    assert "local" in loaded["transports"]
    assert "No module named 'paramiko'" in loaded["errors"]["ssh"]
    assert "No module named 'winrm'" in loaded["errors"]["wmi"]
