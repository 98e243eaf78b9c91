"""``fleetbus agent build``: the fleetbus agent program."""

from __future__ import annotations

from pathlib import Path

import click


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
