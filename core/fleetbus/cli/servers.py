"""``fleetbus servers ...``: the registry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..client import Client
from .context import Globals, client_call, fail, parse_options, parse_pairs, pass_globals, read_secret
from .render import emit_json, key_values, shown, table

INBOUND = "agent-inbound"


@click.group("servers")
def servers() -> None:
    """Register, list, show and remove servers."""


@servers.command("add")
@click.argument("name")
@click.option("--transport", "-t", required=True, help="How to reach it: local, ssh, wmi, agent-inbound, agent-outbound, ...")
@click.option("--host", help="Host name or address.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port, when not the transport's default.")
@click.option("--credential", help="Name of the credential to connect with.")
@click.option("--role", "roles", multiple=True, help="A role (repeatable).")
@click.option("--environment", "--env", "environment", help="Environment, e.g. production.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label (repeatable).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="A transport option (repeatable).")
@click.option("--max-concurrency", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Commands run at once on this server, per worker.")
@click.option("--description", help="Free text.")
@click.option("--host-key", help="ssh: the server's host key to pin (\"ssh-ed25519 AAAA...\" or SHA256:...).")
@click.option("--via", help="ssh: reach it through this registered ssh server (a jump host).")
@click.option("--scheme", type=click.Choice(["https", "http"]), help="wmi: WinRM over https (default) or http.")
@click.option("--auth", "winrm_auth", type=click.Choice(["ntlm", "kerberos", "basic", "credssp"]),
              help="wmi: WinRM authentication (default ntlm).")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
              help="wmi: CA bundle to verify the server's certificate.")
@click.option("--insecure-skip-verify", is_flag=True, help="wmi: do not verify the certificate (not advised).")
@click.option("--fingerprint", help="agent-inbound: the agent's certificate fingerprint (sha256:...).")
@click.option("--trust-on-first-use", is_flag=True, help="agent-inbound: pin the certificate seen first.")
@click.option("--key-file", type=click.Path(dir_okay=False), help="agent-inbound: file holding the server's key "
              "(else standard input, else a prompt).")
@click.option("--replace", is_flag=True, help="Overwrite an existing registration.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_globals
def add(g: Globals, name: str, transport: str, host: str | None, port: int | None,
        credential: str | None, roles: tuple[str, ...], environment: str | None,
        labels: tuple[str, ...], options: tuple[str, ...], max_concurrency: int,
        description: str | None, host_key: str | None, via: str | None, scheme: str | None,
        winrm_auth: str | None, ca_file: str | None, insecure_skip_verify: bool,
        fingerprint: str | None, trust_on_first_use: bool,
        key_file: str | None, replace: bool, as_json: bool) -> None:
    """Register the server NAME."""
    opts = parse_options(options)
    agent_key: bytes | None = None
    if transport == INBOUND:
        if not host:
            fail("an agent-inbound server needs --host (and --port unless it is 7444)")
        if not fingerprint and not trust_on_first_use:
            fail("pin the agent's certificate with --fingerprint sha256:... "
                 "(printed by `fleetbus-agent listen`), or pass --trust-on-first-use")
        if fingerprint:
            opts["fingerprint"] = fingerprint
        opts["trust_on_first_use"] = trust_on_first_use
        if credential is None:
            agent_key = read_secret(key_file, "Agent key")
            credential = f"agent-{name}"
    elif fingerprint or trust_on_first_use or key_file:
        fail("--fingerprint, --trust-on-first-use and --key-file are for agent-inbound servers")
    if transport == "ssh":
        if not host:
            fail("an ssh server needs --host")
        if host_key:
            opts["host_key"] = host_key.strip()
        if via:
            opts["via"] = via
    elif host_key or via:
        fail("--host-key and --via are for ssh servers")
    if transport == "wmi":
        if not host:
            fail("a wmi server needs --host")
        if ca_file and insecure_skip_verify:
            fail("give --ca or --insecure-skip-verify, not both")
        for key, value in (("scheme", scheme), ("auth", winrm_auth),
                           ("ca", str(Path(ca_file).resolve()) if ca_file else None)):
            if value:
                opts[key] = value
        if insecure_skip_verify:
            opts["insecure_skip_verify"] = True
    elif scheme or winrm_auth or ca_file or insecure_skip_verify:
        fail("--scheme, --auth, --ca and --insecure-skip-verify are for wmi servers")
    body: dict[str, Any] = {
        "name": name, "transport": transport, "host": host, "port": port,
        "credential": credential, "roles": list(roles), "environment": environment,
        "labels": parse_pairs(labels, "--label"), "options": opts,
        "max_concurrency": max_concurrency, "description": description,
    }

    async def go(c: Client) -> dict[str, Any]:
        if agent_key is None:
            return await c.add_server(body, replace=replace)
        # The key goes into the vault (sealed), the server refers to it by name.
        await c.add_credential(str(credential), "token", agent_key,
                               description=f"agent key of {name}", replace=replace)
        try:
            return await c.add_server(body, replace=replace)
        except Exception:
            await c.remove_credential(str(credential), force=True)
            raise

    reply = client_call(g, go)
    if as_json:
        emit_json(reply)
        return
    for warning in reply.get("warnings", []):
        click.echo(f"fleetbus: warning: {shown(warning)}", err=True)
    click.echo(f"registered {name} ({transport})")
    if "key" in reply:
        _show_key(name, reply["key"], reply.get("gateways") or [])


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


@servers.command("rotate-key")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (includes the key).")
@pass_globals
def rotate_key(g: Globals, name: str, as_json: bool) -> None:
    """Give outbound-agent server NAME a new secret key; the old one is dropped at once."""
    reply = client_call(g, lambda c: c.rotate_key(name))
    if as_json:
        emit_json(reply)
        return
    click.echo(f"rotated the key of {name}; its agent is disconnected until it uses the new key")
    _show_key(name, reply["key"], reply.get("gateways") or [])


@servers.command("revoke-key")
@click.argument("name")
@pass_globals
def revoke_key(g: Globals, name: str) -> None:
    """Revoke outbound-agent server NAME's key; its agent is disconnected at once."""
    client_call(g, lambda c: c.revoke_key(name))
    click.echo(f"revoked the key of {name}; rotate-key issues a new one")


def _status_text(status: dict[str, Any] | None) -> str:
    if not status:
        return "unknown"
    return str(status.get("state", "unknown"))


@servers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def list_(g: Globals, as_json: bool) -> None:
    """List registered servers and their status."""
    found = client_call(g, lambda c: c.list_servers())
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no servers registered; add one with: fleetbus servers add NAME --transport ...")
        return
    table(
        ["name", "transport", "address", "status", "agent", "remote", "environment", "roles", "last seen"],
        [
            [
                s["name"], s["transport"],
                (s.get("host") or "") + (f":{s['port']}" if s.get("port") else ""),
                _status_text(s.get("status")), (s.get("status") or {}).get("agent_version"),
                (s.get("status") or {}).get("remote_address"),
                s.get("environment"), ",".join(s.get("roles", [])),
                (s.get("status") or {}).get("last_seen"),
            ]
            for s in found
        ],
    )


@servers.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def show(g: Globals, name: str, as_json: bool) -> None:
    """Show one server's registration and status."""
    reply = client_call(g, lambda c: c.get_server(name))
    if as_json:
        emit_json({"server": reply["server"], "status": reply["status"]})
        return
    server, status = reply["server"], reply.get("status") or {}
    rows = [(k, server.get(k)) for k in ("name", "transport", "host", "port", "credential",
                                         "environment", "description", "max_concurrency", "created")]
    rows += [("roles", ", ".join(server.get("roles", []))),
             ("labels", ", ".join(f"{k}={v}" for k, v in server.get("labels", {}).items())),
             ("options", ", ".join(f"{k}={v}" for k, v in server.get("options", {}).items())),
             ("status", _status_text(status)), ("served by", status.get("served_by")),
             ("agent", status.get("agent_version")), ("remote", status.get("remote_address")),
             ("last seen", status.get("last_seen"))]
    key_values(rows)


@servers.command("remove")
@click.argument("name")
@pass_globals
def remove(g: Globals, name: str) -> None:
    """Remove the server NAME from the registry."""
    client_call(g, lambda c: c.remove_server(name))
    click.echo(f"removed {name}")


@servers.command("trust")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Pin without asking.")
@click.option("--replace", is_flag=True, help="Replace a pinned host key that no longer matches.")
@pass_globals
def trust(g: Globals, name: str, yes: bool, replace: bool) -> None:
    """Show the host key an ssh server offers and pin it.

    Compare the fingerprint with the one the server's console shows
    (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) before you confirm.
    """
    from ..errors import AuthFailed

    async def offered(c: Client) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
        server = (await c.get_server(name))["server"]
        if server["transport"] != "ssh":
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
