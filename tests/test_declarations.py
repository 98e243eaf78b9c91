"""Transports declare their settings, server options, capabilities and CLI.

Settings are checked by the host when a worker starts (a typo stops it with one line
naming the setting); options by the admin service at `servers add` (a typo is
`invalid_request` naming the option, at registration); capabilities (a host needed, an
agent key issued) are read from the class, not inferred from the transport's name; a
transport's CLI flags reach the stored options and are refused for other transports.
"""

from __future__ import annotations

import subprocess

import click
import pytest
from click.testing import CliRunner
from fleetbus.cli.extend import CliRegistry, PluginGroup, ServerDraft, takes_plugin_flags
from fleetbus.errors import InvalidRequest
from fleetbus.plugins import load_plugins
from fleetbus.transport import Capabilities, ServerOptions, Transport, TransportSettings
from fleetbus_agents.outbound.gateway import GatewayTransport
from fleetbus_ssh.transport import SshTransport
from nats.aio.client import Client as NATS
from support.processes import Fleet

ADD = "fleetbus.v1.admin.servers.add"


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fleetbus: error: ")
    return lines[0]


# The models, without a process ---------------------------------------------------------


def test_default_models_accept_nothing() -> None:
    class Bare(Transport):
        name = "bare"

        async def open(self, server, credential):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    assert Bare.Settings is TransportSettings and Bare.Options is ServerOptions
    assert Bare.capabilities == Capabilities()
    with pytest.raises(InvalidRequest, match="bare transport setting 'anything': unknown"):
        Bare.load_settings({"anything": 1})
    with pytest.raises(InvalidRequest, match="bare server option 'anything': unknown"):
        Bare.check_options({"anything": 1})


def test_a_bad_value_names_the_setting_or_option() -> None:
    with pytest.raises(InvalidRequest, match=r"ssh transport setting 'keepalive_s': .*number"):
        SshTransport.load_settings({"keepalive_s": "soon"})
    with pytest.raises(InvalidRequest, match=r"'keepalive': unknown \(known: .*keepalive_s"):
        SshTransport.load_settings({"keepalive": 5})
    with pytest.raises(InvalidRequest, match="ssh server option 'max_sessions'"):
        SshTransport.check_options({"max_sessions": 1})
    assert SshTransport.load_settings({"keepalive_s": 5}).keepalive_s == 5.0
    settings = SshTransport.load_settings({})
    assert SshTransport.load_settings(settings) is settings  # validated once, passed through


def test_capabilities_are_declared_and_listed() -> None:
    assert GatewayTransport.capabilities.issues_agent_key
    assert SshTransport.capabilities == Capabilities(needs_host=True, default_port=22, supports_via=True)
    infos = {i.transport: i for i in load_plugins().infos}
    assert infos["ssh"].capabilities["supports_via"] is True
    assert infos["agent-outbound"].capabilities["issues_agent_key"] is True
    assert infos["local"].capabilities["needs_host"] is False


def test_a_flag_is_refused_for_another_transports_server() -> None:
    cli = CliRegistry()
    cli.add_server_flag("ssh", "--host-key")
    cli.add_server_flag("ssh", "--via", option="via")
    failures: list[str] = []

    def fail(message: str) -> None:
        failures.append(message)
        raise SystemExit(1)

    draft = ServerDraft(name="a", transport="ssh", host="h", port=None, credential=None, options={}, flags={})
    cli.draft(draft, {"via": "bastion", "host_key": None}, fail)
    assert draft.options == {"via": "bastion"} and draft.flags == {"via": "bastion"}
    other = ServerDraft(name="b", transport="local", host=None, port=None, credential=None, options={}, flags={})
    with pytest.raises(SystemExit):
        cli.draft(other, {"via": "bastion"}, fail)
    assert failures == ["--via is for ssh servers"]


def test_plugin_flags_and_commands_reach_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PluginGroup adds the registry's flags to a marked command and offers its commands."""
    from fleetbus.cli import extend

    cli = CliRegistry()
    cli.add_setting_flag("up", "demo", "listen", "--demo-listen", default="x:1")
    cli.add_command(click.Command("demo-cmd", callback=lambda: click.echo("demo ran")))
    monkeypatch.setattr(extend, "registry", lambda: cli)
    seen: dict[str, object] = {}

    @click.group(cls=PluginGroup)
    def root() -> None:
        pass

    @root.command("up")
    def up() -> None:
        seen.update(cli.settings_from_flags("up", extend.flag_values()))

    takes_plugin_flags("up")(up)
    runner = CliRunner()
    assert runner.invoke(root, ["up", "--demo-listen", "y:2"]).exit_code == 0
    assert seen == {"demo": {"listen": "y:2"}}
    assert runner.invoke(root, ["demo-cmd"]).output == "demo ran\n"


# Against a running fleet ---------------------------------------------------------------


async def test_an_option_typo_is_refused_at_registration(fleet_nc: NATS, bus) -> None:
    reply = await bus(fleet_nc, ADD, {"server": {"name": "typo1", "transport": "ssh", "host": "h",
                                                 "options": {"hostkey": "SHA256:x"}}})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
    assert "ssh server option 'hostkey': unknown" in reply["error"]["message"]
    assert "host_key" in reply["error"]["message"]  # the known ones are listed
    missing = await bus(fleet_nc, "fleetbus.v1.admin.servers.get", {"name": "typo1"})
    assert missing["error"]["code"] == "not_found"  # nothing was stored


async def test_a_bad_option_value_is_refused_at_registration(fleet_nc: NATS, bus) -> None:
    reply = await bus(fleet_nc, ADD, {"server": {"name": "win9", "transport": "wmi", "host": "h",
                                                 "options": {"scheme": "ftp"}}})
    assert reply["error"]["code"] == "invalid_request" and "'scheme'" in reply["error"]["message"], reply


async def test_a_declared_host_is_required(fleet_nc: NATS, bus) -> None:
    reply = await bus(fleet_nc, ADD, {"server": {"name": "nohost", "transport": "agent-inbound"}})
    assert reply["error"]["code"] == "invalid_request", reply
    assert reply["error"]["message"] == "a server of the agent-inbound transport needs a host (and a port unless it is 7444)"


async def test_a_key_is_issued_by_capability(fleet_nc: NATS, bus) -> None:
    keyed = await bus(fleet_nc, ADD, {"server": {"name": "out9", "transport": "agent-outbound"}})
    assert keyed["ok"] and keyed["key"], keyed
    plain = await bus(fleet_nc, ADD, {"server": {"name": "loc9", "transport": "local"}})
    assert plain["ok"] and "key" not in plain
    rotate = await bus(fleet_nc, "fleetbus.v1.admin.servers.rotate-key", {"name": "loc9"})
    assert rotate["error"]["code"] == "invalid_request" and "no agent key" in rotate["error"]["message"]


def test_a_transport_flag_reaches_the_stored_options(fleet: Fleet) -> None:
    add = fleet.cli("servers", "add", "jump9", "--transport", "ssh", "--host", "127.0.0.1",
                    "--via", "bastion9", "--host-key", " SHA256:abc ", "--json")
    assert add.returncode == 0, add.stderr
    shown = fleet.cli("servers", "show", "jump9", "--json")
    assert '"via": "bastion9"' in shown.stdout and '"host_key": "SHA256:abc"' in shown.stdout
    wrong = fleet.cli("servers", "add", "loc8", "--transport", "local", "--via", "bastion9")
    assert one_line_error(wrong) == "fleetbus: error: --via is for ssh servers"


def test_a_settings_typo_stops_the_worker_in_one_line(fleet: Fleet) -> None:
    proc = fleet.cli("worker", "--transports", "local", "--transport-setting", "local.term_grace=1", timeout=60)
    line = one_line_error(proc)
    assert "local transport setting 'term_grace': unknown" in line and "term_grace_s" in line
    proc = fleet.cli("worker", "--transports", "local", "--transport-setting", "local.term_grace_s=-1",
                     timeout=60)
    assert "local transport setting 'term_grace_s'" in one_line_error(proc)


def test_an_inbound_key_issued_by_the_cli_is_in_the_json_reply(fleet: Fleet) -> None:
    import json

    add = fleet.cli("servers", "add", "db8", "--transport", "agent-inbound", "--host", "127.0.0.1",
                    "--trust-on-first-use", "--json", input=b"")
    assert add.returncode == 0, add.stderr
    reply = json.loads(add.stdout)
    assert reply["server"]["credential"] == "agent-db8" and len(reply["key"]) >= 40
    assert reply["key"] not in fleet.cli("credentials", "list", "--json").stdout
    # A key given by the operator needs a pin: without one, nothing is registered.
    nopin = fleet.cli("servers", "add", "db7", "--transport", "agent-inbound", "--host", "127.0.0.1",
                      input=b"operator-key")
    assert "pin the agent's certificate" in one_line_error(nopin)


def test_fleetbus_run_loads_no_plugin_cli() -> None:
    """The plugins' CLI is loaded only for commands that show it: `run` stays cheap."""
    import sys

    probe = (
        "import sys\n"
        "from fleetbus.cli.main import cli\n"
        "for args in (['run', '--help'], ['servers', 'add', '--help']):\n"
        "    try:\n"
        "        cli(args, prog_name='fleetbus')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    loaded = sorted(m for m in sys.modules if m.endswith('.cli') and m.startswith('fleetbus_'))\n"
        "    print(' '.join(args), loaded, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    run_line, add_line = proc.stderr.strip().splitlines()
    assert run_line == "run --help []"
    assert "'fleetbus_ssh.cli'" in add_line and "'fleetbus_agents.inbound.cli'" in add_line
