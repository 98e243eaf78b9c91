"""``fleetbus users ...``: NATS identities with scoped permissions (docs/security.md).

``add`` and ``rotate`` make the nkey here and send only its public key: the seed is
written once, 0600, to ``--out`` (or printed once when there is none) and never crosses
the bus, so neither fleetbus nor its audit trail ever holds it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from .context import Globals, client_call, fail, pass_globals
from .nkeyfiles import new_user_key, write_seed
from .render import emit_json, table

#: Users changes wait for nats-server to have them (admin.USERS_APPLY_WAIT_S) and more.
USERS_TIMEOUT_S = 30.0


def _hand_over(seed: bytes, out: str | None, name: str, as_json: bool) -> None:
    if out:
        click.echo(f"nkey seed for {name} written to {out} (mode 0600); it is not kept anywhere else",
                   err=as_json)
        # The path, never the seed: the command line can be copied into a script.
        click.echo(f"use it with: FLEETBUS_NATS_NKEY={shlex.quote(out)} fleetbus ...", err=as_json)
        return
    # Shown this once: fleetbus keeps only the public key.
    click.echo(f"nkey seed for {name} (shown once, keep it secret): {seed.decode()}", err=True)


def _issue_key(g: Globals, name: str, out: str | None, as_json: bool, endpoint: str,
               body: dict[str, Any], done: str) -> None:
    """Make an nkey, have ``endpoint`` store its public key, and hand the seed over.

    The seed file is created first: an ``--out`` that cannot be written changes nothing
    on the server, and a refused request leaves no seed file behind.
    """
    seed, public = new_user_key()
    if out:
        write_seed(out, seed, "--out")
    try:
        reply = client_call(g, lambda c: c.admin(endpoint, {**body, "public_key": public}, USERS_TIMEOUT_S))
    except BaseException:
        if out:
            Path(out).expanduser().unlink(missing_ok=True)
        raise
    _report(reply, as_json, done)
    _hand_over(seed, out, name, as_json)


@click.group("users")
def users() -> None:
    """Add, list, show, remove and rotate users: NATS identities with scoped permissions."""


@users.command("add")
@click.argument("name")
@click.option("--allow", "grants", multiple=True, metavar="OPS:SELECTOR",
              help="A grant, e.g. 'exec,put:role=web', 'info,ping:all', 'get:label team=pay', "
                   "'exec:db1 web-*' (repeatable; docs/security.md).")
@click.option("--admin", "admin", multiple=True, metavar="ENDPOINT[,ENDPOINT...]",
              help="Admin endpoints the user may call, e.g. servers.list (repeatable).")
@click.option("--expires", metavar="DURATION", help="Expire after this long: 90d, 12h, 2w (default: never).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the nkey seed to this new file (0600).")
@click.option("--json", "as_json", is_flag=True, help="Print the stored record as JSON.")
@pass_globals
def add(g: Globals, name: str, grants: tuple[str, ...], admin: tuple[str, ...], expires: str | None,
        out: str | None, as_json: bool) -> None:
    """Add the user NAME, allowed only what --allow and --admin say."""
    _issue_key(g, name, out, as_json, "users.add",
               {"name": name, "allow": list(grants), "admin": _endpoints(admin), "expires_in": expires},
               f"added user {name}")


@users.command("change")
@click.argument("name")
@click.option("--allow", "grants", multiple=True, metavar="OPS:SELECTOR",
              help="Add a grant, written as for users add (repeatable).")
@click.option("--revoke", multiple=True, metavar="GRANT",
              help="Take a grant away: its id (users show lists them) or its text (repeatable).")
@click.option("--admin", "admin", multiple=True, metavar="ENDPOINT[,ENDPOINT...]",
              help="Add admin endpoints (repeatable).")
@click.option("--revoke-admin", multiple=True, metavar="ENDPOINT[,ENDPOINT...]",
              help="Take admin endpoints away (repeatable).")
@click.option("--expires", metavar="DURATION|never", help="Expire this long from now (90d, 12h), or never.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored record as JSON.")
@pass_globals
def change(g: Globals, name: str, grants: tuple[str, ...], revoke: tuple[str, ...], admin: tuple[str, ...],
           revoke_admin: tuple[str, ...], expires: str | None, as_json: bool) -> None:
    """Change what NAME may do, keeping its key: its connections stay and get the new
    permissions within seconds."""
    if not (grants or revoke or admin or revoke_admin or expires):
        fail("nothing to change: give --allow, --revoke, --admin, --revoke-admin or --expires")
    body = {"name": name, "allow": list(grants), "revoke": list(revoke), "admin": _endpoints(admin),
            "revoke_admin": _endpoints(revoke_admin), "expires_in": expires}
    reply = client_call(g, lambda c: c.admin("users.change", body, USERS_TIMEOUT_S))
    _report(reply, as_json, f"changed user {name}")


def _endpoints(values: tuple[str, ...]) -> list[str]:
    return [e.strip() for item in values for e in item.split(",") if e.strip()]


@users.command("rotate")
@click.argument("name")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the new nkey seed to this new file (0600).")
@click.option("--json", "as_json", is_flag=True, help="Print the stored record as JSON.")
@pass_globals
def rotate(g: Globals, name: str, out: str | None, as_json: bool) -> None:
    """Give NAME a new nkey; the old one is refused from now on, its connections closed."""
    _issue_key(g, name, out, as_json, "users.rotate", {"name": name}, f"rotated the key of user {name}")


@users.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@pass_globals
def remove(g: Globals, name: str, as_json: bool) -> None:
    """Remove NAME; its connections are closed."""
    reply = client_call(g, lambda c: c.admin("users.remove", {"name": name}, USERS_TIMEOUT_S))
    _report(reply, as_json, f"removed user {name}")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def list_(g: Globals, as_json: bool) -> None:
    """List users: names, grants, admin endpoints, expiry."""
    found = client_call(g, lambda c: c.admin("users.list", {}))["users"]
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no users")
        return
    table(["name", "allow", "admin", "expires", "public key"],
          [[u["name"], "; ".join(gr["text"] for gr in u["grants"]) or "-", ",".join(u["admin"]) or "-",
            ("expired " if u["expired"] else "") + (u["expires"] or "never"), u["public_key"][:12] + "..."]
           for u in found])


@users.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def show(g: Globals, name: str, as_json: bool) -> None:
    """Show NAME's record: its public key, grants (with ids), admin endpoints, dates."""
    user = client_call(g, lambda c: c.admin("users.show", {"name": name}))["user"]
    if as_json:
        emit_json(user)
        return
    _describe(user)


def _describe(user: dict[str, Any]) -> None:
    click.echo(f"user        {user['name']}")
    click.echo(f"public key  {user['public_key']}")
    for grant in user["grants"]:
        click.echo(f"allow       {grant['text']}   (grant {grant['id']})")
    click.echo(f"admin       {', '.join(user['admin']) or '-'}")
    click.echo(f"expires     {user['expires'] or 'never'}{' (expired)' if user['expired'] else ''}")
    click.echo(f"created     {user['created']}" + (f", rotated {user['rotated']}" if user.get("rotated") else ""))


def _report(reply: dict[str, Any], as_json: bool, done: str) -> None:
    if as_json:
        emit_json({k: v for k, v in reply.items() if k != "ok"})
    else:
        click.echo(done + ("" if reply.get("applied") else " (stored; not yet in NATS)"))
        if reply.get("user"):
            _describe(reply["user"])
    for warning in reply.get("warnings", []):
        click.echo(f"fleetbus: warning: {warning}", err=True)
