"""``fleetbus admin``: operations on the deployment itself rather than on servers."""

from __future__ import annotations

import json

import click

from .context import Globals, pass_globals, run_async


@click.group("admin")
def admin() -> None:
    """Operate on the deployment: its JetStream state."""


@admin.command("migrate")
@click.option("--replicas", type=click.IntRange(1, 5), envvar="FLEETBUS_REPLICAS", required=True,
              help="Replicas every fleetbus stream and bucket should have (env FLEETBUS_REPLICAS).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="How long to wait for new replicas to catch up (0: do not wait).")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def migrate(g: Globals, replicas: int, wait_s: float, dry_run: bool, as_json: bool) -> None:
    """Move every fleetbus stream and KV bucket to --replicas copies (a JetStream stream
    update, in place on a running cluster), printing what changed."""
    from ..connection import connect
    from ..replication import migrate as run_migration
    from ..subjects import Names

    async def main() -> list[dict[str, object]]:
        settings = g.settings()
        nc = await connect(settings, name="fleetbus-admin-migrate", reconnect_forever=False)
        try:
            results = await run_migration(nc, Names(settings.prefix), replicas, wait_s=wait_s,
                                          dry_run=dry_run)
        finally:
            await nc.close()
        return [r.as_dict() for r in results]

    rows = run_async(main)
    if as_json:
        click.echo(json.dumps({"replicas": replicas, "dry_run": dry_run, "streams": rows}, indent=2))
        return
    for row in rows:
        click.echo(f"{row['stream']:<32} {_outcome(row, replicas, dry_run)}")


def _outcome(row: dict[str, object], replicas: int, dry_run: bool) -> str:
    found = row["found"]
    if found is None:
        return "not created yet (made with the asked replicas when a process starts)"
    if found == replicas:
        return f"R{found}, unchanged"
    if dry_run:
        return f"R{found} -> R{replicas} (dry run: not changed)"
    caught = {True: ", replicas current", False: ", replicas still catching up", None: ""}[row["current"]]
    return f"R{found} -> R{replicas}{caught}"
