"""``fleetbus servers ...``: the registry."""

from __future__ import annotations

from typing import Any

import click

from ..client import Client
from .context import Globals, client_call, fail, parse_options, parse_pairs, pass_globals
from .extend import PluginGroup, ServerDraft, Undo, flag_values, registry, takes_plugin_flags
from .render import emit_json, key_values, shown, table


@click.group("servers", cls=PluginGroup, plugin_group="servers")
def servers() -> None:
    """Register, list, show and remove servers."""


@servers.command("add")
@click.argument("name")
@click.option("--transport", "-t", required=True, help="How to reach it: a transport `fleetbus plugins list` shows.")
@click.option("--host", help="Host name or address.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port, when not the transport's default.")
@click.option("--credential", help="Name of the credential to connect with.")
@click.option("--role", "roles", multiple=True, help="A role (repeatable).")
@click.option("--environment", "--env", "environment", help="Environment, e.g. production.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label (repeatable).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A transport option (repeatable); checked against the transport's options at registration.")
@click.option("--max-concurrency", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Commands run at once on this server, per worker.")
@click.option("--description", help="Free text.")
@click.option("--replace", is_flag=True, help="Overwrite an existing registration.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_globals
def add(g: Globals, name: str, transport: str, host: str | None, port: int | None,
        credential: str | None, roles: tuple[str, ...], environment: str | None,
        labels: tuple[str, ...], options: tuple[str, ...], max_concurrency: int,
        description: str | None, replace: bool, as_json: bool) -> None:
    """Register the server NAME.

    Installed transports add their own flags below (e.g. a host key to pin); each is
    refused for servers of other transports.
    """
    draft = ServerDraft(name=name, transport=transport, host=host, port=port, credential=credential,
                        options=parse_options(options), flags={}, replace=replace)
    registry().draft(draft, flag_values(), fail)
    body: dict[str, Any] = {
        "name": name, "transport": transport, "host": draft.host, "port": draft.port,
        "credential": draft.credential, "roles": list(roles), "environment": environment,
        "labels": parse_pairs(labels, "--label"), "options": draft.options,
        "max_concurrency": max_concurrency, "description": description,
    }

    async def go(c: Client) -> dict[str, Any]:
        undo: list[Undo] = []
        try:
            for step in draft.before:
                done = await step(c)
                if done is not None:
                    undo.append(done)
            body["credential"] = draft.credential  # a step may have made one
            return await c.add_server(body, replace=replace)
        except BaseException:
            for step in reversed(undo):
                await step(c)
            raise

    reply = client_call(g, go)
    if as_json:
        emit_json({**reply, **draft.json_extra})
        return
    for warning in reply.get("warnings", []):
        click.echo(f"fleetbus: warning: {shown(warning)}", err=True)
    click.echo(f"registered {name} ({transport})")
    for after in draft.after:
        after(reply)


takes_plugin_flags("servers add")(add)


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
