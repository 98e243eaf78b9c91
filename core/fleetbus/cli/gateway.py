"""``fleetbus gateway ...`` and ``fleetbus agent build``: the outbound-agent side."""

from __future__ import annotations

from pathlib import Path

import click

from .context import Globals, client_call, fail, pass_globals, run_async
from .render import emit_json, table


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
    from ..certs import (
        GatewayFiles,
        create_gateway_identity,
        fingerprint_pem,
        import_gateway_identity,
    )
    from ..vault import MasterKey

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


@click.group("agent")
def agent() -> None:
    """The fleetbus agent program."""


@agent.command("build")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="fleetbus-agent.pyz", show_default=True)
def build(output: str) -> None:
    """Build the agent as one zipapp file that runs with any Python 3.9+."""
    from fleetbus_agent.build import build_zipapp

    path = build_zipapp(Path(output))
    click.echo(f"{path}  ({path.stat().st_size // 1024} KiB)   run: python3 -I -S {path.name} connect --help")
