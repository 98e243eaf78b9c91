"""The ``agent-outbound`` transport's additions to the ``fleetbus`` command.

- ``up``/``worker --gateway-listen HOST:PORT``: the ``listen`` setting;
- ``servers add NAME --transport agent-outbound``: prints the issued key and the
  ``fleetbus-agent connect`` command; ``servers rotate-key`` and ``servers revoke-key``;
- ``fleetbus gateway cert|info``: the gateway's certificate and the running gateways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from fleetbus.cli.context import Globals, client_call, fail, pass_globals, run_async
from fleetbus.cli.extend import CliRegistry, ServerDraft
from fleetbus.cli.render import emit_json, table

NAME = "agent-outbound"


def add_cli(cli: CliRegistry) -> None:
    """Register everything above with the CLI (the plugin's ``fleetbus_cli`` hook)."""
    cli.add_setting_flag("up", NAME, "listen", "--gateway-listen", default="0.0.0.0:7443", show_default=True,
                         metavar="HOST:PORT", help="Where the agent-outbound gateway listens (port 0: any free port).")
    cli.add_setting_flag("worker", NAME, "listen", "--gateway-listen", default="0.0.0.0:7443",
                         show_default=True, metavar="HOST:PORT",
                         help="Where the agent-outbound gateway listens, when this worker runs it.")
    cli.on_server_add(NAME, _prepare)
    cli.add_command(rotate_key, group="servers")
    cli.add_command(revoke_key, group="servers")
    cli.add_command(gateway)


def _prepare(draft: ServerDraft) -> None:
    def show(reply: dict[str, Any]) -> None:
        if "key" in reply:
            _show_key(draft.name, reply["key"], reply.get("gateways") or [])

    draft.after.append(show)


def connect_options(gateways: list[dict[str, Any]]) -> str:
    """``--gateway`` for every live gateway and the pin that accepts them all: their
    shared CA's fingerprint, else each one's own certificate's."""
    if not gateways:
        return "--gateway GATEWAY-HOST:7443 --fingerprint sha256:..."
    cas = {gw.get("ca_fingerprint") for gw in gateways}
    pins = sorted(cas) if len(cas) == 1 and None not in cas else sorted(
        {str(gw.get("fingerprint")) for gw in gateways})
    return " ".join([*(f"--gateway {gw.get('address')}" for gw in gateways),
                     *(f"--fingerprint {pin}" for pin in pins)])


def _show_key(name: str, key: str, gateways: list[dict[str, Any]]) -> None:
    """Print an agent key once, with the command that starts the agent with it."""
    click.echo("")
    click.echo(f"secret key for {name} (shown only now; fleetbus keeps just a hash):")
    click.echo(f"  {key}")
    click.echo("")
    click.echo(f"on {name}, save it readable only by the agent's user, then start the agent:")
    click.echo("  install -d -m 700 /etc/fleetbus-agent && "
               "(umask 077; cat > /etc/fleetbus-agent/key)   # paste the key, then Ctrl-D")
    click.echo(f"  fleetbus-agent connect {connect_options(gateways)} "
               "--key-file /etc/fleetbus-agent/key")
    if not gateways:
        click.echo("(no gateway is running yet: `fleetbus gateway info` shows its address and fingerprint)")


@click.command("rotate-key")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (includes the key).")
@pass_globals
def rotate_key(g: Globals, name: str, as_json: bool) -> None:
    """Give agent-outbound server NAME a new secret key; the old one is dropped at once."""
    reply = client_call(g, lambda c: c.rotate_key(name))
    if as_json:
        emit_json(reply)
        return
    click.echo(f"rotated the key of {name}; its agent is disconnected until it uses the new key")
    _show_key(name, reply["key"], reply.get("gateways") or [])


@click.command("revoke-key")
@click.argument("name")
@pass_globals
def revoke_key(g: Globals, name: str) -> None:
    """Revoke agent-outbound server NAME's key; its agent is disconnected at once."""
    client_call(g, lambda c: c.revoke_key(name))
    click.echo(f"revoked the key of {name}; rotate-key issues a new one")



@click.group("gateway")
def gateway() -> None:
    """The TLS gateway outbound agents dial into."""


@gateway.command("cert")
@click.option("--host", "hosts", multiple=True, help="Name or address agents use to reach the gateway (repeatable).")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False), help="Use this certificate (PEM) instead.")
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False), help="The private key (PEM) of --cert.")
@click.option("--replace", is_flag=True, help="Replace an existing certificate.")
@pass_globals
def cert(g: Globals, hosts: tuple[str, ...], cert_file: str | None, key_file: str | None, replace: bool) -> None:
    """Create a CA and gateway certificate, or install your own with --cert and --key.

    Private keys are stored encrypted under the master key. Restart the gateway
    afterwards; agents pinning the old fingerprint must be given the new one.
    """
    from fleetbus.certs import (
        GatewayFiles,
        create_gateway_identity,
        fingerprint_pem,
        import_gateway_identity,
    )
    from fleetbus.vault import MasterKey

    home = g.home_dir()

    async def go() -> GatewayFiles:
        master = MasterKey.load(home, create=True)
        if bool(cert_file) != bool(key_file):
            fail("give both --cert and --key, or neither")
        if cert_file and key_file:
            return import_gateway_identity(home, master, Path(cert_file), Path(key_file))
        files = GatewayFiles.of(home)
        if files.exists() and not replace:
            fail(f"a gateway certificate exists in {files.folder}; pass --replace to make a new one")
        return create_gateway_identity(home, master, list(hosts) or None, replace=True)

    files = run_async(go)
    click.echo(f"certificate  {files.cert}")
    if files.ca_cert.exists():
        click.echo(f"CA           {files.ca_cert}   (agents: --ca with a copy of this file)")
    click.echo(f"fingerprint  {fingerprint_pem(files.cert.read_bytes())}   (agents: --fingerprint)")


@gateway.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def info(g: Globals, as_json: bool) -> None:
    """Running gateways: address, certificate fingerprint, connected agents."""
    found = client_call(g, lambda c: c.list_gateways())
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no gateway is running (fleetbus up, or fleetbus worker --transports agent-outbound)")
        return
    table(["address", "fingerprint", "ca fingerprint", "agents", "worker", "updated"],
          [[x.get("address"), x.get("fingerprint"), x.get("ca_fingerprint"), x.get("agents"),
            x.get("worker"), x.get("updated")] for x in found])
