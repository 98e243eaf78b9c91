"""The ``ssh`` transport's additions to the ``fleetbus`` command.

- ``servers add --host-key KEY`` (``options.host_key``) and ``--via SERVER``
  (``options.via``, a jump host);
- ``servers trust NAME``: show the host key a server offers and pin it;
- paramiko's own error logging kept quiet unless ``-vv`` (the transport reports those
  failures itself, once, as command errors).
"""

from __future__ import annotations

import sys
from typing import Any

import click
from fleetbus.cli.context import Globals, client_call, fail, pass_globals
from fleetbus.cli.extend import CliRegistry, ServerDraft
from fleetbus.cli.render import shown
from fleetbus.client import Client
from fleetbus.errors import AuthFailed

NAME = "ssh"


def add_cli(cli: CliRegistry) -> None:
    """Register everything above with the CLI (the plugin's ``fleetbus_cli`` hook)."""
    cli.add_server_flag(NAME, "--host-key",
                        help="ssh: the server's host key to pin (\"ssh-ed25519 AAAA...\" or SHA256:...).")
    cli.add_server_flag(NAME, "--via", option="via",
                        help="ssh: reach it through this registered ssh server (a jump host).")
    cli.on_server_add(NAME, _prepare)
    cli.add_command(trust, group="servers")
    # paramiko logs every refused or dropped connection at ERROR with a traceback.
    cli.quiet_logger("paramiko")
    cli.quiet_logger("fleetbus.transport.ssh.paramiko")


def _prepare(draft: ServerDraft) -> None:
    if not draft.host:
        fail("an ssh server needs --host")
    host_key = draft.flags.get("host_key")
    if host_key:
        draft.options["host_key"] = str(host_key).strip()


@click.command("trust")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Pin without asking.")
@click.option("--replace", is_flag=True, help="Replace a pinned host key that no longer matches.")
@pass_globals
def trust(g: Globals, name: str, yes: bool, replace: bool) -> None:
    """Show the host key an ssh server offers and pin it.

    Compare the fingerprint with the one the server's console shows
    (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) before you confirm.
    """
    async def offered(c: Client) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
        server = (await c.get_server(name))["server"]
        if server["transport"] != NAME:
            fail(f"{name} uses the {server['transport']} transport; trust is for ssh servers")
        try:
            await c.ping(name)
        except AuthFailed as exc:
            if "host_key" in exc.details:
                return server, exc.details, exc.message
            raise
        return server, None, ""

    server, details, message = client_call(g, offered)
    if details is not None and details.get("server", name) != name:
        # The key in question is a jump host's: never pin it onto this server.
        other = details["server"]
        fail(f"the host key of {other} (the jump host of {name}) is the problem: {message}; "
             f"run `fleetbus servers trust {other}`")
    if details is None:
        click.echo(f"{name}'s host key is already trusted ({server['options'].get('host_key', '')[:60]})")
        return
    mismatch = bool(server["options"].get("host_key"))
    # Both come from the ssh server, which anyone may run.
    click.echo(f"{name} offers the host key {shown(details.get('host_key_fingerprint', '?'))}")
    click.echo(f"  {shown(details['host_key'])}")
    if mismatch:
        click.echo(f"fleetbus: warning: {shown(message)}", err=True)
        if not replace:
            fail(f"{name} already has a different pinned host key; pass --replace if you know why it changed")
    if not yes:
        if not sys.stdin.isatty():
            fail("pass --yes to pin without a prompt")
        if not click.confirm("Pin this host key?", default=False, err=True):
            fail("not pinned")
    options = dict(server["options"], host_key=details["host_key"])
    body = {k: v for k, v in server.items() if k != "created"} | {"options": options}
    client_call(g, lambda c: c.add_server(body, replace=True))
    click.echo(f"pinned {details.get('host_key_fingerprint', 'the host key')} for {name}")
