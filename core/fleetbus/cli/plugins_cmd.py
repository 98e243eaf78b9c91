"""``fleetbus plugins list``: what this machine has installed."""

from __future__ import annotations

import click

from .context import run_async
from .render import emit_json, table


@click.group("plugins")
def plugins() -> None:
    """Installed transport plugins."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """List the transports the installed plugins provide."""

    from ..plugins import load_plugins  # builds pydantic models: only when asked

    async def load() -> tuple[list[dict[str, object]], dict[str, str]]:
        loaded = load_plugins()
        return [dict(info.__dict__) for info in loaded.infos], loaded.errors

    found, errors = run_async(load)
    if as_json:
        emit_json({"plugins": found, "errors": errors})
        return
    table(["transport", "version", "plugin", "package", "description"],
          [[i["transport"], i["transport_version"], i["plugin"],
            f"{i['distribution']} {i['version']}" if i["distribution"] else "", i["description"]]
           for i in found])
    for plugin, problem in errors.items():
        click.echo(f"fleetbus: warning: plugin {plugin}: {problem}", err=True)
